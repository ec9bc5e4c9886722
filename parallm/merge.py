"""`parallm merge`: fold a LoRA adapter (peft's format) into its base model, giving a plain Hugging
Face directory that `transformers`, `parallm generate` and `parallm serve` load like any other.

The adapter is checked against the base before anything is written, and the merged directory
appears whole or not at all (`atomic_dir`): an existing one is replaced only with `force`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from parallm.errors import UserError
from parallm.models.build import canonical_name
from parallm.models.hf import load_pretrained, read_args, save_state_dict
from parallm.models.peft_format import merge_adapter, read_adapter

# What a tokenizer directory may hold (fast or slow tokenizers, a chat template beside them).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


class _CopiedFiles:
    """Files copied into the merged directory (`save_state_dict` calls `save(dir)` last)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def save(self, path: Path) -> None:
        for f in self.files:
            shutil.copyfile(f, path / f.name)


def _extra_files(model_dir: Path, adapter_dir: Path) -> list[Path]:
    """The tokenizer the adapter was trained with (saved beside it, as the trainer and most peft
    scripts do), else the base model's; and the base's generation settings."""
    has_tokenizer = any((adapter_dir / n).is_file() for n in TOKENIZER_FILES[:2])
    tok_dir = adapter_dir if has_tokenizer else model_dir
    files = [tok_dir / n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]
    gen = model_dir / "generation_config.json"
    return files + ([gen] if gen.is_file() else [])


def _check_out(out: Path, model_dir: Path, adapter_dir: Path, force: bool) -> None:
    for d, what in ((model_dir, "base model"), (adapter_dir, "adapter")):
        if out.exists() and d.exists() and out.resolve() == d.resolve():
            raise UserError(f"--out: {str(out)!r} is the {what} directory; choose a new one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out: {str(out)!r} exists and is not empty; choose a new directory, or pass "
            "--force to replace it"
        )


def merge(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
) -> Path:
    """Write base + adapter (W + scale * B A per adapted layer, saved modules replaced) to `out`
    as a Hugging Face directory in the base's dtype, with the tokenizer; returns `out`."""
    model_dir, adapter_dir, out = Path(model_dir), Path(adapter_dir), Path(out)
    _check_out(out, model_dir, adapter_dir, force)
    args = read_args(model_dir)
    adapter = read_adapter(adapter_dir, args, field="--adapter")
    model = load_pretrained(model_dir)
    state = {canonical_name(n): t for n, t in model.state_dict().items()}
    merged = merge_adapter(state, adapter)
    extra = _CopiedFiles(_extra_files(model_dir, adapter_dir))
    try:
        return save_state_dict(merged, args, out, tokenizer=extra)
    except OSError as e:
        raise UserError(f"--out: cannot write {str(out)!r} ({e.strerror or e})") from None
