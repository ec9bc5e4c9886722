"""Per-step metrics: `metrics.jsonl` (one JSON object per optimizer step), progress, MFU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from parallm.models.registry import family_of_args
from parallm.utils.fs import write_lines_atomic

# Dense bf16 peak FLOP/s by device-name substring; MFU is reported only for a known device.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def flops_per_token(args, seq_len: int) -> float:
    """Training FLOPs per token of `args`'s model family at `seq_len` (its spec's formula)."""
    return family_of_args(args).flops_per_token(args, seq_len)


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLog:
    """Appends one JSON line per step to `<dir>/metrics.jsonl`; on resume drops later steps."""

    def __init__(self, out_dir: Path, *, resume_step: int = 0) -> None:
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            write_lines_atomic(self.path, kept)
        self.file: TextIO = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every `every` steps on stdout."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool = True) -> None:
        self.every, self.enabled = every, enabled
        self.recent: list[float] = []  # losses since the last printed line
        self.bar = None
        if enabled and sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.recent.append(record["loss"])
        text = f"loss {record['loss']:.4f} lr {record['lr']:.2e} tok/s {record['tokens_per_s']:.0f}"
        if "eval_loss" in record:
            text += f" eval loss {record['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif record["step"] % self.every == 0 or record["step"] == 1 or "eval_loss" in record:
            # One step's loss is noisy; the mean since the last line shows the trend.
            mean = sum(self.recent) / len(self.recent)
            print(f"step {record['step']:>6} | {text} | mean loss {mean:.4f}", flush=True)
            self.recent.clear()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
