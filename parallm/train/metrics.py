"""Per-step metrics: `metrics.jsonl` (one JSON object per optimizer step), progress, MFU."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from parallm.models.registry import family_of_args
from parallm.utils.fs import write_lines_atomic
from parallm.utils.progress import format_seconds, on_terminal

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


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


class MetricsLog:
    """Appends one JSON line per step to `<dir>/metrics.jsonl`; on resume drops later steps."""

    def __init__(self, out_dir: Path, *, resume_step: int = 0) -> None:
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            if lines and not _is_json(lines[-1]):
                lines.pop()  # torn by a kill in the middle of a write; its step is re-run
            kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
            write_lines_atomic(self.path, kept)
        self.file: TextIO = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Progress:
    """Training progress on rank 0 (`enabled`): a tqdm bar on a terminal (step/total, ETA, and
    loss, lr, tokens/s), otherwise one line per `every` steps on `stream` (stdout) with step/total,
    loss, lr, tokens/s, the mean loss since the last line (when it covers several steps), elapsed
    time and ETA. Off a terminal a line also comes whenever `quiet_s` seconds passed since the
    last, so a slow job is never silent, and for the last step and every evaluation. `clock` is
    for tests."""

    def __init__(
        self,
        total: int,
        initial: int,
        every: int,
        enabled: bool = True,
        *,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        quiet_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.initial, self.every, self.enabled = total, initial, every, enabled
        self.stream = sys.stdout if stream is None else stream
        self.quiet_s, self.clock = quiet_s, clock
        self.start = self.last_line = clock()
        self.recent: list[float] = []  # losses since the last printed line
        self.bar = None
        if terminal is None:
            terminal = on_terminal(sys.stderr if stream is None else stream)
        if enabled and terminal:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr if stream is None else stream,
            )

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = record["step"]
        self.recent.append(record["loss"])
        parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if "reward" in record:  # online RL: how the rollouts score, and how long they are
            parts.append(
                f"reward {record['reward']:.3f} ± {record['reward_std']:.3f} | "
                f"kl {record.get('kl', 0.0):.4f} | length {record['completion_length']:.1f}"
            )
        if "eval_loss" in record:
            parts.append(f"eval loss {record['eval_loss']:.4f}")
        text = " | ".join(parts)
        if self.bar is not None:
            self.bar.set_postfix_str(text.replace(" | ", ", "), refresh=False)
            self.bar.update(1)
            return
        now = self.clock()
        due = (
            step % self.every == 0
            or step == self.initial + 1  # the first of this run: it has started
            or step == self.total
            or "eval_loss" in record
            or now - self.last_line >= self.quiet_s
        )
        if not due:
            return
        elapsed = now - self.start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        if len(self.recent) > 1:  # one step's loss is noisy; the mean since the last line is not
            text += f" | mean loss {sum(self.recent) / len(self.recent):.4f}"
        width = len(str(self.total))
        print(
            f"step {step:>{width}}/{self.total} | {text} | "
            f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}",
            file=self.stream,
            flush=True,
        )
        self.recent.clear()
        self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
