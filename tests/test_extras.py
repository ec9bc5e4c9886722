"""A training-only install: `pip install parallm` pulls no web or database stack, runs every
command that needs none, and the server's commands say which extra to install, in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from parallm.cli import build_parser
from parallm.errors import UserError
from parallm.extras import OPTIONAL_MODULES
from parallm.serve.config import ServerConfig
from parallm.testing.timeouts import scaled

ROOT = Path(__file__).resolve().parent.parent
SERVER_STACK = {"fastapi", "uvicorn", "gradio", "sqlalchemy"}

# Run in a fresh interpreter: every module of an extra fails to import, as when it is not
# installed; then the core imports and commands run, and the server's commands are refused.
SCRIPT = r"""
import contextlib, importlib, io, json, sys

BLOCKED = set(json.loads(sys.argv[1]))
early = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not early, f"imported before the block: {early}"


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Block())
for module in (
    "parallm",
    "parallm.cli",
    "parallm.train.trainer",
    "parallm.inference.llm",
    "parallm.bench.train",
    "parallm.bench.infer",
):
    importlib.import_module(module)

from parallm.cli import main

results = {}
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # --help
            code = e.code
    results[" ".join(argv)] = [code, err.getvalue()]
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
print(json.dumps({"results": results, "loaded": loaded}))
"""


def _run_without(blocked: set[str], *commands: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(sorted(blocked)), json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=scaled(300),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_commands_run_and_server_commands_ask_for_the_extra(tmp_path):
    missing = str(tmp_path / "nope")
    out = _run_without(
        OPTIONAL_MODULES,
        ["train", "--help"],
        ["bench", "train", "--help"],
        ["bench", "infer", "--help"],
        ["generate", "--model", missing, "--prompt", "x"],
        ["serve", "--model", "x"],
        ["serve", "--model", "x", "--ui"],
        ["keys", "list"],
        ["ui", "--server", "http://127.0.0.1:1"],
        ["bench", "serve", "--url", "http://127.0.0.1:1"],
    )
    assert out["loaded"] == []
    results = out["results"]
    for argv in ("train --help", "bench train --help", "bench infer --help"):
        assert results[argv][0] == 0, (argv, results[argv])
    code, err = results[f"generate --model {missing} --prompt x"]
    assert code == 2 and "does not exist" in err and "extra" not in err, err
    expected = {
        "serve --model x": ("serve", "serve"),
        "serve --model x --ui": ("serve", "serve"),
        "keys list": ("keys", "serve"),
        "ui --server http://127.0.0.1:1": ("ui", "ui"),
        "bench serve --url http://127.0.0.1:1": ("bench serve", "serve"),
    }
    for argv, (command, extra) in expected.items():
        code, err = results[argv]
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        pattern = (
            rf"parallm: error: {command} needs the {extra} extra \(\w+ is not installed\): "
            rf"pip install 'parallm\[{extra}\]'"
        )
        assert re.fullmatch(pattern, lines[0]), (argv, lines[0])


def test_serve_ui_without_the_ui_extra_stops_before_loading():
    out = _run_without({"gradio"}, ["serve", "--model", "x", "--ui", "--no-auth"])
    code, err = out["results"]["serve --model x --ui --no-auth"]
    assert code == 2, err
    assert err.strip() == (
        "parallm: error: serve --ui needs the ui extra (gradio is not installed): "
        "pip install 'parallm[ui]'"
    )


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_dependencies_have_no_server_stack():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _names(project["dependencies"])
    assert not core & SERVER_STACK, core & SERVER_STACK
    extras = project["optional-dependencies"]
    assert {"fastapi", "uvicorn", "sqlalchemy"} <= _names(extras["serve"])
    assert {"gradio", "parallm"} <= _names(extras["ui"])  # the ui extra includes the server's


def test_every_serve_option_is_a_server_config_field():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert set(vars(args)) - {"command"} == {f.name for f in fields(ServerConfig)}
    config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    assert config == ServerConfig(model="m")


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"port": 70000}, ("--port: 70000", "[0, 65535]")),
        ({"port": "80"}, ("--port: '80'", "integer")),
        ({"max_waiting": 0}, ("--max-waiting: 0", ">= 1")),
        ({"max_body_bytes": -1}, ("--max-body-bytes: -1", ">= 1")),
        ({"max_num_seqs": 0}, ("--max-num-seqs: 0", ">= 1")),
        ({"max_model_len": 0}, ("--max-model-len: 0", ">= 1")),
        ({"kv_cache_memory": 0.0}, ("--kv-cache-memory: 0.0", "> 0")),
        ({"log_level": "loud"}, ("--log-level: 'loud'", "warning")),
        ({"served_model_name": ""}, ("--served-model-name: ''",)),
        ({"model": ""}, ("--model: ''",)),
        ({"threads": 0}, ("--threads: 0", ">= 1")),
    ],
)
def test_server_config_errors_name_the_option(changes, needles):
    with pytest.raises(UserError) as e:
        ServerConfig(**{"model": "m", **changes})
    message = str(e.value)
    assert "\n" not in message and "is not valid" in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_server_config_engine_part():
    config = ServerConfig(model="m", kv_cache_memory=2e9, no_prefix_caching=True, max_num_seqs=8)
    engine = config.engine_config()
    assert engine.kv_cache_memory == 2_000_000_000 and isinstance(engine.kv_cache_memory, int)
    assert not engine.enable_prefix_caching and engine.max_num_seqs == 8
    assert ServerConfig(model="m", kv_cache_memory=0.5).engine_config().kv_cache_memory == 0.5
    assert ServerConfig(model="m").model_name == "m"
    assert ServerConfig(model="m", served_model_name="demo").model_name == "demo"


def test_engine_threads_leave_a_core_to_the_event_loop_unless_told():
    from parallm.serve.config import engine_threads

    assert engine_threads(None, environ={}, cores=2) == 1
    assert engine_threads(None, environ={}, cores=16) == 15
    assert engine_threads(None, environ={}, cores=1) == 1
    assert engine_threads(3, environ={"OMP_NUM_THREADS": "1"}, cores=2) == 3
    assert engine_threads(None, environ={"OMP_NUM_THREADS": "2"}, cores=2) is None  # torch's
