"""Training data: local files -> documents -> one token stream -> packed fixed-length samples.

Formats: `.jsonl` (one JSON object per line, text in `text_field`), `.parquet` (column
`text_field`), anything else is read as one UTF-8 text document per file.

Documents are tokenized with BOS (when the tokenizer adds one) and closed with EOS, concatenated,
and cut into samples of `seq_len + 1` tokens (inputs are the first `seq_len`, labels the last),
with no padding. Sample order is a permutation seeded by (seed, epoch), so the whole data position
is one integer — the number of samples consumed — independent of how many data-parallel ranks
share each global batch. That makes resuming exact, also on a different layout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallm.errors import UserError
from parallm.tokenizer import Tokenizer
from parallm.utils.progress import load_progress


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """The text documents of one file."""
    try:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(`path:line`, value) for each non-blank line of a JSON Lines file; invalid JSON is a
    UserError naming the line."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def read_parquet(path: Path, columns: list[str] | None = None):
    """A parquet file's table (`columns` only, when given); a UserError for a corrupt file."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: no column {', '.join(columns or [])!r} ({e})") from None
    except Exception as e:  # pyarrow's ArrowInvalid for corrupt files
        raise UserError(f"{path}: not a readable parquet file ({e})") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise UserError(
                f"{where}: no string field {text_field!r} (set data.text_field to "
                "the field holding the text)"
            )
        yield row[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        table = read_parquet(path, [text_field])
    except UserError as e:
        raise UserError(f"{e}; set data.text_field") from None
    for value in table.column(text_field).to_pylist():
        if isinstance(value, str):
            yield value


def iter_texts(files: list[Path], text_field: str, desc: str = "reading") -> Iterator[str]:
    """Every document's text, file by file; a long read shows its progress (bytes of files)."""
    sizes = [_size(f) for f in files]
    with load_progress(f"{desc} {len(files)} files", sum(sizes), "B") as progress:
        for f, size in zip(files, sizes, strict=True):
            yield from read_documents(f, text_field)
            progress.update(size)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # reading it names the problem
        return 0


def tokenize_files(
    files: list[Path], tokenizer: Tokenizer, text_field: str, cache_dir: str | None = None
) -> np.ndarray:
    """One int32 stream of every document's tokens, each document closed by EOS.

    With `cache_dir`, the stream is cached under a key of the files (path, size, mtime), the
    tokenizer and the text field, so a resumed or repeated run skips tokenization.
    """
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256()
        for f in files:
            st = f.stat()
            key.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        key.update(tokenizer.backend.to_str().encode())
        key.update(text_field.encode())
        cache = Path(cache_dir) / f"tokens-{key.hexdigest()[:16]}.npy"
        if cache.exists():
            return np.load(cache)
    eos = tokenizer.eos_token_id
    chunks: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer.encode_batch(batch):
            chunks.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int32))
        batch.clear()

    for text in iter_texts(files, text_field, desc="tokenizing"):
        if text:
            batch.append(text)
        if len(batch) >= 256:
            flush()
    flush()
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}.npy")
        np.save(tmp, stream)
        os.replace(tmp, cache)
    return stream


class EpochOrder:
    """Samples 0..num_samples-1 in one seeded permutation per epoch, so the data position is one
    integer (samples consumed) whatever the data-parallel degree. A subclass says how many
    samples it holds (`_total`) and what one is (`row(sample_id)`); `split` gives views of
    disjoint subsets (a held-out evaluation set)."""

    _total: int
    seed: int
    shuffle: bool
    _ids: np.ndarray | None = None  # the samples this view reads; None: all of them
    _epoch_order: tuple[int, np.ndarray | None] = (-1, None)

    @property
    def num_samples(self) -> int:
        return self._total if self._ids is None else len(self._ids)

    def __len__(self) -> int:
        return self.num_samples

    def row(self, sample_id: int) -> np.ndarray:
        raise NotImplementedError

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:  # one permutation per epoch, computed once
            order = np.arange(self.num_samples)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def sample(self, index: int) -> np.ndarray:
        """The `index`-th sample consumed since the start of training (epochs wrap around)."""
        epoch, i = divmod(index, self.num_samples)
        j = int(self._order(epoch)[i])
        return self.row(j if self._ids is None else int(self._ids[j]))

    def split(self, fraction: float):
        """(train, held out): a seeded `fraction` of the samples (at least one) held out, read in
        order, and the rest; a UserError when nothing would be left to train on."""
        n_eval = max(1, round(fraction * self.num_samples))
        if n_eval >= self.num_samples:
            raise UserError(
                f"data.eval_fraction: {fraction} of {self.num_samples} samples leaves none to "
                "train on; lower it or add data"
            )
        perm = np.random.default_rng([self.seed, 1_000_003]).permutation(self.num_samples)
        train, held = copy.copy(self), copy.copy(self)
        train._ids, held._ids = np.sort(perm[n_eval:]), np.sort(perm[:n_eval])
        train._epoch_order = held._epoch_order = (-1, None)
        held.shuffle = False
        return train, held


class PackedDataset(EpochOrder):
    """Fixed-length samples cut from a token stream; sample i is tokens
    [i * seq_len, (i + 1) * seq_len + 1), so consecutive samples share one boundary token."""

    @classmethod
    def from_files(
        cls,
        files: list[Path],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        text_field: str = "text",
        seed: int = 0,
        shuffle: bool = True,
        cache_dir: str | None = None,
    ) -> PackedDataset:
        tokens = tokenize_files(files, tokenizer, text_field, cache_dir)
        return cls(tokens, seq_len=seq_len, seed=seed, shuffle=shuffle)

    @classmethod
    def random(
        cls, n_tokens: int, vocab_size: int, *, seq_len: int, seed: int = 0
    ) -> PackedDataset:
        """Uniformly random token ids: benchmarks measure speed, not what is learned."""
        tokens = np.random.default_rng(seed).integers(0, vocab_size, n_tokens, dtype=np.int32)
        return cls(tokens, seq_len=seq_len, seed=seed, shuffle=False)

    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self._total = (len(self.tokens) - 1) // seq_len if len(self.tokens) else 0
        if self._total == 0:
            raise UserError(
                f"data: the files hold {len(self.tokens)} tokens, fewer than one sample of "
                f"data.seq_len + 1 = {seq_len + 1}; add data or lower data.seq_len"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def row(self, sample_id: int) -> np.ndarray:
        start = sample_id * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


class RowDataset(EpochOrder):
    """Rows built ahead, (N, C, seq_len + 1) int arrays: C channels per token (e.g. ids, label
    mask, document ids, positions of packed conversations), read in a seeded order per epoch."""

    def __init__(self, rows: np.ndarray, *, seed: int = 0, shuffle: bool = True) -> None:
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self._total = len(rows)

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.rows.shape[-1]

    def row(self, sample_id: int) -> np.ndarray:
        return self.rows[sample_id]


class PackedDataLoader:
    """Global batches of `global_batch_size` samples, split into micro-batches.

    A data-parallel rank `dp_rank` of `dp_degree` takes its contiguous slice of each global batch,
    so the union over ranks is the single-process batch. The position (`consumed` samples) is
    global: a checkpoint resumes on any data-parallel degree.
    """

    def __init__(
        self,
        dataset: PackedDataset | RowDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
    ) -> None:
        if global_batch_size % dp_degree:
            raise UserError(
                f"train.batch_size: {global_batch_size} is not divisible by the data-parallel "
                f"degree {dp_degree}"
            )
        local = global_batch_size // dp_degree
        if local % micro_batch_size:
            raise UserError(
                f"train.micro_batch_size: {micro_batch_size} must divide the per-rank batch "
                f"{local} (train.batch_size {global_batch_size} / data-parallel degree {dp_degree})"
            )
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.local_batch_size = dp_rank, local
        self.consumed = 0

    def next_rows(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """This rank's slice of the next global batch: (local batch, seq_len + 1) token ids, or
        (local batch, C, seq_len + 1) from a `RowDataset` (a task turns them into a batch). A
        dataset with a `collate(samples)` (videos) makes the batch itself: a dict of tensors,
        to which `sample_index` (local batch,) adds each sample's global index (what seeds its
        noise, the same on every layout)."""
        first = self.consumed + self.dp_rank * self.local_batch_size
        samples = [self.dataset.sample(first + i) for i in range(self.local_batch_size)]
        self.consumed += self.global_batch_size
        if hasattr(self.dataset, "collate"):
            batch = dict(self.dataset.collate(samples))
            batch["sample_index"] = torch.arange(first, first + self.local_batch_size)
            return batch
        return torch.from_numpy(np.stack(samples).astype(np.int64))

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_samples", len(self.dataset)) != len(self.dataset):
            raise UserError(
                f"--resume: the data now yields {len(self.dataset)} samples but the checkpoint "
                f"was written with {state['num_samples']}; resume with the same data and seq_len"
            )
        self.consumed = int(state["consumed"])
