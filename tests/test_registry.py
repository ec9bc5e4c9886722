"""The family registry and the layering it buys: lookups, errors, and an import graph in which
only `parallm/models/` names a family, serving never imports training, and nothing is circular."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import parallm
from parallm.errors import UserError
from parallm.models import registry

ROOT = Path(parallm.__file__).parent


def test_lookup_by_model_type_architecture_and_args():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(registry.model_types())
    spec = registry.family("qwen3")
    assert spec.name == "llama" and registry.family("mistral") is spec
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    assert registry.model_type_of(cfg) == "qwen2"
    assert registry.model_type_of({"model_type": "mistral"}) == "mistral"
    args = spec.hf.args_from_hf({**cfg, **_SHAPE}, "config.json")
    assert registry.family_of_args(args) is spec


_SHAPE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99
)


def test_unknown_model_type_is_one_error_listing_the_registered(tmp_path):
    with pytest.raises(UserError) as e:
        registry.family("gpt_neox")
    assert "'gpt_neox'" in str(e.value)
    for t in ("llama", "mistral", "qwen2", "qwen3"):
        assert t in str(e.value)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPTNeoXForCausalLM"], **_SHAPE})
    )
    with pytest.raises(
        UserError, match="unsupported architecture.*registered model types: .*llama"
    ):
        parallm.load_pretrained(tmp_path)


def test_model_architecture_is_checked_against_the_registry():
    from parallm.config import ModelConfig

    with pytest.raises(UserError, match="model.architecture: 'gpt2' is not valid; valid: .*llama"):
        ModelConfig(architecture="gpt2")


def test_top_level_api():
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams

    assert parallm.LLM is LLM and parallm.SamplingParams is SamplingParams
    from parallm import LLM as llm_cls  # noqa: N813  (the import users write)

    assert llm_cls is LLM
    with pytest.raises(AttributeError):
        parallm.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------------------------------------
# The import graph (module-level imports of parallm's own modules, read from the source)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    if top_level_only:  # what importing the module imports, and what it names for typing
        nodes = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        nodes += [
            n
            for block in tree.body
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in block.body
        ]
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("parallm")}


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    return {
        m: {d for d in _imports(p, top_level_only=top_level_only) if d in MODULES and d != m}
        for m, p in MODULES.items()
    }


def test_outside_models_no_module_imports_a_family_by_name():
    families = {m for m in MODULES if m.startswith("parallm.models.") and m.count(".") >= 3}
    families |= {m.rsplit(".", 1)[0] for m in families}
    assert "parallm.models.llama" in families
    offenders = {
        m: sorted(deps & families)
        for m, deps in _graph(top_level_only=False).items()
        if not m.startswith("parallm.models") and deps & families
    }
    assert offenders == {}


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_serving_never_imports_training():
    graph = _graph(top_level_only=False)
    for m in MODULES:
        if m.startswith(("parallm.inference", "parallm.serve")):
            train = sorted(d for d in _closure(graph, m) if d.startswith("parallm.train"))
            assert not train, f"{m} reaches {train}"


def test_no_import_cycles_between_modules():
    graph = _graph(top_level_only=True)
    cycles = []
    for m in graph:
        if m in _closure(graph, m):
            cycles.append(m)
    # A package's __init__ importing its own submodules is how families register; any other
    # module on a cycle is a defect (the model runner and the TP group once were).
    assert [m for m in cycles if not MODULES[m].name == "__init__.py"] == []
