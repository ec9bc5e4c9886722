"""Run a function on N CPU processes with the gloo backend and a file rendezvous.

For tests: no ports (so no address-in-use races and no retries), a bounded time, and every
rank's exception reported with the rank that raised it. Each rank's return value comes back to
the caller in rank order.

Ranks fork from a forkserver that imported torch and the trainer once (the first call starts
it): a spawned rank spent 1-2 s importing them, 8 ranks ~9 s on 2 cores, a forked one ~0.1 s.
The forkserver imports nothing but modules and runs no OpenMP region, so forking it is safe;
its environment is the caller's when it started (tests here set none for their ranks).

`timeout_s` bounds the function, not the start: a rank may first import torch, which on a
loaded machine takes tens of seconds and differs between ranks. So the ranks meet at a file
barrier after starting (bounded by `parallm.testing.timeouts.scaled(STARTUP_S)`), and only then
join the process group, whose collectives time out after `timeout_s`, and the caller's deadline
(`timeout_s` plus a scaled margin for leaving) starts.

    def fn(rank, world_size, x):
        t = torch.tensor([x + rank]); dist.all_reduce(t); return t.item()

    run_distributed(fn, 4, tmp_path, 1.0)  # -> [10.0, 10.0, 10.0, 10.0]
"""

from __future__ import annotations

import multiprocessing
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

from parallm.testing.timeouts import scaled

STARTUP_S = 120.0  # for every rank to start (import torch), before load scaling
EXIT_S = 30.0  # for every rank to leave after the function, before load scaling
# What the forkserver imports before forking ranks (an import that fails is skipped there).
PRELOAD = ["torch", "torch.distributed", "parallm.testing.distributed", "parallm.train.trainer"]
multiprocessing.set_forkserver_preload(PRELOAD)


class DistributedFailure(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def _started(workdir: Path, rank: int) -> Path:
    return workdir / f"started-{rank}"


def _all_started(workdir: Path, world_size: int) -> bool:
    return all(_started(workdir, r).exists() for r in range(world_size))


def _wait_for_every_rank(workdir: Path, rank: int, world_size: int, startup_s: float) -> None:
    """Mark this rank started; return when every rank has (a TimeoutError after `startup_s`)."""
    _started(workdir, rank).touch()
    deadline = time.monotonic() + startup_s
    while not _all_started(workdir, world_size):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every rank started within {startup_s:.0f} s")
        time.sleep(0.05)


def _worker(
    rank: int,
    world_size: int,
    workdir: str,
    fn: Callable[..., Any],
    args: tuple,
    timeout_s: float,
    startup_s: float,
) -> None:
    result_file = Path(workdir) / f"result-{rank}.pkl"
    torch.set_num_threads(1)  # N ranks share a few cores; more threads only oversubscribe
    try:
        _wait_for_every_rank(Path(workdir), rank, world_size, startup_s)
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
    timeout_s: float | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes.

    `fn` and `args` must be picklable (a module-level function). `workdir` must be an empty
    directory private to this call (pytest's `tmp_path`); the rendezvous file lives there.
    Returns each rank's return value; raises `DistributedFailure` if any rank raised, or if the
    processes did not finish within `timeout_s` once all had started (collectives time out after
    the same bound); default `scaled(300)`. Pass a scaled bound too (`scaled(60)`).
    """
    timeout_s = scaled(300) if timeout_s is None else timeout_s
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    startup_s = scaled(STARTUP_S)
    ctx = mp.start_processes(
        _worker,
        args=(world_size, str(workdir), fn, args, timeout_s, startup_s),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    # Until every rank has started, the bound is the start-up's (the ranks' own, plus a margin);
    # from then on the function's, plus a margin for leaving.
    deadline = time.monotonic() + startup_s + scaled(EXIT_S)
    running = False
    deadline_hit = False
    while True:
        try:
            if ctx.join(timeout=1.0):
                break
        except mp.ProcessExitedException:  # a rank died without reporting (e.g. a signal)
            break
        if not running and _all_started(workdir, world_size):
            running = True
            deadline = time.monotonic() + timeout_s + scaled(EXIT_S)
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
        what = f"{timeout_s:.0f} s" if running else f"start-up ({startup_s:.0f} s)"
        errors.insert(0, f"timed out after {what}")
    if errors:
        raise DistributedFailure("\n".join(errors))
    return results
