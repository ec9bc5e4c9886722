"""Run a function on N CPU processes with the gloo backend and a file rendezvous.

For tests: no ports (so no address-in-use races and no retries), a bounded time, and every
rank's exception reported with the rank that raised it. Each rank's return value comes back to
the caller in rank order.

    def fn(rank, world_size, x):
        t = torch.tensor([x + rank]); dist.all_reduce(t); return t.item()

    run_distributed(fn, 4, tmp_path, 1.0)  # -> [10.0, 10.0, 10.0, 10.0]
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedFailure(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def _worker(
    rank: int,
    world_size: int,
    workdir: str,
    fn: Callable[..., Any],
    args: tuple,
    timeout_s: float,
) -> None:
    result_file = Path(workdir) / f"result-{rank}.pkl"
    torch.set_num_threads(1)  # N ranks share a few cores; more threads only oversubscribe
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{workdir}/rendezvous",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        outcome = ("ok", fn(rank, world_size, *args))
    except BaseException:
        outcome = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(result_file, "wb") as f:
        pickle.dump(outcome, f)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    workdir: str | os.PathLike,
    *args: Any,
    timeout_s: float = 300.0,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo processes.

    `fn` and `args` must be picklable (a module-level function). `workdir` must be an empty
    directory private to this call (pytest's `tmp_path`); the rendezvous file lives there.
    Returns each rank's return value; raises `DistributedFailure` if any rank raised, or if the
    processes did not finish within `timeout_s` (collectives time out after the same bound).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.spawn(
        _worker,
        args=(world_size, str(workdir), fn, args, timeout_s),
        nprocs=world_size,
        join=False,
    )
    deadline = time.monotonic() + timeout_s + 30
    deadline_hit = False
    while True:
        try:
            if ctx.join(timeout=1.0):
                break
        except mp.ProcessExitedException:  # a rank died without reporting (e.g. a signal)
            break
        if time.monotonic() > deadline:
            deadline_hit = True
            break
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    results, errors = [], []
    for rank in range(world_size):
        path = workdir / f"result-{rank}.pkl"
        if not path.exists():
            errors.append(f"rank {rank}: exited without a result")
            results.append(None)
            continue
        status, value = pickle.loads(path.read_bytes())
        if status == "error":
            errors.append(f"rank {rank}:\n{value}")
        results.append(value if status == "ok" else None)
    if deadline_hit:
        errors.insert(0, f"timed out after {timeout_s:.0f} s")
    if errors:
        raise DistributedFailure("\n".join(errors))
    return results
