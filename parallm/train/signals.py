"""Stop training at a step boundary on SIGTERM or SIGINT, at the same step on every rank.

A scheduler's preemption (SIGTERM), torchrun's agent passing on a signal it got, or Ctrl-C
(SIGINT) only sets a flag; the training loop asks `StopSignals.agreed()` after each step, which
on several ranks is one all-reduce (MAX) of a single integer — the signal number, 0 for none — so
every rank stops after the same step even when the signal reached them at different moments.
Further signals while stopping change nothing: torchrun forwards the SIGINT a terminal already
sent to every worker, so each worker sees Ctrl-C twice. SIGKILL remains the way to stop at once.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered (on the main thread), SIGTERM and SIGINT set `received` instead of
    ending the process; the previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def agreed(self, device: torch.device) -> str | None:
        """The name of a signal any rank received (SIGTERM over SIGINT), or None; a collective
        when there are several ranks, so every rank must call it at the same step."""
        received = self.received
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([received], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag.item())
        return signal.Signals(received).name if received else None
