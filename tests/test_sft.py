"""Supervised fine-tuning on conversations: assistant-only masks (against `transformers`' own
assistant mask), packing that equals separate conversations, overlong rules, bad rows, and a
training job on one and two processes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parallel_jobs import assert_weights_close, weights

from parallm.config import JobConfig, TaskConfig, load_config
from parallm.errors import UserError
from parallm.models.build import init_weights
from parallm.models.llama.model import ModelArgs, Transformer
from parallm.testing.distributed import run_distributed
from parallm.tokenizer import Tokenizer, save_tokenizer_dir, train_bpe_tokenizer
from parallm.train.tasks import make_task
from parallm.train.tasks.sft import tokenize_conversation
from parallm.train.trainer import Trainer

# ChatML in which the newline after a turn opens the next one, so that an assistant turn is
# exactly what it adds to the conversation; MARKED has {% generation %} blocks around it.
PLAIN = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{{ m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MARKED = PLAIN.replace(
    "{{ m['content'] + '<|im_end|>' }}",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}",
)
STRICT = MARKED.replace(
    "{% for m in messages %}",
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ raise_exception('this template has no tool role') }}{% endif %}",
)

TURNS = [
    ("What is 2 + 3?", "5"),
    ("And 7 * 6?", "42, since seven sixes are forty-two."),
    ("Name a prime.", "Seven is prime."),
]


def conversation(i: int) -> list[dict]:
    msgs = [{"role": "system", "content": "Answer briefly."}]
    for q, a in TURNS[: 1 + i % 3]:
        msgs += [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]
    return msgs


def tokenizer_dir(path: Path, template: str) -> Path:
    texts = [json.dumps(conversation(i)) for i in range(20)] + ["<|im_start|><|im_end|>"] * 5
    tok = train_bpe_tokenizer(iter(texts), 400)
    tok.config["chat_template"] = template
    save_tokenizer_dir(tok, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sft")
    tok = tokenizer_dir(root / "tok", MARKED)
    (root / "data").mkdir()
    with (root / "data" / "chat.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": conversation(i)}) + "\n")
    with (root / "data" / "pc.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}"}) + "\n")
    return root / "data", tok


@pytest.mark.parametrize("i", [0, 1, 2])
def test_assistant_mask_equals_transformers_generation_mask(tmp_path, i):
    from transformers import AutoTokenizer

    d = tokenizer_dir(tmp_path, MARKED)
    ref = AutoTokenizer.from_pretrained(d)
    out = ref.apply_chat_template(
        conversation(i), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = tokenize_conversation(Tokenizer.from_dir(d), conversation(i), "row")
    assert ids.tolist() == out["input_ids"]
    assert mask.tolist() == out["assistant_masks"]
    assert 0 < mask.sum() < len(mask)


def test_turn_by_turn_spans_equal_the_generation_blocks(tmp_path):
    plain = Tokenizer.from_dir(tokenizer_dir(tmp_path / "plain", PLAIN))
    marked = Tokenizer.from_dir(tokenizer_dir(tmp_path / "marked", MARKED))
    for i in range(3):
        a = tokenize_conversation(plain, conversation(i), "row")
        b = tokenize_conversation(marked, conversation(i), "row")
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()


def _model(vocab: int) -> Transformer:
    model = Transformer(
        ModelArgs(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64
        )
    )
    init_weights(model, 0)
    return model


@pytest.mark.parametrize("packing", [True, False])
def test_packed_rows_give_the_loss_of_separate_conversations(data, packing):
    files, tok_dir = sorted(data[0].iterdir()), data[1]
    tok = Tokenizer.from_dir(tok_dir)
    task = make_task(TaskConfig(name="sft", packing=packing), tokenizer=tok)
    cfg = load_config(JobConfig, None, ["--data.seq_len=255"]).data
    ds = task.dataset(files, cfg, seed=0)
    assert ("packed" if packing else "padded") in task.data_summary
    assert "0 truncated, 0 dropped" in task.data_summary
    model = _model(tok.vocab_size)
    batch = task.batch(torch.from_numpy(ds.rows))
    with torch.no_grad():
        logits = model(
            batch.input_ids, batch.position_ids, batch.document_ids, attention=batch.attention
        )
        packed = task.loss_sum(logits, batch) / task.count(batch)
        total, count = 0.0, 0
        for f in files:  # every conversation on its own, loss on its assistant tokens
            for line in f.read_text().splitlines():
                row = json.loads(line)
                msgs = row.get("messages") or [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"]},
                ]
                ids, mask = tokenize_conversation(tok, msgs, "row")
                ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
                out = model(ids[None, :-1])[0]
                labels = ids[1:].masked_fill(mask[1:] == 0, -100)
                total += F.cross_entropy(out, labels, ignore_index=-100, reduction="sum").item()
                count += int((mask[1:] == 1).sum())
    assert task.count(batch).item() == count
    assert packed.item() == pytest.approx(total / count, rel=1e-5)
    rows_needed = len(ds.rows)
    assert rows_needed < 48 if packing else rows_needed == 48


def test_overlong_conversations_are_truncated_or_dropped_and_counted(data):
    files, tok = sorted(data[0].iterdir()), Tokenizer.from_dir(data[1])
    cfg = load_config(JobConfig, None, ["--data.seq_len=100"]).data

    def counts(overlong: str) -> tuple[int, int, int]:
        task = make_task(TaskConfig(name="sft", overlong=overlong), tokenizer=tok)
        ds = task.dataset(files, cfg, seed=0)
        found = re.search(r"(\d+) truncated, (\d+) dropped", task.data_summary)
        return int(found[1]), int(found[2]), int(ds.rows[:, 1].sum())

    (cut, cut_dropped, cut_tokens), (kept, dropped, tokens) = counts("truncate"), counts("drop")
    assert cut > 0 and kept == 0 and dropped >= cut > cut_dropped
    assert cut_tokens > tokens  # truncated conversations keep their first assistant turns


@pytest.mark.parametrize(
    "row, match",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot' is not valid"),
        ({"text": "hi"}, "no 'messages', nor 'prompt' and 'completion'"),
        (
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "chat template: this template has no tool role",
        ),
    ],
)
def test_bad_rows_are_one_error_naming_the_row(tmp_path, row, match):
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", STRICT))
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": conversation(0)}) + "\n")
    with (tmp_path / "d.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    task = make_task(TaskConfig(name="sft"), tokenizer=tok)
    cfg = load_config(JobConfig, None, []).data
    with pytest.raises(UserError, match=match) as e:
        task.dataset([tmp_path / "d.jsonl"], cfg, seed=0)
    assert str(e.value).startswith(f"{tmp_path / 'd.jsonl'}:2: ")


def _job(data_dir: Path, tok: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(
        JobConfig,
        None,
        [
            f"--data.paths={data_dir}",
            "--data.extensions=['.jsonl']",
            "--data.seq_len=128",
            "--data.eval_fraction=0.25",
            f"--tokenizer.path={tok}",
            "--task.name=sft",
            "--model.dim=32",
            "--model.n_layers=2",
            "--model.n_heads=4",
            "--model.ffn_dim=64",
            "--model.tie_embeddings=true",
            "--train.steps=4",
            "--train.batch_size=4",
            "--train.micro_batch_size=2",
            "--train.eval_every=2",
            "--train.warmup_steps=1",
            "--train.lr=3e-3",
            "--train.eps=1e-6",
            "--checkpoint.every=0",
            f"--output.dir={out}",
            "--generate.max_tokens=0",
            *extra,
        ],
    )


def _train(rank: int, world: int, data_dir, tok, out, extra):
    records = Trainer(_job(data_dir, tok, out, *extra)).fit()
    return [(r["loss"], r.get("eval_loss")) for r in records] if rank == 0 else None


@pytest.fixture(scope="module")
def sft_reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_one")
    records = _train(0, 1, *data, out, ())
    return records, weights(out)


def test_eval_loss_is_the_held_out_mean(data, tmp_path, sft_reference):
    records, _ = sft_reference
    assert [r[1] is not None for r in records] == [False, True, False, True]  # every 2, last
    trainer = Trainer(_job(*data, tmp_path))
    trainer.fit()
    model, held = trainer.model.parts[0], trainer.held_out
    assert len(held) == round(0.25 * (len(held) + len(trainer.data.dataset)))
    whole = len(held) // 4 * 4  # evaluated in whole global batches of 4
    assert whole >= 8
    rows = np.stack([held.sample(i) for i in range(whole)])
    batch = trainer.task.batch(torch.from_numpy(rows))
    with torch.no_grad():
        logits = model(
            batch.input_ids, batch.position_ids, batch.document_ids, attention=batch.attention
        )
    expected = trainer.task.loss_sum(logits, batch) / trainer.task.count(batch)
    assert trainer.evaluate() == pytest.approx(expected.item(), rel=1e-5)


LAYOUTS = {
    "dp_shard2": ("--parallel.dp_shard=2",),
    "tp2": ("--parallel.tp=2", "--parallel.dp_shard=1"),
    "pp2": ("--parallel.pp=2", "--parallel.dp_shard=1"),
    "cp2_ring": ("--parallel.cp=2", "--parallel.dp_shard=1", "--parallel.cp_mode=ring"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sft_job_on_two_ranks_equals_one_process(data, tmp_path, sft_reference, name):
    """Packed conversations, assistant-only labels and the held-out loss, on 2 processes."""
    ref, ref_weights = sft_reference
    got = run_distributed(_train, 2, tmp_path / "rdzv", *data, tmp_path / "two", LAYOUTS[name])[0]
    torch.testing.assert_close([r[0] for r in got], [r[0] for r in ref], rtol=1e-5, atol=0)
    evals = [(g[1], r[1]) for g, r in zip(got, ref, strict=True) if r[1] is not None]
    torch.testing.assert_close(*map(list, zip(*evals, strict=True)), rtol=1e-5, atol=0)
    assert_weights_close(weights(tmp_path / "two"), ref_weights)


def test_parquet_conversations_in_both_layouts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", MARKED))
    chats = [{"messages": conversation(i)} for i in range(6)]
    pairs = [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chats.parquet")
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = load_config(JobConfig, None, ["--data.seq_len=255"]).data

    def rows(*names: str):
        task = make_task(TaskConfig(name="sft", packing=False), tokenizer=tok)
        return task.dataset([tmp_path / n for n in names], cfg, seed=0).rows

    assert len(rows("chats.parquet", "pairs.parquet")) == 10
    np.testing.assert_array_equal(rows("pairs.parquet"), rows("pairs.jsonl"))
