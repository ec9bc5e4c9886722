"""`parallm bench video` at the tiny shape: one run (seconds) writes a report whose fields hold
and agree with each other (no timing thresholds)."""

from __future__ import annotations

import json

import pytest

from parallm import cli
from parallm.bench import video as bench


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    argv = ["bench", "video", "--shape", "tiny", "--frames", "3", "--height", "12", "--width"]
    argv += ["16", "--batch", "2", "--warmup", "1", "--steps", "2", "--gen-steps", "2"]
    argv += ["--gen-clips", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    return json.loads((out / "report.json").read_text())


def test_report_fields(report):
    assert report["shape"] == "tiny" and report["devices"] == 1 and report["batch"] == 2
    assert report["video"] == {"frames": 3, "height": 12, "width": 16}
    # patch (1, 2, 2): 3 frames x (6 x 8) patches
    assert report["patch_tokens_per_clip"] == 3 * 6 * 8
    assert report["steps_measured"] == 2
    step = report["step_time_s"]
    assert step > 0
    assert report["samples_per_s"] == pytest.approx(2 / step)
    assert report["samples_per_s_per_device"] == pytest.approx(2 / step)
    assert report["patches_per_s"] == pytest.approx(2 * 144 / step)
    assert report["peak_memory_gib"] > 0 and "RSS" in report["memory"]
    gen = report["generation"]
    assert gen["euler_steps"] == 2 and gen["model_calls_per_clip"] == 4
    assert len(gen["clips"]) == 1 and gen["seconds_per_clip"] == gen["clips"][0] > 0
    assert report["machine"]["device"] == "cpu"
    assert all(isinstance(x, float) for x in report["loss_first_last"])


def test_xl_is_refused_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: xl runs")
    from parallm.errors import UserError

    with pytest.raises(UserError, match="for GPUs"):
        bench.main(["--shape", "xl", "--out", str(tmp_path)])
