"""`python tests/drill_rank.py job.toml` (alone or under torchrun): `python -m parallm.train` with
the hooks the checkpoint drills need, each set by an environment variable (used by
test_checkpoint.py and test_drill.py):

- DRILL_PIDS=DIR: write `DIR/rank<R>.restart<N>` holding this process's id at start, so a test
  can kill a given rank of a given attempt.
- DRILL_SIGNAL=STEP:NAME: send this process signal NAME (SIGINT, SIGTERM) during step STEP, as a
  preemption or Ctrl-C arriving mid-step.
- DRILL_PAUSE_SAVE=STEP:FILE: in the first attempt, rank 0 stops in the save of step STEP after
  every rank's files are written and before the manifest and the rename, creates FILE and
  sleeps until it is killed: a kill that lands during a save, every time.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from parallm.train import __main__ as entry
from parallm.train import checkpoint as ckpt
from parallm.train.trainer import Trainer

RANK = int(os.environ.get("RANK", "0"))
RESTART = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

if pids := os.environ.get("DRILL_PIDS"):
    Path(pids).mkdir(parents=True, exist_ok=True)
    (Path(pids) / f"rank{RANK}.restart{RESTART}").write_text(str(os.getpid()))

if spec := os.environ.get("DRILL_SIGNAL"):
    at, name = spec.split(":")
    _step = Trainer.train_step

    def _train_step(self):
        record = _step(self)
        if self.step == int(at):
            os.kill(os.getpid(), getattr(signal, name))
        return record

    Trainer.train_step = _train_step

if (spec := os.environ.get("DRILL_PAUSE_SAVE")) and RESTART == 0:
    at, marker = spec.split(":", 1)
    _write = ckpt._write_manifest

    def _write_manifest(directory, entries):
        if directory.name == f".step_{int(at):08d}.tmp":
            Path(marker).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        return _write(directory, entries)

    ckpt._write_manifest = _write_manifest

if __name__ == "__main__":
    sys.exit(entry.main())
