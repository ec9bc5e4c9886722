"""Starting ranks: torchrun's elastic agent run by `parallm` itself, and each rank's start-up.

This is the one place that reads the launcher's variables (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`,
torchelastic's restart count and error file); everything else learns the layout from
`ParallelDims` and the process group.

    parallm train --nproc 8 job.toml                          # one node
    parallm train --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint HEAD:29500 job.toml
    parallm train --nproc 8 --nnodes 2 --node-rank 1 --rdzv-endpoint HEAD:29500 job.toml
    torchrun --nproc-per-node 8 -m parallm.train job.toml     # the same ranks, torchrun's CLI

Why the agent runs in the `parallm` process (`torch.distributed.launcher.api.launch_agent`,
the function `torchrun` itself calls) rather than as a `torchrun` subprocess:
- our arguments never pass through torchrun's argument parser (which took `--nproc` for an
  ambiguous abbreviation of its `--nproc-per-node` and refused to start);
- a failed rank arrives as a `ChildFailedError` object with every rank's exit code, which becomes
  one line; a subprocess's ~40-line traceback could only be filtered as text from a stream the
  ranks share;
- the agent's log is ours to silence (the ranks print what matters), while rendezvous,
  restarts (`--max-restarts`), signal forwarding and shutdown stay torchrun's own code.

Exit status: 0 when every rank finished (or stopped cleanly on SIGTERM / SIGINT, having saved a
checkpoint), 2 when a rank stopped on a user error, 1 for anything else. The failing rank prints
its own error (a user error once, by rank 0) and records it in torchelastic's error file, so the
launcher can name a failure that only another rank saw.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

from parallm.errors import UserError

# Seconds the agent waits for ranks to stop after passing on SIGTERM / SIGINT (they finish the
# step and save a checkpoint) before it kills them.
SHUTDOWN_TIMEOUT_S = 120
_LOOPBACK = ("localhost", "::1")


def launched_world_size() -> int:
    """The number of processes a launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def launched_local_rank() -> int:
    """This process's rank on its node (0 when run directly)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> tuple[int, int]:
    """(restarts of this node's ranks so far, the most allowed) in an elastic job; (0, 0) outside
    one. A node whose ranks were stopped because another node rejoined does not count that."""
    return (
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")),
    )


def init_distributed(timeout_s: float) -> int:
    """Join the process group the launcher set up (NCCL on GPUs, gloo on CPUs) with a bounded
    collective timeout; returns this process's local rank (its GPU index on the node)."""
    import torch
    import torch.distributed as dist

    local_rank = launched_local_rank()
    if launched_world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return local_rank


def record_error(message: str) -> None:
    """Leave `message` where the agent reads a failed rank's reason (torchelastic's error file,
    when launched by one)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        now = time.time()  # torchelastic keeps whole seconds; ours orders failures finely
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(now), "parallm_time": now}, f)


USER_ERROR_WAIT_S = 30.0


def rank_main(fn: Callable[[], int]) -> int:
    """Run one rank's `fn` with parallm's failure rules: a `UserError` is printed once, by rank
    0, and exits 2 (every rank finds it alike); any other exception is printed by the rank that
    raised it, with its traceback, and exits 1; both are recorded for the launcher."""
    import torch.distributed as dist

    def rank() -> int:
        return dist.get_rank() if dist.is_initialized() else launched_rank()

    try:
        return fn()
    except UserError as e:
        record_error(f"parallm: error: {e}")
        if rank() == 0:
            print(f"parallm: error: {e}", file=sys.stderr, flush=True)
        else:
            # Every rank finds a user error alike, and the first rank to exit makes the agent
            # stop the others: wait for rank 0 to print it (the agent ends this wait).
            time.sleep(USER_ERROR_WAIT_S)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        r = rank()
        print(f"parallm: rank {r} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        record_error(f"{type(e).__name__}: {e}")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a launched rank's process with `code`. A rank of a multi-process job skips the
    interpreter's teardown: its work is done and flushed, and gloo's threads can abort that
    teardown (SIGABRT, "terminate called without an active exception", seen about once in six
    drill runs), which would turn a finished job into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    if launched_world_size() > 1:
        os._exit(code)
    sys.exit(code)


@dataclass(kw_only=True)
class LaunchOptions:
    """Where the ranks of a job run: `nproc` on this node, of `nnodes` nodes meeting at the c10d
    rendezvous `rdzv_endpoint` (HOST:PORT, hosted by node 0); `max_restarts` restarts of every
    node's ranks after a failure. One node with no endpoint gets a private rendezvous on a free
    local port (torchrun's `--standalone`)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0
    standalone: bool = False

    def __post_init__(self) -> None:
        for name, low in (("nproc", 1), ("nnodes", 1), ("max_restarts", 0)):
            value = getattr(self, name)
            if value < low:
                raise UserError(f"--{_flag(name)}: {value} is not valid; must be >= {low}")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(
                f"--node-rank: {self.node_rank} is not valid; must be in 0..{self.nnodes - 1} "
                f"for --nnodes {self.nnodes}"
            )
        if self.standalone and (self.nnodes > 1 or self.rdzv_endpoint):
            raise UserError(
                "--standalone: a private rendezvous on this node; it cannot be combined with "
                "--nnodes > 1 or --rdzv-endpoint"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError(
                f"--rdzv-endpoint: needed with --nnodes {self.nnodes}: HOST:PORT where node 0 "
                "hosts the rendezvous, the same on every node (e.g. 10.0.0.1:29500)"
            )
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise UserError(
                    f"--rdzv-endpoint: {self.rdzv_endpoint!r} is not valid; HOST:PORT with a "
                    "port in 1..65535, e.g. 10.0.0.1:29500"
                )
        if self.rdzv_id is not None and not self.rdzv_id.strip():
            raise UserError("--rdzv-id: an empty id is not valid; the same name on every node")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def needs_agent(self) -> bool:
        """Whether ranks are started by the elastic agent (else the job runs in this process)."""
        return self.world_size > 1 or self.max_restarts > 0

    def describe(self) -> str:
        where = (
            f"node {self.node_rank} of {self.nnodes}, rendezvous {self.rdzv_endpoint}"
            if self.nnodes > 1
            else "this node"
        )
        restarts = f", up to {self.max_restarts} restarts" if self.max_restarts else ""
        return f"{self.nproc} processes on {where} (world size {self.world_size}){restarts}"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host.strip("[]") in _LOOPBACK


def _quiet_agent_log() -> None:
    """The agent's own log (rendezvous, worker exits, its ChildFailedError report) goes nowhere:
    the ranks print their errors and `launch` prints one line."""
    import logging

    log = logging.getLogger("torch.distributed.elastic")
    log.addHandler(logging.NullHandler())
    log.propagate = False


def launch(module: str, args: list[str], opts: LaunchOptions) -> int:
    """Run `python -m module args` on this node's `opts.nproc` ranks under torchrun's elastic
    agent (in this process); the exit status (see the module docstring)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, launch_agent

    private = opts.rdzv_endpoint is None
    endpoint = "127.0.0.1:0" if private else opts.rdzv_endpoint
    host = endpoint.rpartition(":")[0]
    config = LaunchConfig(
        min_nodes=opts.nnodes,
        max_nodes=opts.nnodes,
        nproc_per_node=opts.nproc,
        run_id=opts.rdzv_id or (uuid.uuid4().hex if private else "parallm"),
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        # Node 0 hosts the rendezvous store, the others connect to it: with every node on one
        # machine (a loopback endpoint) each would otherwise take itself for the host.
        rdzv_configs={} if private else {"is_host": opts.node_rank == 0},
        max_restarts=opts.max_restarts,
        start_method="spawn",
        # A loopback rendezvous keeps the ranks' store on loopback too (else: this host's name).
        local_addr=host if _is_loopback(host) else None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    if opts.nproc > 1:  # as torchrun does: N ranks of N threads each would oversubscribe
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The agent of rendezvous rank 0 would otherwise host the ranks' store for every round and
    # keep it: after a restart that one node takes for a membership change (its ranks still
    # alive when the other node rejoins), the nodes' restart counts differ and ranks read the
    # previous round's gloo addresses from it (seen: "connectFullMesh ... Connection refused").
    # Opting out, global rank 0 hosts a fresh store each round.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    _quiet_agent_log()
    try:
        launch_agent(config, sys.executable, ["-u", "-m", module, *args])
    except ChildFailedError as e:
        return _report_failure(e.failures, opts)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        if e.sigval in (signal.SIGTERM, signal.SIGINT):
            print(f"parallm: {name}: the ranks were told to stop at a step boundary", flush=True)
            return 0
        print(f"parallm: stopped by {name}", file=sys.stderr, flush=True)
        return 128 + e.sigval
    except RendezvousError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"parallm: rendezvous at {endpoint} failed: {first}", file=sys.stderr, flush=True)
        return 1
    return 0


def _report_failure(failures: dict, opts: LaunchOptions) -> int:
    """One line for a failed job, naming its root cause; 2 when it was a user error, else 1.

    The root cause is a rank killed by a signal from outside (SIGKILL: the OOM killer, an
    operator), else the rank whose error came first (its peers then fail on the broken
    connection), else one the agent stopped with SIGTERM."""

    def order(item):
        rank, f = item
        data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
        kind = 2 if f.exitcode == -signal.SIGTERM else 0 if f.exitcode < 0 else 1
        return (kind, data.get("parallm_time", f.timestamp), rank)

    rank, root = min(failures.items(), key=order)
    if root.exitcode == 2:
        rank0_printed = failures.get(0) is not None and failures[0].exitcode == 2
        if not rank0_printed:
            message = root.message if isinstance(root.message, str) else ""
            line = message if message.startswith("parallm: error:") else ""
            print(line or f"parallm: error: rank {rank} stopped on a user error", file=sys.stderr)
        return 2
    if root.exitcode < 0:
        what = f"was killed by {signal.Signals(-root.exitcode).name}"
    else:
        what = f"exited with status {root.exitcode} (its error is above)"
    restarts = f" after {opts.max_restarts} restarts" if opts.max_restarts else ""
    print(f"parallm: rank {rank} {what}; the job stopped{restarts}", file=sys.stderr, flush=True)
    return 1
