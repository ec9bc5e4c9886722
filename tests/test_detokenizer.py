"""Incremental detokenization: streamed chunks add up to the full decode, stop strings hold."""

from __future__ import annotations

import random

import pytest

from parallm.inference.detokenizer import IncrementalDetokenizer
from parallm.tokenizer import EOS, PAD, Tokenizer, train_bpe_tokenizer

TEXTS = [
    "Hello world, this is plain text with some words.\n",
    "héllo wörld, naïve café — déjà vu, Ærøskøbing\n",
    "日本語のテキストです。中文也可以。한국어 텍스트\n",
    "emoji 👋🏽 party 🎉🎉 ok 🧑‍💻 done\n",
] * 20

SAMPLES = [
    "naïve café 👋🏽 日本語 Ω≈ç√ 🎉!",
    "Hello world, this is plain text with some words: ünïcödé.",
    "🧑‍💻🧑‍💻 zero-width joiners, ñandú, 中文也可以。",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP: 𐍈 🀄",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe_tokenizer(iter(TEXTS), vocab_size=350)


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


def _char_ids(tok: Tokenizer, text: str) -> list[int]:
    """Ids that split `text` at every character, so a stop string spans several tokens."""
    return [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]


@pytest.mark.parametrize("text", SAMPLES, ids=["mixed", "latin", "zwj-cjk", "astral"])
def test_chunks_add_up_to_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("A prompt: "))
    chunks = _stream(detok, ids)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text
    assert not any("\ufffd" in c for c in chunks)
    # Some character spans several tokens, so some token must have been held back.
    assert "" in chunks[:-1]


def test_special_tokens_skipped_or_kept(tok):
    eos, pad = tok.backend.token_to_id(EOS), tok.backend.token_to_id(PAD)
    body = [tok.encode(t, add_special_tokens=False) for t in ("café", " 👋🏽", " ok")]
    ids = body[0] + [pad] + body[1] + [pad, pad] + body[2] + [eos]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, tok.encode("x"), skip_special_tokens=skip)
        chunks = _stream(detok, ids)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in c for c in chunks)
    assert detok.text.endswith(EOS)


def test_random_ids_match_full_decode(tok):
    # Random ids include stray UTF-8 bytes: invalid sequences must come out as a full decode
    # shows them (U+FFFD), and nothing may be lost or doubled.
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 8))]
        for skip in (True, False):
            chunks = _stream(IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip), ids)
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip), ids


def test_incomplete_character_at_the_end_is_flushed(tok):
    ids = _char_ids(tok, "a👋")
    assert len(ids) > 2  # the emoji is split into byte tokens
    detok = IncrementalDetokenizer(tok, [])
    chunks = [detok.add(i) for i in ids[:-1]]
    assert chunks[0] == "a" and all(c == "" for c in chunks[1:])
    assert detok.flush() == tok.decode(ids[:-1])[1:] and "\ufffd" in detok.text


def test_decoding_uses_a_window(tok):
    # Decoding must not grow with the output: every decode call sees a few ids only.
    class Counting:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids, *, skip_special_tokens):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = Counting()
    ids = tok.encode(" ".join(SAMPLES) * 10, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, tok.encode("prompt " * 20))
    _stream(detok, ids)
    assert len(ids) > 300 and counting.longest <= 10
    assert detok.text == tok.decode(ids)


# -- stop strings ----------------------------------------------------------------------------------


def test_stop_string_split_across_tokens(tok):
    text = "Hello wörld, please stop here now"
    ids = _char_ids(tok, text)
    detok = IncrementalDetokenizer(tok, [], stop=["stop"])
    emitted = ""
    for i in ids:
        emitted += detok.add(i)
        # Never any part of the stop string on the stream: always a prefix of the final text.
        assert "Hello wörld, please ".startswith(emitted), emitted
        if detok.stopped:
            break
    assert detok.stopped == "stop"
    assert emitted == detok.text == "Hello wörld, please "
    assert detok.add(ids[-1]) == "" and detok.flush() == "" and detok.text == emitted


def test_false_start_is_held_then_released(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["abc"])
    steps = [(ch, detok.add(i)) for ch in "xxabyyab" for i in _char_ids(tok, ch)]
    assert steps == [
        ("x", "x"),
        ("x", "x"),
        ("a", ""),  # could start "abc"
        ("b", ""),
        ("y", "aby"),  # "aby" is not "abc": released
        ("y", "y"),
        ("a", ""),
        ("b", ""),
    ]
    assert detok.stopped is None
    # Finished by length: the held-back "ab" is part of the output after all.
    assert detok.flush() == "ab" and detok.text == "xxabyyab"


def test_stop_inside_one_token_and_earliest_stop_wins(tok):
    ids = tok.encode("Hello world, this is plain text", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["plain", "is"])
    out = "".join(detok.add(i) for i in ids)
    assert detok.stopped == "is" and out == detok.text == "Hello world, th"


def test_include_stop_str_in_output(tok):
    ids = _char_ids(tok, "xxabyyabcdef")
    detok = IncrementalDetokenizer(tok, [], stop=["abc"], include_stop_str_in_output=True)
    out = "".join(detok.add(i) for i in ids)
    assert detok.stopped == "abc" and out == detok.text == "xxabyyabc"


def test_multibyte_stop_string(tok):
    ids = tok.encode("café 👋🏽 then more", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("p"), stop=["👋"])
    chunks = _stream(detok, ids)
    assert detok.stopped == "👋" and "".join(chunks) == detok.text == "café "
