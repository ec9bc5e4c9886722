"""Serving LoRA adapters on the engine: greedy tokens through an adapter equal `peft`'s greedy
`generate` and the merged model's; a step that mixes the base and two adapters gives every
request the tokens it gets alone; KV blocks are never shared across adapters (nor across two
loads of one slot); unloading lets running requests finish; adapters that cannot be served are
refused with nothing loaded; the same on 2 tensor-parallel processes; `generate --lora`.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import greedy_reference, save_hf_model, save_hf_model_with_tokenizer
from lora_helpers import ADAPTERS, save_merged, save_peft_adapter

from parallm.errors import UserError
from parallm.inference.adapters import AdapterRegistry
from parallm.inference.block_manager import BlockManager
from parallm.inference.engine import EngineConfig, LLMEngine
from parallm.inference.llm import LLM
from parallm.inference.lora import LoRARequest
from parallm.inference.sampling import SamplingParams
from parallm.inference.sequence import Sequence

pytest.importorskip("transformers")
pytest.importorskip("peft")

LENGTHS = [3, 17, 40]  # 40: five blocks of 8, prefilled in chunks of 64 tokens per step
MAX_TOKENS = 8
ENGINE = dict(block_size=8, max_num_batched_tokens=64, max_lora_rank=8)
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base model, the adapters of ADAPTERS made by peft on it, and the greedy tokens of each
    prompt on the base (None) and through each adapter, from transformers / peft."""
    d = tmp_path_factory.mktemp("lora")
    ref, tok = save_hf_model_with_tokenizer("llama3", d / "base")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    expected = {None: [greedy_reference(ref, p, MAX_TOKENS) for p in prompts]}
    for i, name in enumerate(ADAPTERS):
        model = save_peft_adapter(d / "base", d / name, name, seed=i)
        expected[name] = [greedy_reference(model, p, MAX_TOKENS) for p in prompts]
        assert expected[name] != expected[None]  # the adapter changes what the model says
    return d, prompts, expected


@pytest.fixture(scope="module")
def llm(setup):
    d = setup[0]
    llm = LLM(d / "base", enable_lora=True, **ENGINE)
    for name in ADAPTERS:
        llm.add_lora(name, d / name)
    return llm


def _tokens(outs) -> list[list[int]]:
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.outputs[0].token_ids for o in outs]


def test_adapter_greedy_equals_peft_and_the_merged_model(setup, llm):
    d, prompts, expected = setup
    assert _tokens(llm.generate(prompts, GREEDY)) == expected[None]
    for name in ADAPTERS:
        got = _tokens(llm.generate(prompts, GREEDY, lora=name))
        assert got == expected[name], name
        merged = save_merged(d / "base", d / name, d / f"{name}-merged")
        with LLM(merged, block_size=8) as plain:
            assert _tokens(plain.generate(prompts, GREEDY)) == got, name


def test_one_step_mixes_the_base_and_two_adapters(setup, llm, monkeypatch):
    _, prompts, expected = setup
    bank = llm.engine.runner.lora
    steps: list[set[int]] = []
    set_step = bank.set_step
    monkeypatch.setattr(
        bank, "set_step", lambda slots, *a: (steps.append(set(slots)), set_step(slots, *a))[1]
    )
    loras = [None, *ADAPTERS] * len(prompts)
    batch = [p for p in prompts for _ in range(3)]
    got = _tokens(llm.generate(batch, GREEDY, lora=loras))
    assert got == [expected[name][i // 3] for i, name in enumerate(loras)]
    slots = {llm.engine.adapters.by_name[n].slot for n in ADAPTERS}
    assert any(s >= {-1, *slots} for s in steps), steps  # base and both adapters in one step
    # ... and each request alone through the engine gets the same tokens.
    for i in (0, 4, 8):
        alone = llm.generate(batch[i], GREEDY, lora=loras[i])
        assert _tokens(alone) == [got[i]]


def test_kv_blocks_are_not_shared_across_adapters_or_loads(setup):
    d, prompts, expected = setup
    long = prompts[2]  # five blocks: four may be reused
    llm = LLM(d / "base", enable_lora=True, max_loras=1, **ENGINE)
    bm = llm.engine.scheduler.block_manager
    assert _tokens(llm.generate(long, GREEDY)) == [expected[None][2]]
    llm.add_lora("poet", d / "poet")
    hits = bm.prefix_hits
    assert _tokens(llm.generate(long, GREEDY, lora="poet")) == [expected["poet"][2]]
    assert bm.prefix_hits == hits  # the base's blocks hold the base's KV
    assert _tokens(llm.generate(long, GREEDY, lora="poet")) == [expected["poet"][2]]
    assert bm.prefix_hits == hits + 32  # the adapter's own blocks are reused
    # Another adapter in the same slot: poet's cached blocks must not be taken for it, and the
    # layers poet adapted but sql does not must be poet-free again.
    llm.remove_lora("poet")
    llm.add_lora("sql", d / "sql")
    assert llm.engine.adapters.by_name["sql"].slot == 0
    hits = bm.prefix_hits
    assert _tokens(llm.generate(long, GREEDY, lora="sql")) == [expected["sql"][2]]
    assert bm.prefix_hits == hits


def test_unloading_lets_running_requests_finish(setup):
    d, prompts, expected = setup
    engine = LLMEngine(d / "base", EngineConfig(enable_lora=True, max_loras=1, **ENGINE))
    engine.add_lora("sql", d / "sql")
    engine.add_request("running", prompts[1], GREEDY, lora="sql")
    engine.step()
    assert engine.remove_lora("sql").in_flight == 1
    engine.add_request("late", prompts[1], GREEDY, lora="sql")
    with pytest.raises(UserError, match="max_loras: all 1 adapter slots.*sql still finish"):
        engine.add_lora("poet", d / "poet")  # the slot is still busy
    done = engine.run_to_completion()
    assert "no adapter 'sql' is loaded" in done["late"].error
    assert done["running"].outputs[0].token_ids == expected["sql"][1]
    engine.add_lora("poet", d / "poet")  # the last request has finished: the slot is free
    engine.add_request("poet", prompts[1], GREEDY, lora="poet")
    assert engine.run_to_completion()["poet"].outputs[0].token_ids == expected["poet"][1]
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == engine.runner.pool.num_blocks


def test_adapters_that_cannot_be_served_leave_nothing_loaded(setup, llm, tmp_path):
    import peft
    import transformers

    d, prompts, expected = setup
    save_hf_model("llama3", tmp_path / "other", hidden_size=32)  # another base
    save_peft_adapter(tmp_path / "other", tmp_path / "other-adapter", "sql")
    ref = transformers.AutoModelForCausalLM.from_pretrained(d / "base")
    saving = peft.get_peft_model(
        ref, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    saving.save_pretrained(tmp_path / "saves-lm-head")
    before = dict(llm.engine.adapters.by_name)
    cases = [
        ("x", tmp_path / "other-adapter", "does not match|another base"),
        ("x", tmp_path / "saves-lm-head", "saves whole modules.*parallm merge"),
        ("x", tmp_path / "nowhere", "not a LoRA adapter directory"),
        ("sql", d / "sql", "'sql' is loaded already"),
        ("two words", d / "sql", "no spaces"),
    ]
    for name, path, needle in cases:
        with pytest.raises(UserError, match=needle):
            llm.add_lora(name, path)
    assert llm.engine.adapters.by_name == before
    with LLM(d / "base", enable_lora=True, block_size=8, max_lora_rank=4) as small:
        with pytest.raises(UserError, match="rank r=8 exceeds max_lora_rank=4"):
            small.add_lora("poet", d / "poet")
        assert small.engine.adapters.by_name == {}
        small.add_lora("poet-slot-free", d / "sql")  # r=4 fits, in the slot poet did not take
        assert small.engine.adapters.by_name["poet-slot-free"].slot == 0
    with LLM(d / "base", block_size=8) as plain, pytest.raises(UserError, match="enable_lora"):
        plain.add_lora("sql", d / "sql")
    # Failed loads left every slot as it was: both adapters still answer as before.
    assert _tokens(llm.generate(prompts[:1], GREEDY, lora="sql")) == expected["sql"][:1]


def test_llm_takes_a_name_a_directory_or_a_lora_request(setup):
    d, prompts, expected = setup
    with LLM(d / "base", enable_lora=True, **ENGINE) as llm:
        by_dir = llm.generate(prompts[0], GREEDY, lora=str(d / "sql"))
        assert _tokens(by_dir) == [expected["sql"][0]]
        request = LoRARequest("poet", 1, str(d / "poet"))
        assert _tokens(llm.generate(prompts[0], GREEDY, lora=request)) == [expected["poet"][0]]
        assert set(llm.engine.adapters.by_name) == {str(d / "sql"), "poet"}
        with pytest.raises(UserError, match="neither a loaded adapter"):
            llm.generate(prompts[0], GREEDY, lora="nothing-called-this")
        with pytest.raises(UserError, match="is loaded from"):
            llm.generate(prompts[0], GREEDY, lora=LoRARequest("poet", 2, str(d / "sql")))
        with pytest.raises(UserError, match="lora: 1 given for 2 prompts"):
            llm.generate(prompts[:2], GREEDY, lora=["poet"])


def test_tensor_parallel_adapters_equal_peft(setup):
    """On 2 processes: A whole and B sharded on column-parallel layers, A sharded and B whole
    on row-parallel ones; the workers load each adapter themselves, also into a reused slot."""
    d, prompts, expected = setup
    with LLM(d / "base", tensor_parallel_size=2, enable_lora=True, max_loras=2, **ENGINE) as llm:
        llm.add_lora("poet", d / "poet")
        loras = [None, "poet", "poet"]
        assert _tokens(llm.generate(prompts, GREEDY, lora=loras)) == [
            expected[name][i] for i, name in enumerate(loras)
        ]
        llm.remove_lora("poet")
        llm.add_lora("sql", d / "sql")  # slot 0 again: poet's other layers cleared
        assert llm.engine.adapters.by_name["sql"].slot == 0
        assert _tokens(llm.generate(prompts, GREEDY, lora="sql")) == expected["sql"]


def test_generate_cli_through_an_adapter(setup, llm, capsys):
    from parallm.cli import main

    d, _, _ = setup
    argv = ["generate", "--model", str(d / "base"), "--prompt", "def add(a, b):"]
    argv += ["--max-tokens", "8"]
    assert main([*argv, "--lora", str(d / "sql")]) == 0
    printed = capsys.readouterr().out
    want = llm.generate("def add(a, b):", SamplingParams(max_tokens=8, temperature=0), lora="sql")
    assert printed == want[0].outputs[0].text + "\n"
    assert main([*argv, "--lora", str(d / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parallm: error: --lora:") and "\n" not in err


# -- the torch-free parts --------------------------------------------------------------------


def test_registry_slots_names_and_draining():
    reg = AdapterRegistry(max_loras=2)
    a = reg.add("a", "/a", reg.free_slot(), rank=4)
    b = reg.add("b", "/b", reg.free_slot(), rank=8)
    assert (a.slot, b.slot) == (0, 1) and a.cache_key != b.cache_key
    with pytest.raises(UserError, match="all 2 adapter slots"):
        reg.free_slot()
    held = reg.acquire("a")
    assert reg.remove("a") is held and held.in_flight == 1
    with pytest.raises(UserError, match="no adapter 'a'"):
        reg.acquire("a")
    reg.check_name("a")  # the name is free again at once ...
    with pytest.raises(UserError, match="a still finish"):
        reg.free_slot()  # ... the slot once its request has finished
    reg.release(held)
    c = reg.add("c", "/c", reg.free_slot(), rank=4)
    assert c.slot == 0 and c.cache_key not in (a.cache_key, b.cache_key)
    for bad in ("", " x", "a b", "x" * 201, "b"):
        with pytest.raises(UserError, match="name"):
            reg.check_name(bad)


def test_prefix_hashes_are_per_adapter_load():
    bm = BlockManager(num_blocks=8, block_size=4)

    def seq(i: int, key: int) -> Sequence:
        return Sequence(i, list(range(10, 19)), num_prompt_tokens=9, max_tokens=1, lora_key=key)

    first = seq(0, key=0)
    bm.allocate(first)
    first.num_computed_tokens = 9
    bm.mark_computed(first)
    assert bm.prefix_hit_tokens(seq(1, key=0)) == 8
    assert bm.prefix_hit_tokens(seq(2, key=5)) == 0
