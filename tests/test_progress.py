"""Progress: the training lines off a terminal (which steps, what each says), the bar on one, and
long loads (weights, tokenizing) shown only when they take long. A fake clock, never real time."""

from __future__ import annotations

import io
import json
import re

import pytest

from parallm.train.metrics import MetricsLog, Progress
from parallm.utils import progress as load
from parallm.utils.progress import LineProgress, format_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(step: int, loss: float | None = None, **extra) -> dict:
    loss = 10.0 - step if loss is None else loss
    return {"step": step, "loss": loss, "lr": 3e-4, "tokens_per_s": 1234.4, **extra}


def _run(total, every, *, initial=0, seconds_per_step=1.0, quiet_s=60.0, evals=()):
    out, clock = io.StringIO(), Clock()
    progress = Progress(
        total, initial, every, stream=out, terminal=False, quiet_s=quiet_s, clock=clock
    )
    for step in range(initial + 1, total + 1):
        clock.now += seconds_per_step
        extra = {"eval_loss": 1.5} if step in evals else {}
        progress.update(_record(step, **extra))
    progress.close()
    return out.getvalue().splitlines()


def _steps(lines: list[str]) -> list[int]:
    return [int(re.match(r"step +(\d+)/", line).group(1)) for line in lines]


def test_a_line_every_log_every_steps_plus_the_first_the_last_and_evaluations():
    lines = _run(10, 3, evals=(5,))
    assert _steps(lines) == [1, 3, 5, 6, 9, 10]


def test_each_line_says_step_loss_lr_throughput_elapsed_and_eta():
    lines = _run(10, 3)
    # Step 3 at 3 s: losses 8 and 7 since the line of step 1; 7 steps to go at 1 s each.
    assert lines[1] == (
        "step  3/10 | loss 7.0000 | lr 3.00e-04 | 1234 tok/s | mean loss 7.5000 | "
        "0:03 elapsed, ETA 0:07"
    )


def test_default_is_a_line_per_step():
    from parallm.config import TrainConfig

    assert _steps(_run(4, TrainConfig().log_every)) == [1, 2, 3, 4]


def test_a_slow_job_is_never_silent_for_long():
    # 25 s a step, a line every 100 steps asked: one anyway once 60 s passed since the last.
    lines = _run(10, 100, seconds_per_step=25.0, quiet_s=60.0)
    assert _steps(lines) == [1, 4, 7, 10]
    assert lines[1].endswith("1:40 elapsed, ETA 2:30")


def test_resumed_run_counts_eta_from_its_own_steps():
    lines = _run(10, 5, initial=6, seconds_per_step=2.0)
    assert _steps(lines) == [7, 10]
    assert lines[0].endswith("0:02 elapsed, ETA 0:06")  # 3 steps left at 2 s


def test_other_ranks_print_nothing():
    out = io.StringIO()
    progress = Progress(5, 0, 1, enabled=False, stream=out, terminal=False)
    for step in range(1, 6):
        progress.update(_record(step))
    progress.close()
    assert out.getvalue() == ""


def test_terminal_gets_a_bar_with_loss_and_throughput():
    out = io.StringIO()
    progress = Progress(4, 0, 1, stream=out, terminal=True)
    for step in range(1, 5):
        progress.update(_record(step, loss=2.0))
    progress.close()
    text = out.getvalue()
    assert "4/4" in text and "loss 2.0000, lr 3.00e-04, 1234 tok/s" in text
    assert not re.search(r"^step ", text, re.M)  # the bar, not the lines


def test_load_lines_only_after_the_delay_then_at_most_every_so_often():
    out, clock = io.StringIO(), Clock()
    quick = LineProgress("loading m", 4, "tensors", stream=out, delay_s=2, clock=clock)
    for _ in range(4):
        clock.now += 0.4
        quick.update()
    quick.close()
    assert out.getvalue() == ""  # 1.6 s in all: a small load stays quiet

    slow = LineProgress("reading", 100 * 2**20, "B", stream=out, delay_s=2, every_s=30, clock=clock)
    for _ in range(10):
        clock.now += 10
        slow.update(10 * 2**20)
    slow.close()
    assert out.getvalue().splitlines() == [
        "reading: 10.0 MiB/100.0 MiB (10%), 0:10 elapsed, ETA 1:30",
        "reading: 40.0 MiB/100.0 MiB (40%), 0:40 elapsed, ETA 1:00",
        "reading: 70.0 MiB/100.0 MiB (70%), 1:10 elapsed, ETA 0:30",
        "reading: 100.0 MiB/100.0 MiB (100%), 1:40 elapsed",
    ]


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.6, 61, 3600, 3725)] == [
        "0:00",
        "1:00",
        "1:01",
        "1:00:00",
        "1:02:05",
    ]


@pytest.fixture
def no_delay(monkeypatch):
    """Loads in tests are quick; without the delay they show their lines (stderr is no tty)."""
    monkeypatch.setattr(load, "DELAY_S", 0.0)


def test_loading_weights_reports_every_tensor(no_delay, tmp_path, capsys):
    from hf_models import save_hf_model

    from parallm.models.hf import load_pretrained

    save_hf_model("llama3", tmp_path / "m")
    model = load_pretrained(tmp_path / "m")
    n = len(dict(model.named_parameters()))
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"loading m: {n}/{n} tensors (100%)")


def test_tokenizing_reports_the_bytes_read(no_delay, tmp_path, capsys):
    from parallm.tokenizer import train_bpe_tokenizer
    from parallm.train.data import tokenize_files

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text("def f(x):\n    return x + 1\n" * (i + 1))
    tok = train_bpe_tokenizer(iter(["def f(x): return x"]), 300)
    tokenize_files(files, tok, "text")
    total = sum(f.stat().st_size for f in files)
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"tokenizing 3 files: {total} B/{total} B (100%)")


def test_metrics_log_on_resume_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    """A kill in the middle of writing a line leaves half a JSON object at the end of
    metrics.jsonl; the resumed run drops it (and every step after its checkpoint), then goes on
    appending, rather than failing to parse the file."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    log = MetricsLog(tmp_path, resume_step=2)
    log.write({"step": 3, "loss": 2.25})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
