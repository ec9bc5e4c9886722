"""Tokenizers and chat templates give what `transformers` gives on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parallm.errors import UserError
from parallm.tokenizer import Tokenizer, save_tokenizer_dir, train_bpe_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "def greet(name):\n    return f'héllo, {name}! 👋'\n",
    "import os\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
] * 20

# Templates in the style of the model families parallm serves (written for these tests).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TOOLS_STYLE = """{%- if tools %}
<|im_start|>system
You may call these tools:
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if loop.first and message.role != 'system' and not tools %}
<|im_start|>system
You are helpful.<|im_end|>
    {% endif %}
<|im_start|>{{ message.role }}
{% generation %}{{ message.content }}{% endgeneration %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "  What is 2+2? ünïcode  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": 'Say "hi" <tag> & more'},
]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int ü"}}}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tokenizer, Path]:
    tok = train_bpe_tokenizer(iter(TEXTS), vocab_size=400)
    d = save_tokenizer_dir(tok, tmp_path_factory.mktemp("tok") / "tokenizer")
    return tok, d


def test_trained_tokenizer_matches_transformers(trained):
    tok, d = trained
    ref = transformers.AutoTokenizer.from_pretrained(d)
    again = Tokenizer.from_dir(d)
    for text in [*TEXTS[:3], "", "x = 1  # ünïcode ✓\n\tend"]:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"] == again.encode(text)
        assert ids[0] == tok.bos_token_id  # BOS in front, as Llama 3 does
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.eos_token_ids == [ref.eos_token_id]
    assert tok.pad_token_id == ref.pad_token_id and tok.vocab_size == len(ref)


@pytest.mark.parametrize(
    "template, tools",
    [(LLAMA3_STYLE, None), (CHATML_TOOLS_STYLE, None), (CHATML_TOOLS_STYLE, TOOLS)],
)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_like_transformers(
    trained, tmp_path, template, tools, add_generation_prompt
):
    _, src = trained
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoTokenizer.from_pretrained(d)
    expected = ref.apply_chat_template(
        MESSAGES, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = Tokenizer.from_dir(d).apply_chat_template(
        MESSAGES, tools=tools, add_generation_prompt=add_generation_prompt
    )
    assert got == expected
    assert "<|begin_of_text|>" in got or "<|im_start|>" in got


def test_chat_template_from_jinja_file_and_errors(trained, tmp_path):
    _, src = trained
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_dir(d)
    with pytest.raises(UserError, match="no chat_template"):
        tok.apply_chat_template(MESSAGES)
    (d / "chat_template.jinja").write_text(LLAMA3_STYLE)
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template(MESSAGES[:2]).startswith("<|begin_of_text|><|start_header_id|>")
    with pytest.raises(UserError, match="unknown role robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_missing_or_corrupt_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
