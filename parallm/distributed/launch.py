"""Process-group start-up from a launcher's environment, and starting `torchrun` for the user.

This is the one place that reads the launcher's variables (`WORLD_SIZE`, `LOCAL_RANK`, set by
`torchrun`); everything else learns the layout from `ParallelDims` and the process group.

    parallm train --nproc 8 job.toml                  # one node: parallm starts torchrun
    torchrun --nproc-per-node 8 -m parallm.train job.toml
    torchrun --nnodes 4 --node-rank $NODE --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 --rdzv-id job1 -m parallm.train job.toml
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The number of processes a launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float) -> int:
    """Join the process group the launcher set up (NCCL on GPUs, gloo on CPUs) with a bounded
    collective timeout; returns this process's local rank (its GPU index on the node)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if launched_world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return local_rank


def torchrun_argv(nproc: int, module: str, args: list[str]) -> list[str]:
    """The command that runs `python -m module args` on `nproc` local processes via torchrun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # single node: a private rendezvous on a free local port
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]
