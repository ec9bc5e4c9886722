"""The engine over a model in memory, weights shared with a trainer (issue 14, GRPO).

`LLMEngine.from_model` reads the very tensors the trainer updates: the engine's processed
log-probabilities of what it sampled equal log_softmax(logits / T) of the trainer's plain forward
of the same module within 1e-5 (float32), before and after an optimizer step (full fine-tuning,
and LoRA where only the adapter changes). `weights_updated` drops the prefix cache, so no KV of
the old weights is reused: after it, the engine answers as a fresh engine on the new weights,
while an engine not told keeps hitting its stale cache and answers otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hf_models import save_hf_model_with_tokenizer

from parallm.errors import UserError
from parallm.inference.block_manager import BlockManager
from parallm.inference.engine import CompletionOutput, EngineConfig, LLMEngine
from parallm.inference.sampling import Sampler, SamplingParams, apply_penalties
from parallm.inference.sequence import Sequence
from parallm.models.attention import AttentionSpec
from parallm.models.hf import load_pretrained
from parallm.models.lora import LoraLinear, LoraSpec, apply_lora
from parallm.tokenizer import Tokenizer

pytest.importorskip("transformers")

TEMPERATURE = 0.7
ATOL = 1e-5  # float32: the paged engine's step vs the training forward of the same module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    save_hf_model_with_tokenizer("llama3", d)
    return d


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 19, 33)]


def _generate(engine: LLMEngine, prompts, params: SamplingParams) -> list[CompletionOutput]:
    """Every completion of every prompt, in order."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = engine.run_to_completion()
    assert all(done[str(i)].error is None for i in range(len(prompts)))
    return [o for i in range(len(prompts)) for o in done[str(i)].outputs]


@torch.no_grad()
def _trainer_logprobs(model, prompt: list[int], completion: list[int], temperature: float):
    """log_softmax(logits / T) of each completion token by a plain forward, as a trainer does."""
    ids = torch.tensor(prompt + completion)
    positions = torch.arange(len(ids))
    logits = model(ids[None], positions[None], attention=AttentionSpec())[0].float()
    lp = (logits / temperature).log_softmax(dim=-1)
    rows = torch.arange(len(prompt) - 1, len(ids) - 1)
    return lp[rows, torch.tensor(completion)]


def _check_against_trainer(model, prompts, outs, n: int) -> torch.Tensor:
    """Assert the engine's log-probabilities equal the trainer's; the largest difference."""
    worst = torch.tensor(0.0)
    for i, out in enumerate(outs):
        got = torch.tensor([e["logprob"] for e in out.logprobs])
        assert [e["token_id"] for e in out.logprobs] == out.token_ids
        ref = _trainer_logprobs(model, prompts[i // n], out.token_ids, TEMPERATURE)
        worst = torch.maximum(worst, (got - ref).abs().max())
    assert worst <= ATOL, f"engine vs trainer log-probabilities differ by {worst:.2e}"
    return worst


def _optimizer_step(model, vocab: int) -> None:
    """One AdamW step of the trainable parameters on a random next-token loss, in train mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_logprobs_equal_the_trainers_forward_before_and_after_a_step(model_dir, lora):
    model = load_pretrained(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    vocab = model.args.vocab_size
    if lora:
        apply_lora(
            model, LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
        )
        with torch.no_grad():  # B = 0 would make the adapter's first step invisible here
            g = torch.Generator().manual_seed(2)
            for m in model.modules():
                if isinstance(m, LoraLinear):
                    m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    model.train()  # as the trainer leaves it
    engine = LLMEngine.from_model(
        model, tok, EngineConfig(block_size=8, max_num_seqs=8, logprobs_mode="processed")
    )
    assert engine.model is model and engine.runner.model is model  # no copy, no load
    prompts = _prompts(vocab)
    n = 2
    params = SamplingParams(
        n=n, max_tokens=10, temperature=TEMPERATURE, logprobs=0, seed=7, ignore_eos=True
    )
    before = _generate(engine, prompts, params)
    assert model.training and all(m.training for m in model.modules())  # modes given back
    _check_against_trainer(model, prompts, before, n)

    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    _optimizer_step(model, vocab)  # the engine's inference-mode steps left autograd usable
    for k, v in model.named_parameters():  # LoRA: only the adapter changed
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    engine.weights_updated()
    after = _generate(engine, prompts, params)
    _check_against_trainer(model, prompts, after, n)
    # The engine did read the new weights: the old log-probabilities no longer hold.
    moved = max(
        (
            torch.tensor([e["logprob"] for e in out.logprobs])
            - _trainer_logprobs(model, prompts[i // n], out.token_ids, TEMPERATURE)
        )
        .abs()
        .max()
        for i, out in enumerate(before)
    )
    assert moved > 1e-3, f"the step moved the log-probabilities by only {moved:.2e}"


def test_weights_updated_drops_the_prefix_cache(model_dir):
    model = load_pretrained(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    config = EngineConfig(block_size=8, max_num_seqs=4)
    told = LLMEngine.from_model(model, tok, config)
    stale = LLMEngine.from_model(model, tok, config)  # never told: keeps its cache
    prompt = _prompts(model.args.vocab_size)[2]  # 33 tokens: 4 full blocks cached
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    for engine in (told, stale):
        _generate(engine, [prompt], params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)

    told.add_request("busy", prompt, params)
    with pytest.raises(RuntimeError, match="unfinished"):
        told.weights_updated()  # a request in flight mixes old and new KV
    told.abort_request("busy")
    told.run_to_completion()
    told.weights_updated()
    told.scheduler.block_manager.check_invariants()

    hits = {id(e): e.scheduler.block_manager.prefix_hits for e in (told, stale)}
    (got,) = _generate(told, [prompt], params)
    (old,) = _generate(stale, [prompt], params)
    (want,) = _generate(LLMEngine.from_model(model, tok, config), [prompt], params)
    assert told.scheduler.block_manager.prefix_hits == hits[id(told)]  # nothing reused
    assert stale.scheduler.block_manager.prefix_hits - hits[id(stale)] == 32  # 4 blocks of 8

    def logprobs(out):
        return torch.tensor([e["logprob"] for e in out.logprobs])

    assert got.token_ids == want.token_ids
    assert torch.allclose(logprobs(got), logprobs(want), rtol=0, atol=1e-6)
    # The stale cache's KV of the old weights shows in what the other engine computes.
    assert (logprobs(old) - logprobs(want)).abs().max() > 1e-4


def test_training_model_runs_in_eval_mode_and_keeps_its_modes(model_dir):
    """LoRA dropout 0.5 in training mode would make each step random: the engine runs eval
    (raw log-probabilities = the eval forward's) and gives every module its own mode back."""
    model = load_pretrained(model_dir)
    apply_lora(model, LoraSpec(r=4, alpha=8.0, dropout=0.5))
    model.train()
    model.layers["1"].eval()  # a mix of modes, restored module by module
    modes = {name: m.training for name, m in model.named_modules()}
    engine = LLMEngine.from_model(model, Tokenizer.from_dir(model_dir), EngineConfig(block_size=8))
    prompt = _prompts(model.args.vocab_size)[1]
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=0, ignore_eos=True)
    (out,) = _generate(engine, [prompt], params)
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    ref = _trainer_logprobs(model, prompt, out.token_ids, 1.0)
    got = torch.tensor([e["logprob"] for e in out.logprobs])
    assert (got - ref).abs().max() <= ATOL


def test_from_model_refuses_what_it_cannot_share(model_dir):
    model = load_pretrained(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    for config, field_name in [
        (EngineConfig(tensor_parallel_size=2), "tensor_parallel_size"),
        (EngineConfig(enable_lora=True), "enable_lora"),
        (EngineConfig(dtype="bfloat16"), "dtype"),
    ]:
        with pytest.raises(UserError, match=f"^{field_name}: "):
            LLMEngine.from_model(model, tok, config)
    with pytest.raises(UserError, match="^logprobs_mode: 'sampled' is not valid; valid: raw"):
        EngineConfig(logprobs_mode="sampled")


@dataclass
class Hist:
    prompt_token_ids: list[int] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)


def test_processed_logprobs_are_after_penalties_and_temperature_before_truncation():
    """Per row: log_softmax(penalised / T) for sampled rows whatever their truncation, the
    penalised log-softmax for greedy ones; raw mode keeps the model's log-softmax."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(4)) * 3
    params = [
        SamplingParams(temperature=0.7, top_k=3, logprobs=2),
        SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=0),
        SamplingParams(temperature=1.3, presence_penalty=0.5, top_p=0.3, min_p=0.2, logprobs=1),
        SamplingParams(temperature=0.9),  # no log-probabilities asked for
    ]
    hists = [Hist([1, 2], [3]), Hist([4, 5, 6], [7, 7]), Hist([8], [9, 9, 10]), Hist()]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = Sampler("processed")(logits, params, hists, gens)
    penalised = apply_penalties(logits, params, hists)
    for i, temp in [(0, 0.7), (1, 1.0), (2, 1.3)]:
        want = (penalised[i] / temp).log_softmax(dim=0)
        got = out.logprobs[i]
        assert got["token_id"] == out.token_ids[i]
        assert got["logprob"] == pytest.approx(want[out.token_ids[i]].item(), abs=1e-6)
        top = want.topk(params[i].logprobs)
        assert list(got["top"]) == top.indices.tolist()
        assert list(got["top"].values()) == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.logprobs[3] is None
    for batch in (params, params[:1]):  # with penalties in the batch and without any
        b = len(batch)
        raw = Sampler("raw")(logits[:b], batch, hists[:b], gens[:b]).logprobs
        for i, lp in enumerate(raw[:2]):
            want = logits[i].log_softmax(0)[lp["token_id"]].item()
            assert lp["logprob"] == pytest.approx(want, abs=1e-6)


def test_reset_prefix_cache_frees_cached_blocks_and_refuses_blocks_in_use():
    bm = BlockManager(4, 2)
    seq = Sequence(seq_id=0, token_ids=[5, 6, 7, 8, 9], num_prompt_tokens=5, max_tokens=1)
    bm.allocate(seq)
    seq.num_computed_tokens = 5
    bm.mark_computed(seq)  # 2 full blocks published
    with pytest.raises(RuntimeError, match="3 blocks are in use"):
        bm.reset_prefix_cache()
    bm.free(seq)
    again = Sequence(seq_id=1, token_ids=[5, 6, 7, 8, 9], num_prompt_tokens=5, max_tokens=1)
    assert bm.prefix_hit_tokens(again) == 4
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.prefix_hit_tokens(again) == 0 and bm.num_free_blocks == 4
