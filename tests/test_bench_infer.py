"""`parallm bench infer` against a peer engine: the peer's protocol (a fake peer Python that
speaks it, one round crashing), the report's arithmetic, and the one-line errors before anything
runs. vLLM itself is not in the test environment: the test that runs it is skipped unless
PARALLM_PEER_PYTHON names a Python that has it (`make bench-peers`)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from parallm.bench import infer
from parallm.bench import serve as bench_serve
from parallm.errors import UserError

FAKE_PEER = """#!{python}
# A peer Python that speaks peer_worker.py's protocol without vLLM: round 0 answers (greedy
# tokens all 0), round 1 crashes.
import json, sys
from pathlib import Path
if sys.argv[1] == "-c":  # the probe: "can you import vllm?"
    sys.exit(0)
run = json.loads(Path(sys.argv[2]).read_text())
if run["round"] == 1:
    print("RuntimeError: the fake peer crashed", file=sys.stderr)
    sys.exit(1)
n = run["greedy_n"]
result = {{"engine": run["engine"], "version": "fake", "mode": run["mode"], "round": run["round"],
          "threads": run["threads"], "seconds": 2.0, "cpu_s": 4.0,
          "output_tokens": sum(run["outputs"]), "input_tokens": sum(map(len, run["prompts"])),
          "greedy": [[0] * o for o in run["outputs"][:n]], "load_1min": [0.0, 0.0]}}
(Path(run["out"]) / "result.json").write_text(json.dumps(result))
"""


def fake_peer(tmp_path: Path) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(FAKE_PEER.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tests.hf_models import save_hf_model_with_tokenizer

    d = tmp_path_factory.mktemp("bench-infer") / "model"
    save_hf_model_with_tokenizer("llama3", d)
    return d


def test_a_peer_that_crashes_is_a_failed_round_and_parallm_figures_still_come_out(
    tmp_path, tiny_model, capsys
):
    """Two interleaved rounds in fresh processes; the peer answers round 1 and crashes in
    round 2: its figures are round 1's, round 2 is listed as failed with the peer's last line,
    parallm has both rounds, the ratio only round 1; greedy equality is counted (the fake's
    all-zero tokens match none of parallm's)."""
    from parallm.cli import main

    out = tmp_path / "out"
    argv = ["bench", "infer", "--model", str(tiny_model), "--num-requests", "3"]
    argv += ["--input-len", "4:6", "--output-len", "3:5", "--peer", "vllm", "--rounds", "2"]
    argv += ["--peer-python", str(fake_peer(tmp_path)), "--threads", "1", "--greedy-check", "2"]
    assert main(argv + ["--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["peer"] == "vllm" and r["rounds"] == 2 and r["threads"] == 1
    assert all(x is not None for x in r["parallm"]["per_round"]["output_tokens_per_s"])
    assert r["vllm"]["per_round"]["seconds"] == [2.0, None]
    [failed] = r["vllm"]["failed_rounds"]
    assert failed["round"] == 1 and "the fake peer crashed" in failed["error"]
    ratio = r["ratio_output_tokens_per_s"]
    assert ratio["per_round"][1] is None and ratio["median"] == ratio["per_round"][0]
    assert r["greedy_equality"]["requests"] == 2
    printed = capsys.readouterr().out
    assert "vllm round 2 FAILED" in printed and "greedy tokens equal on" in printed
    # Each engine wrote its own run.json; parallm's ran in a process of its own.
    run = json.loads((out / "round0-parallm" / "run.json").read_text())
    assert run["engine"] == "parallm" and run["greedy_n"] == 2
    assert (out / "report.png").exists() or "matplotlib is not installed" in printed


@pytest.mark.parametrize("python", ["/nonexistent/python", sys.executable])
def test_peer_vllm_without_a_usable_python_is_one_line_before_anything_runs(
    tmp_path, capsys, python
):
    """A missing Python and one without vllm (this test's own) both answer with how to create
    the environment, exit 2, and nothing is written."""
    from parallm.cli import main

    out = tmp_path / "out"
    argv = ["bench", "infer", "--peer", "vllm", "--peer-python", python, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make bench-peers" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--peer", "sglang"], "--peer: 'sglang' is not valid"),
        (["--rounds", "0"], "--rounds: 0 is not valid"),
        (["--peer-python", "x"], "only --peer vllm"),
        (["--greedy-check", "-1"], "--greedy-check: -1"),
    ],
)
def test_bad_options_are_named(argv, match):
    with pytest.raises(UserError, match=match):
        infer.check_args(infer.parser().parse_args(argv))


def test_latency_defaults_to_a_128_token_prompt_and_output():
    args = infer.parser().parse_args(["--latency"])
    infer.check_args(args)
    assert args.input_len == (128, 128) and args.output_len == (128, 128)


def test_throughput_report_medians_ratios_and_greedy_equality():
    def ok(k, seconds, cpu, greedy):
        return {"round": k, "version": "v", "seconds": seconds, "cpu_s": cpu, "output_tokens": 100,
                "input_tokens": 50, "greedy": greedy}  # fmt: skip

    runs = {
        "parallm": [ok(0, 1.0, 2.0, [[1, 2], [3, 4]]), ok(1, 2.0, 2.0, []), ok(2, 1.0, 2.0, [])],
        "vllm": [
            ok(0, 2.0, 4.0, [[1, 2], [3, 5]]),
            {"round": 1, "failed": "boom", "log": "l"},
            ok(2, 3.0, 4.0, []),
        ],  # fmt: skip
    }
    r = infer.throughput_report(runs, "vllm")
    assert r["parallm"]["output_tokens_per_s"] == 100.0
    assert r["parallm"]["total_tokens_per_s"] == 150.0
    assert r["vllm"]["output_tokens_per_s"] == pytest.approx((50 + 100 / 3) / 2)
    assert r["ratio_output_tokens_per_s"] == {"per_round": [2.0, None, 3.0], "median": 2.5}
    assert r["ratio_output_tokens_per_cpu_s"] == 2.0
    assert r["greedy_equality"] == {
        "requests": 2, "equal": 1, "first_difference": [None, 1], "tokens_compared": 4
    }  # fmt: skip


def test_tree_cpu_seconds_counts_this_process():
    from parallm.bench.peers.peer_worker import tree_cpu_seconds

    before = tree_cpu_seconds()
    sum(i * i for i in range(2_000_000))
    assert tree_cpu_seconds() > before


def test_the_peer_script_imports_nothing_of_parallm():
    """peer_worker.py runs in the peer's Python, which need not have parallm."""
    text = Path(infer.PEER_WORKER).read_text()
    assert "parallm" not in "".join(
        line for line in text.splitlines() if line.lstrip().startswith(("import ", "from "))
    )


def test_bench_serve_launch_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="--url .* or --launch"):
        bench_serve.parse_config([])
    with pytest.raises(UserError, match="--peer-python: .* needs --launch"):
        bench_serve.parse_config(["--url", "http://127.0.0.1:1", "--peer-python", "p"])
    with pytest.raises(UserError, match="--launch: .* not a model directory"):
        bench_serve.parse_config(["--launch", str(tmp_path)])


def test_bench_serve_comparison_per_rate():
    def rep(rate, ttft, tpot):
        return {"rate": rate, "ttft_ms": {"median": ttft}, "tpot_ms": {"median": tpot}}

    one_round = {"parallm": [[rep(4.0, 10.0, 5.0)]], "vllm": [[rep(4.0, 20.0, 5.0)]]}
    rows = bench_serve.comparison(one_round)
    assert rows == [{"rate": 4.0, "parallm_ttft_ms": 10.0, "parallm_tpot_ms": 5.0,
                     "vllm_ttft_ms": 20.0, "vllm_tpot_ms": 5.0, "ttft_parallm_over_vllm": 0.5,
                     "tpot_parallm_over_vllm": 1.0, "ttft_parallm_over_vllm_rounds": [0.5],
                     "tpot_parallm_over_vllm_rounds": [1.0]}]  # fmt: skip
    assert "TTFT" in bench_serve.format_comparison(rows)


@pytest.mark.skipif(
    not os.environ.get("PARALLM_PEER_PYTHON"),
    reason="needs a Python with vLLM: PARALLM_PEER_PYTHON=.venv-peers/bin/python (make bench-peers)",
)
def test_vllm_greedy_tokens_equal_parallm(tmp_path):
    """The real peer on the 20m shape (vLLM's CPU attention has no head_dim 8 kernel, the tiny
    test model's): float32 greedy tokens equal parallm's."""
    argv = ["--shape", "20m", "--num-requests", "4", "--input-len", "4:16"]
    argv += ["--output-len", "4:8", "--peer", "vllm", "--rounds", "1", "--peer-eager"]
    argv += ["--peer-python", os.environ["PARALLM_PEER_PYTHON"], "--out", str(tmp_path)]
    assert infer.main(argv) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert not r["vllm"]["failed_rounds"], r["vllm"]["failed_rounds"]
    assert r["greedy_equality"]["equal"] == r["greedy_equality"]["requests"] == 4
