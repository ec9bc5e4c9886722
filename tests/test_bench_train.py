"""`parallm bench train --task sft`: the command at a tiny size writes a report whose fields and
relations hold (no timing thresholds), the ratios are what the runs say, and bad options fail in
one line before anything runs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from parallm import cli
from parallm.bench import train as bench

# Shared by the tests below: one run of every engine (fresh processes, about a minute on 2 CPUs).
ARGS = [
    "bench", "train", "--task", "sft", "--lora", "4", "--lora-targets", "q_proj,v_proj,down_proj",
    "--shape", "tiny", "--seq-len", "128", "--batch", "2", "--warmup", "1", "--steps", "1",
    "--rounds", "1", "--threads", "1", "--turns", "1:2", "--words", "2:16",
]  # fmt: skip


@pytest.fixture(scope="module")
def sft_report(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench") / "out"
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_sft_report_fields_and_relations(sft_report):
    out, report = sft_report
    assert report["task"] == "sft" and report["device"] == "cpu"
    assert report["lora"] == {"r": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "down_proj"]}
    w = report["workload"]
    assert w["conversations"] == 2 * (1 + 1)  # batch x (warmup + steps)
    lengths = w["conversation_tokens"]
    assert 0 < lengths["min"] <= lengths["median"] <= lengths["max"]
    # Packing puts several conversations in a row: fewer, fuller rows with more labels each.
    assert w["rows_packed"] < w["rows_padded"] == w["conversations"]
    assert w["fill_padded"] < w["fill_packed"] <= 1
    assert 0 < w["label_share_padded"] < w["label_share_packed"] < 1
    assert set(report["engines"]) == {"full", "lora", "peer", "padded"}
    for name, engine in report["engines"].items():
        assert engine["what"] == bench.SFT_ENGINES[name]
        (run,) = engine["runs"]
        assert run["engine"] == name and run["threads"] == 1
        assert set(bench.METRICS) <= set(engine["median"]) and engine["median"]["tokens_per_s"] > 0
        assert run["tokens_per_step"] == 2 * 128
        assert 0 < run["label_tokens_per_s"] < run["tokens_per_s"]
        assert run["peak_memory_mib"] >= run["base_memory_mib"] > 0
    runs = {name: engine["runs"][0] for name, engine in report["engines"].items()}
    # The same weights, rows and labels, and adapters that start at zero (B = 0): the first
    # loss is the base model's in all three.
    assert runs["lora"]["loss_first"] == pytest.approx(runs["full"]["loss_first"], abs=1e-4)
    assert runs["peer"]["loss_first"] == pytest.approx(runs["full"]["loss_first"], abs=1e-4)
    # The same adapter: as many trainable parameters in parallm as in peft.
    assert runs["lora"]["trainable_params"] == runs["peer"]["trainable_params"]
    assert runs["lora"]["trainable_params"] < runs["full"]["trainable_params"]
    ratios = report["ratios"]
    assert ratios["lora_vs_peer"]["tokens_per_s"]["per_round"] == [
        pytest.approx(runs["lora"]["tokens_per_s"] / runs["peer"]["tokens_per_s"])
    ]
    packing = ratios["packing_vs_padding"]["label_tokens_per_s"]
    assert packing["median"] == pytest.approx(
        runs["lora"]["label_tokens_per_s"] / runs["padded"]["label_tokens_per_s"]
    )
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    assert (out / "report.png").exists() == bool(importlib.util.find_spec("matplotlib"))


def test_report_takes_per_round_ratios_and_medians():
    def run(tok_s, peak):
        return {k: 1.0 for k in bench.METRICS} | {
            "tokens_per_s": tok_s,
            "tokens_per_cpu_s": tok_s / 2,
            "label_tokens_per_s": tok_s / 4,
            "label_tokens_per_cpu_s": tok_s / 8,
            "peak_memory_mib": peak,
        }

    runs = {
        "full": [run(100, 500), run(90, 510), run(110, 490)],
        "lora": [run(130, 400), run(60, 400), run(140, 400)],
        "peer": [run(100, 400), run(40, 500), run(100, 500)],
        "padded": [run(65, 400), run(30, 400), run(70, 400)],
    }
    report = bench.sft_report(runs, {})
    assert report["engines"]["lora"]["median"]["tokens_per_s"] == 130
    tok = report["ratios"]["lora_vs_peer"]["tokens_per_s"]
    # Per round, side by side: 1.3, 1.5, 1.4 (the ratio of the medians would be 1.3).
    assert tok["per_round"] == pytest.approx([1.3, 1.5, 1.4]) and tok["median"] == 1.4
    assert report["ratios"]["lora_vs_peer"]["peak_memory_mib"]["median"] == pytest.approx(0.8)
    assert report["ratios"]["packing_vs_padding"]["label_tokens_per_s"]["median"] == 2.0
    targets = report["targets"]
    assert targets["lora_vs_peer.tokens_per_s >= 1.2"] == {"median": 1.4, "met": True}
    assert targets["lora_vs_peer.peak_memory_mib <= 1.0"]["met"] is True
    assert targets["packing_vs_padding.label_tokens_per_s >= 1.5"]["met"] is True


def test_synthetic_conversations_are_seeded_and_mixed():
    a = bench.synthetic_conversations(20, (1, 3), (2, 30), seed=1)
    assert a == bench.synthetic_conversations(20, (1, 3), (2, 30), seed=1)
    assert a != bench.synthetic_conversations(20, (1, 3), (2, 30), seed=2)
    assert all(c[0]["role"] == "system" and c[-1]["role"] == "assistant" for c in a)
    assert len({len(c) for c in a}) > 1 and len({len(m["content"]) for c in a for m in c}) > 10


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nproc", "2"], "--nproc"),
        (["--lora", "-1"], "--lora"),
        (["--rounds", "0"], "--rounds"),
        (["--batch", "4", "--micro-batch", "3"], "--micro-batch"),
        (["--words", "9:3"], "--words"),
        (["--shape", "nope"], "--shape"),
    ],
)
def test_bad_options_fail_in_one_line(capsys, tmp_path, extra, message):
    argv = ["bench", "train", "--task", "sft", "--out", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing was made


def test_a_zero_denominator_has_no_ratio():
    """A tiny run's training memory can round to 0 MiB: that round has no ratio (None), the
    median is over the others, and the report still prints (CI saw a ZeroDivisionError)."""
    runs = {"a": [{"m": 2.0}, {"m": 3.0}], "b": [{"m": 0.0}, {"m": 1.5}]}
    assert bench.ratio(runs, "a", "b", "m") == {"per_round": [None, 2.0], "median": 2.0}
    assert bench.ratio({"a": [{"m": 1.0}], "b": [{"m": 0.0}]}, "a", "b", "m")["median"] is None
    assert bench._times(None) == "n/a"
