"""Incremental detokenization for streaming: token ids in, new text out, stop strings applied.

Decoding the whole output again for every token costs O(n) per token. Instead, as the serving
engines of this field do, only a short window of ids is decoded: the tokens already turned into
text that precede the new ones (`prefix`, decoded for context only) and the tokens not yet turned
into text (`read` onwards). The new text is decode(window) minus decode(prefix). The context
matters for decoders whose output for a token depends on its neighbours (a leading-space rule,
byte fallback); byte-level BPE would not need it, but costs nothing with it.

A byte-level token can end in the middle of a multi-byte UTF-8 character; the tokenizer then
decodes the dangling bytes as U+FFFD. Such text is not emitted: the tokens stay in the window
until a later token completes the character.

Stop strings: text that could be the start of a stop string is held back until the next tokens
show it is not, so a stream never shows part of a stop string (unless the stop string is to be
included anyway). A match ends the output: `stopped` is set and the text is cut there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context for the first output tokens (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    """`parallm.tokenizer.Tokenizer` or a `tokenizers.Tokenizer`."""

    def decode(self, ids: list[int], *, skip_special_tokens: bool) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text, one token at a time.

    `add(token_id)` returns the text that token made available. The concatenation of every
    `add` (and the final `flush`) is `text`. When the sequence finishes for any reason other
    than a stop string (length, a stop token), call `flush()` once for the held-back rest.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]  # an empty stop string would match before any text
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped: str | None = None  # the stop string that ended the output
        self._max_stop = max((len(s) for s in self.stop), default=0)
        context = list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            # A prompt given as ids can end inside a character; its dangling bytes would merge
            # with the output's first bytes. Decode the output on its own instead, as a full
            # decode of the output ids does.
            context = []
        self._ids = context  # the window: ids[:read] are decoded, ids[read:] are pending
        self._read = len(context)
        self._decoded = ""  # all output text decoded so far (cut at a stop string)
        self._emitted = 0  # how much of `_decoded` add / flush have returned

    @property
    def text(self) -> str:
        """All output text made available so far (what `add` and `flush` returned)."""
        return self._decoded[: self._emitted]

    def add(self, token_id: int) -> str:
        """Append one generated token; return the new text it makes available (maybe "")."""
        if self.stopped is not None:
            return ""
        self._ids.append(token_id)
        delta = self._decode_pending(final=False)
        return self._extend(delta, final=False)

    def flush(self) -> str:
        """The rest at the end of the sequence: held-back text that did not become a stop string,
        and dangling bytes of an unfinished character (decoded as U+FFFD, as a full decode
        shows them, since no more bytes will come)."""
        if self.stopped is not None:
            return ""
        delta = self._decode_pending(final=True)
        return self._extend(delta, final=True)

    def _decode_pending(self, *, final: bool) -> str:
        """The text of the pending ids, or "" while it ends in an unfinished character."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[: self._read])
        window_text = self._decode(self._ids)
        # No growth: a skipped special token. A trailing U+FFFD: a character still incomplete.
        if not final and (
            len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR)
        ):
            return ""
        # Slide the window: the ids just decoded become the context of the next ones.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _extend(self, delta: str, *, final: bool) -> str:
        """Append decoded text, apply the stop strings and emit what is safe to show."""
        # A stop string found now must end in the new text, so the search starts just early
        # enough to catch one that began in the held-back tail.
        start = max(0, len(self._decoded) - self._max_stop + 1)
        self._decoded += delta
        match = self._find_stop(start)
        if match is not None:
            at, stop = match
            self.stopped = stop
            self._decoded = self._decoded[
                : at + len(stop) if self.include_stop_str_in_output else at
            ]
            return self._emit(len(self._decoded))
        hold = 0 if final or self.include_stop_str_in_output else self._stop_prefix_len()
        return self._emit(len(self._decoded) - hold)

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._decoded[self._emitted : end]
        self._emitted = end
        return out

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """The earliest stop string in the text from `start` (the first listed wins a tie)."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = self._decoded.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that a stop string begins with."""
        text = self._decoded
        hold = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        return hold
