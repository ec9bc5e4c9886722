"""Caption encoders for the STDiT3 family, and a disk cache of caption embeddings.

Two encoders share one interface (`TextEncoder`):
- `CaptionTokenizer`, for the small caption encoder that trains inside the model
  (`caption_vocab_size > 0`): a word-level tokenizer learnt from the captions; `y` is token ids.
- `T5TextEncoder`, for real checkpoints: a T5 encoder from a local Hugging Face directory, run as
  Open-Sora's `T5Embedder` runs it (padding to `max_length`, truncation, last hidden state);
  `y` is embeddings (B, 1, L, Cy).

Both pad to `max_length` (mask 1 = real token, right padding) and cut longer captions, counting
them so the trainer can log "N captions truncated to L tokens". The null caption for guidance is
the model's own `y_embedder.y_embedding`, not an encoder's.

`CaptionCache` keeps T5 embeddings on disk so training need not hold T5-XXL:
`python -m parallm.video.text cache --encoder T5DIR --data train.jsonl --out DIR`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from parallm.errors import UserError
from parallm.utils.fs import read_text, write_text_atomic

CAPTION_TOKENIZER_FILE = "caption_tokenizer.json"
PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"


class Encoded(NamedTuple):
    """Encoded captions. `y`: (B, L) token ids (trainable encoder) or (B, 1, L, Cy) embeddings
    (T5); `mask`: (B, L) long, 1 = real token; `truncated`: how many captions were cut to L."""

    y: torch.Tensor
    mask: torch.Tensor
    truncated: int


class TextEncoder(Protocol):
    """What the trainer and the pipeline need of a caption encoder."""

    name: str  # identifies the encoder's outputs (caption cache keys)
    max_length: int  # L: captions are padded or cut to this many tokens

    def encode(self, captions: Sequence[str]) -> Encoded: ...


def _check_max_length(max_length: int) -> int:
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"video.caption_length: {max_length!r} must be a positive integer")
    return max_length


# ---------------------------------------------------------------------------------------------
# The trainable encoder's tokenizer


class CaptionTokenizer:
    """A word-level tokenizer for the in-model caption encoder: NFKC + lowercase, split on
    whitespace and punctuation, ids [PAD]=0, [UNK]=1, [EOS]=2. Every caption ends with [EOS]
    (kept when a caption is cut, as T5's </s> is), so even an empty caption has one real token
    and cross-attention never sees an empty caption."""

    def __init__(self, tokenizer, *, max_length: int = 300) -> None:
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.max_length = _check_max_length(max_length)
        digest = hashlib.sha256(self._json().encode()).hexdigest()[:16]
        self.name = f"caption-tokenizer:{digest}"

    def _json(self) -> str:
        """The tokenizer without the padding and truncation `encode` sets per call."""
        obj = json.loads(self.tokenizer.to_str())
        obj["padding"] = obj["truncation"] = None
        return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)

    @property
    def vocab_size(self) -> int:
        """The model's `caption_vocab_size` (specials included)."""
        return self.tokenizer.get_vocab_size()

    @classmethod
    def train(
        cls, captions: Iterable[str], *, vocab_size: int = 4096, max_length: int = 300
    ) -> CaptionTokenizer:
        """Learn the `vocab_size - 3` most frequent words of `captions`."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        if vocab_size < 4:
            raise UserError(f"caption_vocab_size: {vocab_size} must be at least 4")
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=[PAD, UNK, EOS], show_progress=False
        )
        tok.train_from_iterator(captions, trainer)
        return cls(_with_eos(tok), max_length=max_length)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `caption_tokenizer.json` into `directory` (atomically)."""
        path = Path(directory) / CAPTION_TOKENIZER_FILE
        write_text_atomic(path, self._json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, *, max_length: int = 300) -> CaptionTokenizer:
        """Read `caption_tokenizer.json` from a model directory."""
        from tokenizers import Tokenizer

        path = Path(directory) / CAPTION_TOKENIZER_FILE
        text = read_text(path, "caption tokenizer")
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:
            raise UserError(f"caption tokenizer {str(path)!r} cannot be read ({e})") from None
        for i, special in enumerate((PAD, UNK, EOS)):
            if tok.token_to_id(special) != i:
                raise UserError(f"caption tokenizer {str(path)!r}: {special} must have id {i}")
        return cls(tok, max_length=max_length)

    def encode(self, captions: Sequence[str], max_length: int | None = None) -> Encoded:
        """(ids (B, L) long, mask (B, L) long, truncated): words + [EOS], right-padded with
        [PAD] to L = `max_length` (default `self.max_length`); a longer caption keeps its first
        L - 1 words and [EOS], and is counted in `truncated`."""
        length = self.max_length if max_length is None else _check_max_length(max_length)
        tok = self.tokenizer
        # enable_* mutate the tokenizer: set them on every call (a call may use another length).
        tok.enable_truncation(length)
        tok.enable_padding(pad_id=0, pad_token=PAD, length=length)
        encodings = tok.encode_batch(list(captions))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(-1, length)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        truncated = sum(1 for e in encodings if e.overflowing)
        return Encoded(ids, mask.reshape(-1, length), truncated)


def _with_eos(tok):
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    return tok


# ---------------------------------------------------------------------------------------------
# T5


def _import(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{what} needs {module} ({module} is not installed): pip install {module}"
        ) from None


class T5TextEncoder:
    """A T5 encoder (`transformers.T5EncoderModel` + its tokenizer) from a local directory,
    used as Open-Sora's `T5Embedder.get_text_embeddings`: captions are tokenized with special
    tokens (T5 appends </s>), padded to `max_length` and cut beyond it; `y` is the encoder's
    last hidden state (B, 1, L, d_model). Captions are used as given: Open-Sora's optional
    `clean_caption` preprocessing (ftfy, BeautifulSoup) is left to whoever writes the data."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int = 300,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.path = _t5_dir(path)
        self.max_length = _check_max_length(max_length)
        self.device = torch.device(device)
        self.dtype = dtype
        transformers = _import("transformers", "text_encoder (T5)")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            self.path, local_files_only=True
        )
        # transformers 4.56 renamed torch_dtype to dtype (and warns about the old name since)
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self.model = transformers.T5EncoderModel.from_pretrained(
            self.path, local_files_only=True, **{key: dtype}
        )
        self.model.to(self.device).eval().requires_grad_(False)
        self.caption_channels: int = self.model.config.d_model  # Cy
        self.name = t5_encoder_name(self.path, dtype)

    def encode(self, captions: Sequence[str]) -> Encoded:
        captions = list(captions)
        full = self.tokenizer(captions, add_special_tokens=True)["input_ids"]
        truncated = sum(1 for ids in full if len(ids) > self.max_length)
        tokens = self.tokenizer(
            captions,
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        with torch.no_grad():
            y = self.model(input_ids=input_ids, attention_mask=mask)["last_hidden_state"]
        return Encoded(y[:, None], mask, truncated)


def t5_encoder_name(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> str:
    """`T5TextEncoder.name` of the T5 in `path` computing in `dtype` (what its cached embeddings
    are keyed by), without loading it."""
    return f"t5:{_dir_digest(_t5_dir(path))}:{str(dtype).removeprefix('torch.')}"


def _t5_dir(path: str | os.PathLike) -> Path:
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"video.text_encoder: {str(d)!r} is not a directory (a local T5 model)")
    config = d / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type not in ("t5", "umt5", "mt5"):
        raise UserError(
            f"video.text_encoder: {str(d)!r} has no T5 config.json (model_type {model_type!r}; "
            "expected 't5', 'mt5' or 'umt5')"
        )
    return d


def _dir_digest(d: Path) -> str:
    """Identifies a model directory's contents cheaply: config and tokenizer files' bytes, and
    the names and sizes of the weight files (hashing gigabytes of weights would take minutes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        if f.suffix in (".json", ".model", ".txt"):
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def load_text_encoder(
    spec: str,
    *,
    model_dir: str | os.PathLike | None = None,
    max_length: int = 300,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CaptionTokenizer | T5TextEncoder:
    """`video.text_encoder`: "trainable" -> the CaptionTokenizer saved in `model_dir`; anything
    else -> a local T5 directory."""
    if spec == "trainable":
        if model_dir is None:
            raise UserError("video.text_encoder: 'trainable' needs the model directory")
        return CaptionTokenizer.load(model_dir, max_length=max_length)
    return T5TextEncoder(spec, max_length=max_length, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The cache


class CaptionCache:
    """Caption embeddings on disk, one safetensors file per caption at
    `dir/ab/<sha256 of encoder name, max_length and caption>.safetensors`, written atomically.

    Only a caption's real tokens are stored (`y` (n, Cy) with n = its mask's length; T5's
    mask is a right-padded prefix): for 300-token T5-XXL embeddings of ~20-word captions that
    is 15 times less disk. `get` pads `y` with zeros, which changes nothing the model computes:
    STDiT3's cross-attention uses only the tokens its mask selects."""

    def __init__(self, directory: str | os.PathLike, encoder_name: str, max_length: int) -> None:
        self.dir = Path(directory)
        self.encoder_name = encoder_name
        self.max_length = _check_max_length(max_length)

    @classmethod
    def for_encoder(cls, directory: str | os.PathLike, encoder: TextEncoder) -> CaptionCache:
        return cls(directory, encoder.name, encoder.max_length)

    def path(self, caption: str) -> Path:
        key = f"{self.encoder_name}\n{self.max_length}\n{caption}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The distinct captions not in the cache, in first-seen order."""
        return [c for c in dict.fromkeys(captions) if not self.path(c).is_file()]

    def precompute(
        self, encoder: TextEncoder, captions: Iterable[str], *, batch_size: int = 32
    ) -> tuple[int, int]:
        """Encode and store the captions not yet cached, `batch_size` at a time.
        Returns (captions encoded, of them truncated)."""
        if (encoder.name, encoder.max_length) != (self.encoder_name, self.max_length):
            raise UserError(
                f"caption_cache: encoder {encoder.name!r} (max_length {encoder.max_length}) "
                f"is not this cache's {self.encoder_name!r} (max_length {self.max_length})"
            )
        todo = self.missing(captions)
        truncated = 0
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            y, mask, cut = encoder.encode(batch)
            truncated += cut
            for i, caption in enumerate(batch):
                self._write(caption, y[i, 0, : int(mask[i].sum())])
        return len(todo), truncated

    def _write(self, caption: str, y: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path(caption)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        meta = {
            "caption": caption,
            "encoder": self.encoder_name,
            "max_length": str(self.max_length),
        }
        save_file({"y": y.detach().cpu().contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)

    def get(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (B, 1, L, Cy), mask (B, L) long) for cached captions; a caption not in the cache
        is a UserError naming the command that fills it."""
        from safetensors.torch import load_file

        rows = []
        for caption in captions:
            path = self.path(caption)
            try:
                rows.append(load_file(path)["y"])
            except FileNotFoundError:
                raise UserError(
                    f"video.caption_cache: {caption[:60]!r} is not in {str(self.dir)!r}; fill it "
                    "with python -m parallm.video.text cache --encoder DIR --data FILE --out DIR"
                ) from None
        if not rows:
            raise UserError("video.caption_cache: no captions asked for")
        length = self.max_length
        y = rows[0].new_zeros(len(rows), 1, length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            y[i, 0, : len(row)] = row
            mask[i, : len(row)] = 1
        return y, mask


# ---------------------------------------------------------------------------------------------
# python -m parallm.video.text cache ...


def read_captions(path: str | os.PathLike) -> list[str]:
    """The `text` column of a video manifest (.jsonl or .csv)."""
    path = Path(path)
    text = read_text(path, "data")
    if path.suffix == ".jsonl":
        captions = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    captions.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"data: {path}:{n} is not a JSON object with 'text'") from None
        return captions
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "text" not in rows[0]:
            raise UserError(f"data: {path} has no 'text' column")
        return [row["text"] for row in rows]
    raise UserError(f"data: {str(path)!r} must be a .jsonl or .csv manifest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallm.video.text")
    sub = parser.add_subparsers(dest="command", required=True)
    cache = sub.add_parser("cache", help="precompute T5 caption embeddings for a manifest")
    cache.add_argument("--encoder", required=True, help="local T5 directory")
    cache.add_argument("--data", required=True, nargs="+", help=".jsonl / .csv manifests")
    cache.add_argument("--out", required=True, help="cache directory")
    cache.add_argument("--max-length", type=int, default=300)
    cache.add_argument("--batch-size", type=int, default=32)
    cache.add_argument("--device", default="cpu")
    cache.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        captions = [c for path in args.data for c in read_captions(path)]
        encoder = T5TextEncoder(
            args.encoder,
            max_length=args.max_length,
            device=args.device,
            dtype=getattr(torch, args.dtype),
        )
        done, truncated = CaptionCache.for_encoder(args.out, encoder).precompute(
            encoder, captions, batch_size=args.batch_size
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distinct = len(set(captions))
    print(
        f"{done} captions encoded ({distinct - done} of {distinct} already cached) into {args.out}"
    )
    if truncated:
        print(f"{truncated} captions truncated to {args.max_length} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
