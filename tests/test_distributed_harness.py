"""The multi-process test helper: gloo, file rendezvous, results and failures per rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallm.testing.distributed import DistributedFailure, run_distributed
from parallm.testing.timeouts import scaled


def _all_reduce(rank: int, world_size: int, base: float) -> list[float]:
    t = torch.tensor([base + rank, 1.0])
    dist.all_reduce(t)
    out = torch.empty(world_size, dtype=torch.long)
    dist.all_to_all_single(out, torch.full((world_size,), rank, dtype=torch.long))
    return [*t.tolist(), out.tolist(), dist.get_backend()]


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait forever without the collective timeout


def test_collectives_on_four_gloo_processes(tmp_path):
    results = run_distributed(_all_reduce, 4, tmp_path, 10.0)
    assert results == [[46.0, 4.0, [0, 1, 2, 3], "gloo"]] * 4


def test_a_failing_rank_is_reported_not_hung(tmp_path):
    with pytest.raises(DistributedFailure, match="rank 1:(.|\n)*rank one is broken"):
        run_distributed(_fail_on_rank_one, 2, tmp_path, timeout_s=scaled(5))
