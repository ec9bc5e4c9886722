"""Multi-node for real: two `parallm train` agents (torchrun's elastic agent, one per "node"),
2 processes each, meeting at a c10d rendezvous on 127.0.0.1; all traffic stays on loopback
(the rendezvous, the ranks' store and gloo, pinned to `lo`).

- the 2 x 2 job's losses equal one process's (data parallel over 4 ranks, FSDP);
- killing one node (its agent and ranks) ends the other node's job in bounded time, with one
  line naming the failed rank and exit 1;
- with `--max-restarts 1`, killing one rank makes both agents restart their ranks, which resume
  from the newest checkpoint (`--resume auto`, the default) and finish: the losses of every step
  still equal one process's.

This is the README's multi-node launch, on one machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parallel_jobs import random_token_job

from parallm.config import JobConfig, config_to_toml
from parallm.testing.timeouts import scaled
from tests.serve_helpers import free_port

STEPS = 12  # checkpoints at 4 and 8: enough to kill at 4 and resume; fewer steps keep CI short


def _job(out: Path, *extra: str) -> JobConfig:
    return random_token_job(
        out,
        "--train.eps=1e-6",  # see tests/parallel_jobs.py
        "--train.log_every=1",
        "--checkpoint.every=4",
        *extra,
        steps=STEPS,
        samples=4000,
        vocab=96,
        batch=8,
        warmup=1,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """The losses of the same job on one process."""
    from parallm.train.trainer import Trainer

    out = tmp_path_factory.mktemp("one")
    return [r["loss"] for r in Trainer(_job(out)).fit()]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (an agent's ranks run in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    """Two nodes of 2 processes each: `parallm train` agents on one c10d rendezvous."""

    def __init__(self, tmp: Path, *options: str) -> None:
        tmp.mkdir()
        self.out = tmp / "out"
        job = tmp / "job.toml"
        job.write_text(config_to_toml(_job(self.out)))
        port = free_port()
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # gloo on loopback, not this host's name
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        for rank in range(2):
            log = tmp / f"node{rank}.log"
            self.logs.append(log)
            self.nodes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "parallm.cli", "train", str(job), "--nproc", "2"]
                    + ["--nnodes", "2", "--node-rank", str(rank)]
                    + ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode"]
                    + list(options),
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )

    def wait(self, node: int, timeout: float) -> int:
        try:
            return self.nodes[node].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {node} still running after {timeout:.0f} s:\n{self.log(node)}")

    def log(self, node: int) -> str:
        return self.logs[node].read_text()

    def losses(self) -> list[float]:
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    def wait_for(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if any(n.poll() is not None for n in self.nodes):
                pytest.fail(f"a node ended early:\n{self.log(0)}\n{self.log(1)}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {path.name} after {timeout:.0f} s")
            time.sleep(0.01)

    def close(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                _kill(_children(node.pid))
                node.kill()
                node.wait()


@pytest.fixture
def cluster(tmp_path):
    made: list[Cluster] = []

    def make(*options: str) -> Cluster:
        made.append(Cluster(tmp_path / f"cluster{len(made)}", *options))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_two_nodes_train_like_one_process(cluster, reference):
    c = cluster()
    codes = [c.wait(node, scaled(240)) for node in (0, 1)]
    assert codes == [0, 0], c.log(0) + c.log(1)
    assert "world size 4" in c.log(0)
    assert c.losses() == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_a_lost_node_ends_the_other_and_restarts_resume(cluster, reference):
    # Without restarts: node 1 (its agent and both ranks) is killed while training; node 0's
    # ranks fail on the broken connection and its agent ends the job with one line.
    c = cluster()
    c.wait_for(c.out / "checkpoints" / "step_00000004", scaled(240))
    _kill([*_children(c.nodes[1].pid), c.nodes[1].pid])
    start = time.monotonic()
    assert c.wait(0, scaled(120)) == 1
    assert time.monotonic() - start < scaled(120)
    last = c.log(0).strip().splitlines()[-1]
    assert last.startswith("parallm: rank ") and last.endswith("the job stopped"), c.log(0)
    assert "ChildFailedError" not in c.log(0)
    c.close()

    # With --max-restarts 1: one rank of node 1 is killed; both agents restart their ranks,
    # which resume from the newest checkpoint of this run and finish it.
    c = cluster("--max-restarts", "1")
    c.wait_for(c.out / "checkpoints" / "step_00000004", scaled(240))
    rank = _children(c.nodes[1].pid)[0]
    os.kill(rank, signal.SIGKILL)
    codes = [c.wait(node, scaled(300)) for node in (0, 1)]
    assert codes == [0, 0], c.log(0) + c.log(1)
    logs = c.log(0) + c.log(1)
    assert "parallm: restart 1 of at most 1" in logs
    assert "resumed from" in logs
    assert c.losses() == pytest.approx(reference, rel=1e-5, abs=1e-6)
