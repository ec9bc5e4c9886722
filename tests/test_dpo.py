"""Preference optimisation (`task.name = "dpo"`): the loss and rewards equal TRL's on the same model
and pairs (DPO sigmoid and IPO against `DPOTrainer`, SimPO against `CPOTrainer`), tokenised
identically; pairs packed into rows score as pairs alone; the reference is the starting policy
(the base under a fresh LoRA adapter, the adapter a run starts from, a frozen copy under full
fine-tuning); data parallel, ZeRO and tensor parallel equal one process; bad pairs and
unsupported layouts are one error line.

Test-only: `trl`, `peft`, `transformers` and `datasets` are references, never used by parallm.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import save_hf_model
from parallel_jobs import assert_weights_close, weights

from parallm.config import JobConfig, TaskConfig, load_config
from parallm.errors import UserError
from parallm.testing.distributed import run_distributed
from parallm.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, train_bpe_tokenizer
from parallm.train.tasks import make_task
from parallm.train.tasks.dpo import tokenize_pair
from parallm.train.trainer import Trainer

QA = [
    ("What is 2 + 3?", "5", "It is 6, I think."),
    ("Name a prime number.", "Seven is prime.", "Nine"),
    ("What colour is the sky?", "Blue, on a clear day.", "Green."),
    ("Say hello.", "Hello!", "No."),
    ("What is 7 * 6?", "42", "Forty-three, since seven sixes are forty-three."),
    ("Spell cat.", "C, A, T.", "K, A, T."),
]
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def chat_pair(i: int) -> dict:
    q, good, bad = QA[i % len(QA)]
    prompt = [{"role": "user", "content": f"{q} ({i})"}]
    if i % 3 == 2:  # a multi-turn prompt with a system message
        prompt = [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            *prompt,
        ]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }


def text_pair(i: int) -> dict:
    q, good, bad = QA[i % len(QA)]
    return {"prompt": f"Question: {q} ({i})\nAnswer:", "chosen": f" {good}", "rejected": f" {bad}"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random transformers Llama with a byte-level BPE tokenizer whose chat template
    marks role headers and closes turns with EOS (parallm's default)."""
    d = tmp_path_factory.mktemp("dpo") / "model"
    texts = [json.dumps(chat_pair(i)) + json.dumps(text_pair(i)) for i in range(24)]
    tok = train_bpe_tokenizer(iter(texts + ["<|user|>\n<|assistant|>\n<|system|>\n"] * 4), 400)
    tok.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    save_hf_model("llama3", d, seed=3, vocab_size=tok.vocab_size)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    """A peft LoRA adapter whose B is not zero, so the policy differs from its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


def job(data: Path, model: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(
        JobConfig,
        None,
        [
            f"--data.paths={data}",
            "--data.extensions=['.jsonl', '.parquet']",
            "--data.seq_len=128",
            "--data.shuffle=false",
            f"--model.path={model}",
            "--task.name=dpo",
            "--train.steps=3",
            "--train.batch_size=4",
            "--train.micro_batch_size=2",
            "--train.warmup_steps=1",
            "--train.lr=1e-2",
            "--train.eps=1e-6",
            "--train.log_every=100",
            "--checkpoint.every=0",
            f"--output.dir={out}",
            "--generate.max_tokens=0",
            *extra,
        ],
    )


def lora_flags(adapter: Path | None = None) -> tuple[str, ...]:
    flags = ("--lora.r=4", "--lora.alpha=8", f"--lora.target_modules={','.join(TARGETS)}")
    return flags + ((f"--lora.init_from={adapter}",) if adapter else ())


def parallm_scores(trainer: Trainer) -> tuple[float, dict[str, float]]:
    """The mean loss and metrics over every pair of the trainer's data (forward only)."""
    rows = torch.from_numpy(trainer.data.dataset.rows)
    batch = trainer.task.batch(rows)
    loss, count = trainer.runner.evaluate(batch.split(2))
    assert count == trainer.task.count(batch).item()
    return loss, trainer.runner.metrics


def trl_config(config_cls, out: Path, **kw):
    """A TRL config for CPU float32 (TRL defaults to bf16 autocast, which it applies to a
    `ref_model` as soon as the trainer is built)."""
    return config_cls(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, **kw)


def make_trl(trainer_cls, config, model, pairs, model_path, **kw):
    from datasets import Dataset
    from transformers import AutoTokenizer

    return trainer_cls(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        **kw,
    )


def trl_scores(trainer, pairs) -> tuple[float, dict[str, float], list[dict]]:
    """TRL's loss and metrics on all `pairs` as one batch (no training), and its examples."""
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    batch = trainer.data_collator(examples)
    trainer.model.train()
    with torch.no_grad():
        if hasattr(trainer, "get_batch_loss_metrics"):  # CPOTrainer
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        else:
            loss = trainer.compute_loss(trainer.model, batch)
            metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, examples


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def assert_same_tokens(model_dir: Path, pairs: list[dict], examples: list[dict], cpo=False):
    """parallm's sequences are TRL's, token for token, completion start included."""
    tok = Tokenizer.from_dir(model_dir)
    for i, (pair, ex) in enumerate(zip(pairs, examples, strict=True)):
        chosen, rejected = tokenize_pair(tok, pair, f"pair {i}")
        if cpo:
            theirs = [
                (ex[f"{s}_input_ids"], [int(label != -100) for label in ex[f"{s}_labels"]])
                for s in ("chosen", "rejected")
            ]
        else:
            p = ex["prompt_ids"]
            theirs = [
                (p + ex[f"{s}_ids"], [0] * len(p) + [1] * len(ex[f"{s}_ids"]))
                for s in ("chosen", "rejected")
            ]
        for (ids, mask), (their_ids, their_mask) in zip((chosen, rejected), theirs, strict=True):
            assert ids.tolist() == their_ids
            assert mask.tolist() == their_mask


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def assert_scores_equal(ours, theirs):
    (loss, metrics), (ref_loss, ref_metrics) = ours, theirs
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for name in METRICS:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5, abs=1e-6), name
    assert abs(metrics["rewards/chosen"]) > 1e-3  # the policy is not its reference


def peft_policy(model_dir: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(model_dir), adapter, is_trainable=True)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_lora_dpo_equals_trl(model_dir, tmp_path, loss):
    """Conversational pairs, a fresh LoRA adapter trained 3 steps against its base: parallm's
    loss and rewards on the pairs are TRL DPOTrainer's (the trained adapter, reference = the
    adapter disabled) within 1e-5."""
    from trl import DPOConfig, DPOTrainer

    pairs = [chat_pair(i) for i in range(8)]
    data = write_jsonl(tmp_path / "data" / "prefs.jsonl", pairs)
    extra = (f"--task.loss={loss}", "--task.beta=0.2", "--checkpoint.export_hf=true")
    trainer = Trainer(job(data.parent, model_dir, tmp_path / "out", *extra, *lora_flags()))
    assert trainer.reference.model is trainer.model and trainer.reference.start is None
    records = trainer.fit()
    assert records[0]["rewards/chosen"] == 0.0  # B = 0: the policy starts as its base
    ours = parallm_scores(trainer)

    policy = peft_policy(model_dir, tmp_path / "out" / "adapter")
    config = trl_config(DPOConfig, tmp_path / "trl", beta=0.2, loss_type=loss, max_length=None)
    trl = make_trl(DPOTrainer, config, policy, pairs, model_dir)
    trl.model.delete_adapter("ref")  # TRL's "new adapter" case: the reference is the base
    *theirs, examples = trl_scores(trl, pairs)
    assert_same_tokens(model_dir, pairs, examples)
    assert_scores_equal(ours, theirs)


def test_lora_from_an_adapter_is_scored_against_that_adapter(model_dir, adapter_dir, tmp_path):
    """Starting from an adapter (lora.init_from), the reference is the policy as it starts, as
    TRL's copy of a pretrained adapter: the first step has zero rewards, and after training the
    loss and rewards are TRL's with that copy as reference."""
    from trl import DPOConfig, DPOTrainer

    pairs = [chat_pair(i) for i in range(8)]
    data = write_jsonl(tmp_path / "data" / "prefs.jsonl", pairs)
    extra = ("--checkpoint.export_hf=true", *lora_flags(adapter_dir))
    trainer = Trainer(job(data.parent, model_dir, tmp_path / "out", *extra))
    assert trainer.reference.start is not None
    records = trainer.fit()
    assert records[0]["loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert records[0]["rewards/chosen"] == 0.0
    ours = parallm_scores(trainer)

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    # TRL copies the adapter it is given to a "ref" adapter; then "default" trains on.
    config = trl_config(DPOConfig, tmp_path / "trl", max_length=None)
    trl = make_trl(DPOTrainer, config, peft_policy(model_dir, adapter_dir), pairs, model_dir)
    trained = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    set_peft_model_state_dict(trl.model, trained, adapter_name="default")
    *theirs, _ = trl_scores(trl, pairs)
    assert_scores_equal(ours, theirs)


def test_full_fine_tuning_reference_stays_the_start(model_dir, tmp_path):
    """Full fine-tuning: after training, the loss against the frozen copy equals TRL's with the
    trained model as policy and the starting model as `ref_model` (text pairs)."""
    from trl import DPOConfig, DPOTrainer

    pairs = [text_pair(i) for i in range(8)]
    data = write_jsonl(tmp_path / "data" / "prefs.jsonl", pairs)
    trainer = Trainer(job(data.parent, model_dir, tmp_path / "out", "--checkpoint.export_hf=true"))
    records = trainer.fit()
    assert records[0]["loss"] == pytest.approx(np.log(2), rel=1e-6)  # policy = reference
    assert records[0]["rewards/chosen"] == 0.0
    ours = parallm_scores(trainer)

    config = trl_config(DPOConfig, tmp_path / "trl", max_length=None)
    policy, ref = hf_model(tmp_path / "out" / "hf"), hf_model(model_dir)
    trl = make_trl(DPOTrainer, config, policy, pairs, model_dir, ref_model=ref)
    *theirs, examples = trl_scores(trl, pairs)
    assert_same_tokens(model_dir, pairs, examples)
    assert_scores_equal(ours, theirs)


def test_simpo_equals_trl_cpo(model_dir, adapter_dir, tmp_path):
    """SimPO needs no reference: parallm's loss and rewards equal TRL's CPOTrainer with
    loss_type="simpo", cpo_alpha=0 (text pairs, LoRA policy)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pairs = [text_pair(i) for i in range(8)]
    data = write_jsonl(tmp_path / "data" / "prefs.jsonl", pairs)
    extra = ("--task.loss=simpo", "--task.beta=2.0", "--task.simpo_gamma=0.7")
    trainer = Trainer(
        job(data.parent, model_dir, tmp_path / "out", *extra, *lora_flags(adapter_dir))
    )
    assert trainer.reference is None
    ours = parallm_scores(trainer)

    policy = peft_policy(model_dir, adapter_dir)
    config = trl_config(
        CPOConfig,
        tmp_path / "trl",
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=2.0,
        simpo_gamma=0.7,
        remove_unused_columns=False,
    )
    *theirs, examples = trl_scores(make_trl(CPOTrainer, config, policy, pairs, model_dir), pairs)
    assert_same_tokens(model_dir, pairs, examples, cpo=True)
    assert_scores_equal(ours, theirs)


def test_packed_pairs_score_as_pairs_alone(model_dir, adapter_dir, tmp_path):
    """Several pairs in a row (per-document attention, positions from 0) give the loss and
    rewards of one pair a row."""
    pairs = [chat_pair(i) for i in range(8)]
    data = write_jsonl(tmp_path / "data" / "prefs.jsonl", pairs)
    scores = []
    for packing in ("true", "false"):
        extra = ("--task.loss=simpo", f"--task.packing={packing}", *lora_flags(adapter_dir))
        trainer = Trainer(job(data.parent, model_dir, tmp_path / packing, *extra))
        assert len(trainer.data.dataset) == (8 if packing == "false" else 5)
        scores.append(parallm_scores(trainer))
    (packed, packed_metrics), (alone, alone_metrics) = scores
    assert packed == pytest.approx(alone, rel=1e-5)
    for name in METRICS:
        assert packed_metrics[name] == pytest.approx(alone_metrics[name], rel=1e-5, abs=1e-6)


def test_overlong_pairs_are_truncated_or_dropped_and_counted(model_dir, tmp_path):
    long = {"prompt": "Tell me a story.", "chosen": " Once upon a time" * 12, "rejected": " No."}
    data = write_jsonl(tmp_path / "data" / "prefs.jsonl", [text_pair(0), long, text_pair(1)])
    tok = Tokenizer.from_dir(model_dir)
    cfg = load_config(JobConfig, None, ["--data.seq_len=63"]).data
    for overlong, truncated, dropped in (("truncate", 1, 0), ("drop", 0, 1)):
        task = make_task(TaskConfig(name="dpo", overlong=overlong), tokenizer=tok)
        rows = task.dataset([data], cfg, seed=0).rows
        assert f"{truncated} truncated, {dropped} dropped" in task.data_summary
        assert task.count(task.batch(torch.from_numpy(rows))).item() == 3 - dropped
    # A prompt that fills half a row leaves the cut pair no completion: dropped, counted.
    task = make_task(TaskConfig(name="dpo"), tokenizer=tok)
    long_prompt = {**long, "prompt": "Tell me a long story, please." * 12}
    write_jsonl(data, [text_pair(0), long_prompt])
    task.dataset([data], cfg, seed=0)
    assert "0 truncated, 1 dropped" in task.data_summary


BAD_PAIRS = [
    ({"prompt": "Hi.", "chosen": " Hello."}, "no 'rejected'"),
    ({"prompt": "Hi.", "chosen": " Hello.", "rejected": " Hello."}, "identical"),
    ({"chosen": " a", "rejected": " b"}, "no 'prompt'"),
    (
        {"prompt": "Hi.", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"},
        "must be all strings or all message lists",
    ),
    (
        {
            "prompt": [{"role": "user", "content": "Hi."}],
            "chosen": [],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        "'chosen' has no tokens after",
    ),
    (
        {
            "prompt": [{"role": "robot", "content": "Hi."}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        "role 'robot' is not valid",
    ),
]


@pytest.mark.parametrize("row, match", BAD_PAIRS)
def test_bad_pairs_are_one_error_line_naming_the_row(capsys, model_dir, tmp_path, row, match):
    """Through the CLI: one line on stderr naming the file, line and field; exit 2."""
    from parallm.cli import main

    write_jsonl(tmp_path / "data" / "prefs.jsonl", [text_pair(0), row])
    job_file = tmp_path / "job.toml"
    job_file.write_text(
        f'[data]\npaths = ["{tmp_path / "data"}"]\nseq_len = 127\n'
        f'[model]\npath = "{model_dir}"\n[task]\nname = "dpo"\n'
        f'[output]\ndir = "{tmp_path / "out"}"\n'
    )
    code = main(["train", str(job_file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"parallm: error: {tmp_path / 'data' / 'prefs.jsonl'}:2: "), err
    assert match in err[0]


def _layout_error(rank: int, world: int, data: Path, model: Path, out: Path, extra: tuple):
    try:
        Trainer(job(data, model, out, *extra))
    except UserError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "flags, field",
    [
        (("--parallel.pp=2", "--parallel.dp_shard=1"), "parallel.pp: 2"),
        (("--parallel.cp=2", "--parallel.dp_shard=1"), "parallel.cp: 2"),
    ],
)
def test_pipeline_and_context_parallel_are_refused(model_dir, tmp_path, flags, field):
    data = write_jsonl(tmp_path / "data" / "prefs.jsonl", [chat_pair(i) for i in range(4)])
    got = run_distributed(
        _layout_error, 2, tmp_path / "rdzv", data.parent, model_dir, tmp_path / "o", flags
    )
    assert got[0] == got[1] and got[0].startswith(field), got
    assert "task.name='dpo'" in got[0]


def test_parallm_train_refuses_them_before_launch(model_dir, tmp_path, monkeypatch, capsys):
    """`parallm train --nproc 2` says it in one line without starting a process."""
    import subprocess

    from parallm.cli import main

    def launched(*args, **kwargs):
        raise AssertionError("a training process was started")

    monkeypatch.setattr(subprocess, "run", launched)
    monkeypatch.setattr("parallm.distributed.launch.launch", launched)
    data = write_jsonl(tmp_path / "prefs.jsonl", [chat_pair(i) for i in range(4)])
    job_file = tmp_path / "dpo.toml"
    job_file.write_text(f'[task]\nname = "dpo"\n[model]\npath = "{model_dir}"\n')
    argv = ["train", "--nproc", "2", str(job_file), "--data.paths", str(data)]
    assert main([*argv, "--parallel.pp", "2", "--parallel.dp_shard", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "parallel.pp: 2" in err and "dpo" in err, err


def _train(rank: int, world: int, data: Path, model: Path, out: Path, extra: tuple):
    records = Trainer(job(data, model, out, *extra)).fit()
    keys = ("loss", *METRICS)
    return [[r[k] for k in keys] for r in records] if rank == 0 else None


# One process vs two: LoRA (the base as reference), LoRA from an adapter (its starting values
# put back for the reference forward, under ZeRO-2 which keeps parameters gathered), and full
# fine-tuning (a frozen copy sharded like the policy).
EQUIVALENCE = {
    "lora_zero3": ("lora", ("--parallel.dp_shard=2",)),
    "lora_tp2": ("lora", ("--parallel.tp=2", "--parallel.dp_shard=1")),
    "lora_from_adapter_zero2": ("adapter", ("--parallel.dp_shard=2", "--parallel.zero_stage=2")),
    "full_zero2": ("full", ("--parallel.dp_shard=2", "--parallel.zero_stage=2")),
}


@pytest.fixture(scope="module")
def equivalence_runs(model_dir, adapter_dir, tmp_path_factory):
    """Each kind of run on one process: its per-step records and what it trained."""
    root = tmp_path_factory.mktemp("dpo_one")
    data = write_jsonl(root / "data" / "prefs.jsonl", [chat_pair(i) for i in range(16)])
    kinds = {
        "lora": lora_flags(),
        "adapter": (*lora_flags(adapter_dir), "--task.loss=ipo"),
        "full": ("--train.lr=1e-3",),
    }
    # DPO's gradient is a difference (chosen - rejected) whose elements can cancel to rounding
    # noise, which AdamW at eps 1e-6 turns into full-size steps of random sign: the order of a
    # layout's reductions then shows in the weights (measured on tp2: 3.4e-5); at eps 1e-4 it
    # is 1.9e-6, while losses and rewards agree to 1e-7 either way.
    common = ("--train.micro_batch_size=1", "--train.eps=1e-4", "--checkpoint.export_hf=true")
    runs = {}
    for kind, flags in kinds.items():
        flags = (*flags, *common)
        records = _train(0, 1, data.parent, model_dir, root / kind, flags)
        runs[kind] = (flags, records, weights(root / kind))
    return data.parent, runs


@pytest.mark.parametrize("name", sorted(EQUIVALENCE))
def test_two_processes_equal_one(model_dir, equivalence_runs, tmp_path, name):
    """Losses and rewards within 1e-5 of one process, trained weights within 1e-5 (norm)."""
    data, runs = equivalence_runs
    kind, layout = EQUIVALENCE[name]
    flags, ref_records, ref_weights = runs[kind]
    out = tmp_path / "two"
    got = run_distributed(_train, 2, tmp_path / "rdzv", data, model_dir, out, (*flags, *layout))[0]
    assert ref_records[-1][0] != ref_records[0][0]  # it trained
    torch.testing.assert_close(got, ref_records, rtol=1e-5, atol=1e-6)
    assert_weights_close(weights(out), ref_weights)
