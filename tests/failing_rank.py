"""`python -m torch.distributed.run ... tests/failing_rank.py job.toml`: parallm.train whose rank 1
raises at step 2 while rank 0 goes on into the next collective (used by test_launch.py)."""

from __future__ import annotations

import sys

import torch.distributed as dist

from parallm.train import __main__ as entry
from parallm.train.trainer import Trainer

_step = Trainer.train_step


def _train_step(self):
    if dist.get_rank() == 1 and self.step == 1:
        raise ValueError("simulated failure on rank 1")
    return _step(self)


Trainer.train_step = _train_step

if __name__ == "__main__":
    sys.exit(entry.main())
