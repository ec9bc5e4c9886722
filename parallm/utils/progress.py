"""Progress of long loads (weights, tokenizing): a tqdm bar on a terminal, lines otherwise.

Nothing is shown for a load that ends within `delay_s` (tests and small models stay quiet). After
that, a terminal gets a tqdm bar (on stderr) and anything else (a log file, a job scheduler) a
line every `every_s` seconds, and one at the end, so a long load is never silent.

    with load_progress("loading weights", total=nbytes, unit="B") as bar:
        for t in tensors:
            ...
            bar.update(t.nbytes)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

DELAY_S = 2.0  # show nothing for a load shorter than this
EVERY_S = 30.0  # at most this long between two lines off a terminal


def on_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal that can redraw a bar."""
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def lead_process() -> bool:
    """False on ranks > 0 of an initialized process group (they load the same, silently).
    Torch is not imported for this: without it there is no process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return True
    return dist.get_rank() == 0


def format_seconds(seconds: float) -> str:
    """`H:MM:SS` (or `M:SS` under an hour), as tqdm shows times."""
    s = max(0, int(seconds + 0.5))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _bytes(value: float) -> str:
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {name}"
    return f"{value:.0f} B"


class LineProgress:
    """The off-terminal form: `desc: done/total (pct), elapsed, ETA` lines, the first after
    `delay_s`, then at most every `every_s` seconds, and a last one at `close` if any was shown."""

    def __init__(
        self,
        desc: str,
        total: float | None,
        unit: str,
        *,
        stream: TextIO,
        delay_s: float | None = None,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit, self.stream = desc, total, unit, stream
        self.delay_s = DELAY_S if delay_s is None else delay_s
        self.every_s, self.clock = every_s, clock
        self.start = clock()
        self.done = 0.0
        self.last_line: float | None = None
        self.shown = 0.0  # `done` at the last line

    def update(self, n: float = 1) -> None:
        self.done += n
        now = self.clock()
        if self.last_line is None:
            due = now - self.start >= self.delay_s
        else:
            due = now - self.last_line >= self.every_s
        if due:
            self._line(now)

    def close(self) -> None:
        if self.last_line is not None and self.shown != self.done:  # a shown load shows its end
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self.last_line, self.shown = now, self.done
        elapsed = now - self.start
        if self.unit == "B":
            text = f"{self.desc}: {_bytes(self.done)}"
            if self.total:
                text += f"/{_bytes(self.total)}"
        else:
            text = f"{self.desc}: {self.done:.0f}" + (f"/{self.total:.0f}" if self.total else "")
            text += f" {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {format_seconds(elapsed)} elapsed"
        if self.total and 0 < self.done < self.total:
            text += f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        print(text, file=self.stream, flush=True)


@contextmanager
def load_progress(
    desc: str,
    total: float | None = None,
    unit: str = "it",
    *,
    enabled: bool | None = None,
    stream: TextIO | None = None,
) -> Iterator:
    """A progress display for a load of `total` `unit`s (`update(n)` as they arrive) on `stream`
    (stderr): a tqdm bar on a terminal, `LineProgress` otherwise, nothing when `enabled` is false
    (default: on the lead process only)."""
    stream = sys.stderr if stream is None else stream
    if not (lead_process() if enabled is None else enabled):
        bar = _Quiet()
    elif on_terminal(stream):
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            unit_divisor=1024,
            delay=DELAY_S,
            file=stream,
            dynamic_ncols=True,
            leave=False,
        )
    else:
        bar = LineProgress(desc, total, unit, stream=stream)
    try:
        yield bar
    finally:
        bar.close()


class _Quiet:
    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass
