"""The tensor-parallel group of the serving engine: who the ranks are and how a step reaches them.

Rank 0 is the driver, the process that built the engine: it schedules, samples and detokenizes.
Ranks 1..N-1 are workers that hold a shard of the model and of the KV cache and only run the
model. The driver starts them itself (spawned processes, a file rendezvous in a temporary
directory), or, when it already is one of N processes of an initialized process group (torchrun),
uses those processes instead.

Per step, rank 0 sends two broadcasts; then every rank runs the same forward, whose own
collectives (two all-reduces per layer, one for the embedding, an all-gather of the logits)
need all of them:

  1. a header, int64 (5,): (op, N tokens, B sequences, R logit rows, K block-table entries),
     on a gloo group (`control`), so it can wait while the engine is idle (below);
  2. the inputs, int64 (N + 4B + R + K,): token ids, starts, lengths, LoRA slots, logit rows,
     block-table lengths and the flattened block tables, on the model's group (NCCL on GPUs,
     which moves tensors only, hence tensors rather than a pickled object).

`op` STOP ends the workers. `op` LORA (slot, path length) is followed by the adapter
directory's path as bytes on `control`: every worker reads the adapter and loads its shard of
it into the slot (they share the driver's file system: one machine). Timeouts: the model's group uses `STEP_TIMEOUT`, which bounds every
collective inside a step. A worker waits for the next header on `control`, whose timeout is
`IDLE_TIMEOUT` because a server may legitimately sit idle for hours. A driver that dies never
leaves a worker waiting that long: gloo fails a broadcast at once when its peer's socket closes,
and spawned workers also exit within a second when their parent process goes away. Spawned
workers ignore SIGINT: a Ctrl-C reaches the whole process group, and it is the driver's to handle.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from itertools import chain, islice

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh

from parallm.distributed.parallel_dims import ParallelDims
from parallm.errors import UserError
from parallm.inference.step_inputs import LoadLora, StepInputs

STEP_TIMEOUT = timedelta(minutes=10)
IDLE_TIMEOUT = timedelta(days=7)
_STOP, _STEP, _LORA = 0, 1, 2


class TPGroup:
    """This process's place in the tensor-parallel group. Create with `start` (rank 0, or every
    rank under torchrun); spawned workers get theirs from `_worker_main`."""

    def __init__(
        self,
        *,
        rank: int,
        size: int,
        device: torch.device,
        procs: list[mp.Process] | None = None,
        rendezvous_dir: str | None = None,
    ) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.mesh: DeviceMesh = ParallelDims(tp=size, dp_shard=1, world_size=size).build_mesh(
            device.type
        )["tp"]
        self.group = self.mesh.get_group()
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.procs = procs or []  # the workers this process spawned (rank 0 only)
        self.rendezvous_dir = rendezvous_dir  # set when this process created the world group
        self.closed = False

    @classmethod
    def start(cls, size: int, device_type: str, serve: Callable[..., None], args: tuple) -> TPGroup:
        """Join or create a group of `size` ranks. Spawned workers run `serve(group, *args)`
        (a module-level function) and exit when it returns."""
        if dist.is_initialized():  # launched as one of `size` processes (torchrun)
            if dist.get_world_size() != size:
                raise UserError(
                    f"tensor_parallel_size: {size} does not match the running process group "
                    f"of {dist.get_world_size()} processes; launch {size} processes, or one"
                )
            rank = dist.get_rank()
            return cls(rank=rank, size=size, device=_device(device_type, rank))
        tmp = tempfile.mkdtemp(prefix="parallm-tp-")
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, size, tmp, device_type, os.getpid(), serve, args),
                name=f"parallm-tp-worker-{rank}",
                daemon=True,  # terminated by multiprocessing if the driver exits without close()
            )
            for rank in range(1, size)
        ]
        try:
            for p in procs:
                p.start()
            device = _device(device_type, 0)
            _init_world(0, size, tmp, device_type)
            return cls(rank=0, size=size, device=device, procs=procs, rendezvous_dir=tmp)
        except BaseException:
            _end(procs, grace_s=0)
            if dist.is_initialized():
                dist.destroy_process_group()
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- per step ------------------------------------------------------------------------------

    def send_step(self, step: StepInputs) -> None:
        """Rank 0: broadcast one step's inputs to the workers."""
        if self.closed:
            raise RuntimeError("the tensor-parallel workers were stopped (engine closed)")
        tables = step.block_tables
        n, b, r = len(step.token_ids), len(step.starts), len(step.logit_rows)
        dist.broadcast(
            _header(_STEP, n, b, r, sum(map(len, tables))), group=self.control, group_src=0
        )
        flat = chain(
            step.token_ids,
            step.starts,
            step.lengths,
            step.lora_slots or [-1] * b,
            step.logit_rows,
            map(len, tables),
            chain.from_iterable(tables),
        )
        payload = torch.tensor(list(flat), dtype=torch.long, device=self.device)
        dist.broadcast(payload, group=self.group, group_src=0)

    def send_lora(self, load: LoadLora) -> None:
        """Rank 0: have every worker load an adapter into a LoRA slot (between two steps)."""
        if self.closed:
            raise RuntimeError("the tensor-parallel workers were stopped (engine closed)")
        path = load.path.encode()
        dist.broadcast(_header(_LORA, load.slot, len(path)), group=self.control, group_src=0)
        payload = torch.tensor(list(path), dtype=torch.uint8)
        dist.broadcast(payload, group=self.control, group_src=0)

    def recv_step(self) -> StepInputs | LoadLora | None:
        """A worker: rank 0's next message, a step's inputs or an adapter to load; None when it
        stops the group."""
        header = _header(_STOP)
        dist.broadcast(header, group=self.control, group_src=0)
        op, n, b, r, k = header.tolist()
        if op == _STOP:
            return None
        if op == _LORA:  # n: the slot, b: the path's length in bytes
            path = torch.empty(b, dtype=torch.uint8)
            dist.broadcast(path, group=self.control, group_src=0)
            return LoadLora(n, bytes(path.tolist()).decode())
        payload = torch.empty(n + 4 * b + r + k, dtype=torch.long, device=self.device)
        dist.broadcast(payload, group=self.group, group_src=0)
        values = iter(payload.tolist())

        def take(count: int) -> list[int]:
            return list(islice(values, count))

        ids, starts, lengths, slots = take(n), take(b), take(b), take(b)
        rows, table_lens = take(r), take(b)
        return StepInputs(ids, starts, lengths, [take(m) for m in table_lens], rows, slots)

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks (e.g. KV blocks, which every rank must share)."""
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    # -- shutdown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (rank 0), leave the group, and reap spawned workers. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0:
            try:
                dist.broadcast(_header(_STOP), group=self.control, group_src=0)
            except RuntimeError:  # a worker already died; the ones left are ended below
                pass
        if self.rendezvous_dir is not None:  # this process created the world group
            dist.destroy_process_group()
            shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
        else:
            dist.destroy_process_group(self.control)
        _end(self.procs, grace_s=30)


def _header(op: int, n: int = 0, b: int = 0, r: int = 0, k: int = 0) -> torch.Tensor:
    """(op, N tokens, B sequences, R logit rows, K block-table entries); CPU, for gloo."""
    return torch.tensor([op, n, b, r, k], dtype=torch.long)


def _device(device_type: str, rank: int) -> torch.device:
    """Rank r uses cuda:r on GPUs (made current before NCCL starts); the CPU otherwise."""
    if device_type != "cuda":
        return torch.device(device_type)
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _init_world(rank: int, size: int, rendezvous_dir: str, device_type: str) -> None:
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"file://{rendezvous_dir}/rendezvous",
        rank=rank,
        world_size=size,
        timeout=STEP_TIMEOUT,
    )


def _worker_main(
    rank: int,
    size: int,
    rendezvous_dir: str,
    device_type: str,
    parent_pid: int,
    serve: Callable[..., None],
    args: tuple,
) -> None:
    """A spawned worker: join the group, serve, leave."""
    _exit_with_parent(parent_pid)
    # The driver ends its workers (STOP, or by going away). A terminal's Ctrl-C reaches the whole
    # process group: it would kill a worker mid-step while the driver drains its requests
    # (`parallm serve`), failing them all. SIGTERM keeps its default: multiprocessing ends a
    # daemon child with it (and then waits for it) when the driver exits without `close()`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The ranks share the machine's cores; more threads each would only oversubscribe them.
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    device = _device(device_type, rank)
    _init_world(rank, size, rendezvous_dir, device_type)
    group = TPGroup(rank=rank, size=size, device=device)
    try:
        serve(group, *args)
    finally:
        group.close()
        dist.destroy_process_group()
    # Stopped cleanly: leave now. The interpreter's teardown (freeing the model, torch's
    # finalizers) has nothing to keep, yet on a loaded machine it can outlast the driver's grace
    # period (`close`), which would then kill a worker that had already finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_with_parent(parent_pid: int) -> None:
    """End this process soon after the driver is gone (when it was killed, it sent no STOP)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parallm-tp-parent-watch", daemon=True).start()


def _end(procs: list[mp.Process], *, grace_s: float) -> None:
    """Wait up to `grace_s` for the processes to exit, then kill the ones left."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.pid is None:  # never started
            continue
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
