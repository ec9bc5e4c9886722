"""Training tasks: the typed batch, the plug-in registry, and a loss normalised by the global count
of counted tokens (the multi-process side is `test_parallel_equivalence.py`'s masked layouts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parallel_jobs import MASKED, assert_weights_close, job, make_corpus, weights

from parallm.config import JobConfig, TaskConfig, load_config
from parallm.errors import UserError
from parallm.train.tasks import IGNORE_INDEX, Batch, make_task, task_names
from parallm.train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_masked_loss_is_the_mean_over_counted_tokens(corpus, tmp_path):
    data, tok = corpus
    trainer = Trainer(job(data, tok, tmp_path, *MASKED, "--train.micro_batch_size=2"))
    batch = trainer.task.batch(trainer.data.next_rows())
    counted = batch.loss_mask.sum().item()
    assert 0 < counted < batch.labels.numel()  # some labels are masked
    model = trainer.model.parts[0]
    with torch.no_grad():
        logits = model(
            batch.input_ids, batch.position_ids, batch.document_ids, attention=batch.attention
        )
        expected = F.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX
        )
    # Four micro-batches of 2 rows hold different counts; the step still gives the global mean.
    counts = [b.loss_mask.sum().item() for b in batch.split(2)]
    assert len(set(counts)) > 1
    loss = trainer.runner.forward_backward(batch.split(2))
    assert loss == pytest.approx(expected.item(), rel=1e-6)


def test_sparse_labels_give_data_parallel_slices_very_different_counts(corpus, tmp_path):
    """The masked layout job really is uneven: the two halves of a global batch (what dp=2
    ranks hold) differ by more than 2x in counted tokens on some step."""
    data, tok = corpus
    trainer = Trainer(job(data, tok, tmp_path, *MASKED))
    ratios = []
    for _ in range(5):
        mask = trainer.task.batch(trainer.data.next_rows()).loss_mask
        halves = [h.sum().item() for h in mask.chunk(2)]
        ratios.append(max(halves) / max(1, min(halves)))
    assert max(ratios) > 2, ratios


def test_accumulation_with_uneven_masks_equals_one_batch(corpus, tmp_path):
    data, tok = corpus
    one = Trainer(job(data, tok, tmp_path / "one", *MASKED, "--train.micro_batch_size=8"))
    many = Trainer(job(data, tok, tmp_path / "many", *MASKED, "--train.micro_batch_size=1"))
    got, ref = many.fit(), one.fit()
    torch.testing.assert_close(
        [r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5, atol=0
    )
    assert_weights_close(weights(tmp_path / "many"), weights(tmp_path / "one"))


def test_batch_rows_and_tokens():
    ids = torch.arange(12).view(3, 4)
    batch = Batch(ids, ids + 1, extras={"ref": torch.tensor([0.5, 1.5, 2.5])})
    parts = batch.split(2)
    assert [p.rows for p in parts] == [2, 1]
    assert parts[1].extras["ref"].tolist() == [2.5]
    assert torch.equal(parts[1].input_ids, ids[2:])
    assert torch.equal(batch.positions(), torch.arange(4).expand(3, 4))
    halves = batch.map_tokens(lambda t: t[:, :2])
    assert halves.labels.shape == (3, 2) and halves.extras["ref"].shape == (3,)


def test_task_registry_and_bad_task_fields(corpus, tmp_path):
    assert {"pretrain", "test_sparse_labels"} <= set(task_names())
    with pytest.raises(
        UserError, match="task.name: 'nope' is not valid; valid: dpo, flow, grpo, pretrain"
    ):
        load_config(JobConfig, None, ["--task.name=nope"])
    with pytest.raises(UserError, match="task.attention: 'bidirectional' is not valid"):
        TaskConfig(attention="bidirectional")
    with pytest.raises(UserError, match="task.name"):
        make_task(_Named("nope"))
    cfg = load_config(
        JobConfig,
        None,
        [
            "--data.random_tokens=4096",
            "--model.vocab_size=64",
            "--task.attention=document",
            f"--output.dir={tmp_path}",
        ],
    )
    with pytest.raises(UserError, match="task.attention: 'document' needs a tokenizer"):
        Trainer(cfg)


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def _records(rank: int, world: int, data, tok, out, extra):
    records = Trainer(job(data, tok, out, *extra)).fit()
    return [(r["loss"], r.get("eval_loss")) for r in records] if rank == 0 else None


@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_held_out_loss_under_pipeline_schedules(corpus, tmp_path, schedule):
    """Evaluation runs forward only (torch's V schedules run their step and drop the
    gradients): the held-out losses, the training losses and the weights equal one process."""
    from parallm.testing.distributed import run_distributed

    data, tok = corpus
    extra = ("--data.eval_fraction=0.2", "--train.eval_every=2")
    ref = _records(0, 1, data, tok, tmp_path / "one", extra)
    assert [e is not None for _, e in ref] == [False, True, False, True, True]
    pp = ["--parallel.pp=2", "--parallel.dp_shard=1", f"--parallel.pp_schedule={schedule}"]
    if schedule == "zero_bubble":
        pp += ["--train.micro_batch_size=4", "--parallel.pp_microbatches=4"]
    got = run_distributed(_records, 2, tmp_path / "rdzv", data, tok, tmp_path / "pp", (*extra, *pp))
    flat = [x for pair in got[0] for x in pair if x is not None]
    torch.testing.assert_close(
        flat, [x for pair in ref for x in pair if x is not None], rtol=1e-5, atol=0
    )
    assert_weights_close(weights(tmp_path / "pp"), weights(tmp_path / "one"))
