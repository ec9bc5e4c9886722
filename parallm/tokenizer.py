"""Tokenizers from Hugging Face directories, chat templates, and byte-level BPE training.

`tokenizer.json` is read with the `tokenizers` library and special tokens and the chat template
come from `tokenizer_config.json` (or `chat_template.jinja`). Chat templates are rendered with
jinja2 in a sandbox configured as `transformers` configures it (trim_blocks, lstrip_blocks, loop
controls, its `tojson`, `raise_exception` and `strftime_now`), so the same messages give the
same string. `transformers` is never imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from parallm.errors import UserError
from parallm.utils.fs import atomic_dir, read_json

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# Private-use characters that mark `{% generation %}` blocks while assistant spans are rendered.
_GEN_START, _GEN_END = "\ue000", "\ue001"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which assistant-mask templates use: renders the
    body unchanged, between two marker characters when `_parallm_mark_generation` is set (how
    `assistant_spans` finds the template's own assistant spans)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        nodes = jinja2.nodes
        marking = nodes.Name("_parallm_mark_generation", "load", lineno=lineno)

        def marker(ch: str):
            expr = nodes.CondExpr(marking, nodes.Const(ch), nodes.Const(""), lineno=lineno)
            return nodes.Output([expr], lineno=lineno)

        return nodes.Scope([marker(_GEN_START), *body, marker(_GEN_END)], lineno=lineno)


def _raise_exception(message: str):
    raise UserError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers replaces jinja's tojson (which HTML-escapes) with plain json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _jinja_env() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its directory."""

    def __init__(
        self, backend: tokenizers.Tokenizer, config: dict | None = None, *, eos_ids=()
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self._extra_eos_ids = [int(i) for i in eos_ids]

    # -- files ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` if present, and
        the extra stop ids of `generation_config.json`."""
        d = Path(path)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise UserError(
                f"{d}: no tokenizer.json (parallm reads fast tokenizers; convert a "
                "sentencepiece-only model with transformers once and save it)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:
            raise UserError(f"{tok_file}: not a valid tokenizer.json ({e})") from None
        config = _read_json_if(d / "tokenizer_config.json")
        if (d / "chat_template.jinja").is_file():
            config["chat_template"] = (d / "chat_template.jinja").read_text()
        eos = _read_json_if(d / "generation_config.json").get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        return cls(backend, config, eos_ids=eos_ids)

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into the directory `path`, which
        `transformers.AutoTokenizer.from_pretrained` loads (as `PreTrainedTokenizerFast`)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        config.setdefault("clean_up_tokenization_spaces", False)
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    # -- special tokens ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def special_token(self, key: str) -> str | None:
        return _token_text(self.config.get(key))

    def _id(self, key: str) -> int | None:
        text = self.special_token(key)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the eos token and generation_config's eos ids."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        return ids + [i for i in self._extra_eos_ids if i not in ids]

    # -- text ----------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` applies the post-processor (e.g. a leading BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens added) and each token's character span."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------

    @cached_property
    def _templates(self) -> dict[str, str]:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            return {t["name"]: t["template"] for t in template}
        return {} if template is None else {"default": template}

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt string for `messages`, as `transformers`' `apply_chat_template(...,
        tokenize=False)` renders it. Encode the result with `add_special_tokens=False`."""
        templates = self._templates
        if not templates:
            raise UserError(
                "tokenizer_config.json has no chat_template; this model has no chat format"
            )
        name = template or ("tool_use" if tools and "tool_use" in templates else "default")
        if name not in templates:
            raise UserError(f"chat template {name!r} not found; available: {', '.join(templates)}")
        compiled = _compiled(templates[name])
        specials = {k: self.special_token(k) for k in SPECIAL_KEYS if k in self.config}
        return compiled.render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **specials,
            **kwargs,
        )

    def assistant_spans(
        self, messages: list[dict[str, Any]], **kwargs: Any
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns.

        With `{% generation %}` blocks in the template, the spans are those blocks (what
        `transformers`' `return_assistant_tokens_mask` uses). Without them, each assistant turn i
        is what rendering messages[:i + 1] adds to messages[:i] with the generation prompt
        (its content and end-of-turn tokens); a template for which those renders are not
        prefixes of the whole conversation needs generation blocks, and says so.
        """
        marked = self.apply_chat_template(messages, _parallm_mark_generation=True, **kwargs)
        if _GEN_START in marked:
            text, spans, pos, start = [], [], 0, 0
            for ch in marked:
                if ch == _GEN_START:
                    start = pos
                elif ch == _GEN_END:
                    spans.append((start, pos))
                else:
                    text.append(ch)
                    pos += 1
            return "".join(text), [s for s in spans if s[1] > s[0]]
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.apply_chat_template(messages[:i], add_generation_prompt=True, **kwargs)
            through = self.apply_chat_template(messages[: i + 1], **kwargs)
            if not (marked.startswith(through) and through.startswith(before)):
                raise UserError(
                    "chat template: rendering the conversation turn by turn does not give its "
                    "prefixes, so the assistant tokens cannot be found; add {% generation %} "
                    "blocks around the assistant content"
                )
            spans.append((len(before), len(through)))
        return marked, [s for s in spans if s[1] > s[0]]


_COMPILED: dict[str, jinja2.Template] = {}


def _compiled(source: str) -> jinja2.Template:
    if source not in _COMPILED:
        try:
            _COMPILED[source] = _jinja_env().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(
                f"chat template: syntax error on line {e.lineno} ({e.message})"
            ) from None
    return _COMPILED[source]


def _read_json_if(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Training a tokenizer

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# The chat format of models parallm trains from scratch: a role header per turn, each turn closed
# by EOS (so generation stops after the assistant's turn), assistant turns marked for SFT masks.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 / Llama 3 style) on `texts`.

    Every byte is in the base alphabet, so any text round-trips. Encoding with special tokens
    adds BOS in front, as Llama 3's tokenizer does; documents are separated by EOS when packed.
    """
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, backend.token_to_id(BOS))],
    )
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "model_max_length": 2**30}
    return Tokenizer(backend, config)


def save_tokenizer_dir(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write a tokenizer alone as a directory, atomically."""
    with atomic_dir(path) as tmp:
        tokenizer.save(tmp)
    return Path(path)
