"""What a token may attend to, and the backend interface every family's attention goes through.

`AttentionSpec` is the description a batch (training) or a step (serving) carries: causal,
bidirectional (`full`), per-document (packed sequences: no query sees another document) and a
sliding window; a layer with its own window (Mistral, Qwen sliding layers) narrows it with
`for_layer`. `AttentionInputs` is that description plus the tensors it needs for one forward:
the tokens' positions and, for packed documents, their document ids. Backends (training SDPA,
KV-cache generation, the serving engine's paged attention, context-parallel Ulysses and ring)
take `AttentionInputs` and must honour it; `mask` is the one definition of the rule they share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from parallm.errors import UserError

ATTENTION_KINDS = ("causal", "full", "document", "sliding")


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """The attention rule. `causal`: a query sees keys at positions <= its own. `window` W: keys
    p - W < j <= p (as `transformers` defines Mistral's). `documents`: a query sees only keys of
    its own document (ids in `AttentionInputs.document_ids`)."""

    causal: bool = True
    window: int | None = None
    documents: bool = False

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise UserError(f"attention window: {self.window} is not valid; must be >= 1")

    @classmethod
    def of_kind(cls, kind: str, window: int | None = None) -> AttentionSpec:
        """One of ATTENTION_KINDS: causal, full (bidirectional), document (per-document causal)
        or sliding (causal within `window`)."""
        if kind not in ATTENTION_KINDS:
            raise UserError(
                f"attention: {kind!r} is not valid; valid: {', '.join(ATTENTION_KINDS)}"
            )
        if kind == "sliding" and window is None:
            raise UserError("attention: 'sliding' needs a window")
        return cls(causal=kind != "full", documents=kind == "document", window=window)

    def for_layer(self, window: int | None) -> AttentionSpec:
        """This rule within a layer's own sliding window (the narrower one wins)."""
        if window is None or (self.window is not None and self.window <= window):
            return self
        return dataclasses.replace(self, window=window)


@dataclass(eq=False)
class AttentionInputs:
    """One forward's attention inputs, shared by every layer.

    positions (B, T): the tokens' positions (restarting per document in packed rows);
    document_ids (B, T) or None: which document of its row each token belongs to.
    """

    positions: torch.Tensor
    spec: AttentionSpec = field(default_factory=AttentionSpec)
    document_ids: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.spec.documents and self.document_ids is None:
            raise UserError("attention: per-document attention needs document ids for the tokens")
        if not self.spec.documents:
            self.document_ids = None

    def for_layer(self, window: int | None) -> AttentionInputs:
        spec = self.spec.for_layer(window)
        if spec is self.spec:
            return self
        return AttentionInputs(self.positions, spec, self.document_ids, self._masks)

    def is_causal_in_order(self, length: int) -> bool:
        """True when the fused causal kernel computes exactly this rule for `length` keys: causal,
        no window that bites, one document, and positions 0..T-1 in order (callers know that)."""
        s = self.spec
        return s.causal and not s.documents and (s.window is None or s.window >= length)

    def document_segments(self) -> list[list[tuple[int, int]]] | None:
        """Per row, the [start, end) spans of its documents, when every document is one
        contiguous run whose positions count 0, 1, ... (packed rows); else None. Computed once
        per forward (it reads the ids on the host) and shared by every layer."""
        if "segments" not in self._masks:
            self._masks["segments"] = _segments(self.positions, self.document_ids)
        return self._masks["segments"]

    def mask(
        self,
        k_positions: torch.Tensor | None = None,
        k_document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean mask (B, 1, Tq, Tk), True where a query may attend a key. Keys default to the
        queries themselves (then the mask is computed once per rule and reused by every layer)."""
        if k_positions is None:
            key = (self.spec.causal, self.spec.window)
            if key not in self._masks:
                self._masks[key] = attention_mask(
                    self.positions, self.positions, self.spec, self.document_ids, self.document_ids
                )
            return self._masks[key]
        return attention_mask(
            self.positions, k_positions, self.spec, self.document_ids, k_document_ids
        )


def _segments(positions: torch.Tensor, docs: torch.Tensor | None) -> list | None:
    if docs is None:
        return None
    b, t = docs.shape
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    index = torch.arange(t, device=docs.device).expand(b, t)
    start_of = torch.where(starts, index, 0).cummax(dim=1).values  # each token's run start
    if not torch.equal(positions, index - start_of):
        return None
    rows = []
    for row in starts.cpu().tolist():
        cuts = [i for i, s in enumerate(row) if s] + [t]
        rows.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
    if any(len(set(d)) != len(r) for d, r in zip(docs.cpu().tolist(), rows, strict=True)):
        return None  # a document split into several runs
    return rows


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    spec: AttentionSpec,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk) from positions (B, Tq), (B, Tk) and optional document ids."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]  # (B, Tq, Tk)
    mask = diff >= 0 if spec.causal else torch.ones_like(diff, dtype=torch.bool)
    if spec.window is not None:
        mask &= diff < spec.window
        if not spec.causal:
            mask &= diff > -spec.window
    if spec.documents and q_doc is not None and k_doc is not None:
        mask &= q_doc[:, :, None] == k_doc[:, None, :]
    return mask[:, None]


class AttentionBackend(Protocol):
    """Computes attention for one layer from rotated q, k and v.

    q: (B, T, Hq, D); k, v: (B, T, Hkv, D); `attn` describes the T tokens (already narrowed to
    the layer's window). Returns (B, T, Hq, D). A backend may keep state (a KV cache) keyed by
    `layer_idx`.
    """

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layer_idx: int,
        attn: AttentionInputs,
    ) -> torch.Tensor: ...


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    causal: bool = True,
) -> torch.Tensor:
    """SDPA on (B, T, H, D) layouts with grouped-query heads; `mask=None` means the plain causal
    (or, with `causal=False`, full) rule."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


class SDPAAttention:
    """Training / full-sequence backend: SDPA over the tokens given, no cache.

    Rows are whole sequences whose positions run 0..T-1 unless documents restart them, so the
    plain causal and full rules use the fused kernels; windows and documents build a mask. On a
    CPU, packed documents run as one causal SDPA per document instead of one masked SDPA over
    the row: the same result without the (T, T) mask or the work across documents it masks
    out (measured 1.14-1.21x on an SFT step). GPUs keep the one masked call (no host sync).
    """

    def __call__(self, q, k, v, *, layer_idx, attn: AttentionInputs):
        t = q.shape[1]
        if attn.is_causal_in_order(t):
            return sdpa(q, k, v, None)
        s = attn.spec
        if s.documents and s.causal and s.window is None and q.device.type == "cpu":
            segments = attn.document_segments()
            if segments is not None:
                return torch.stack(
                    [
                        torch.cat(
                            [
                                sdpa(q[b : b + 1, i:j], k[b : b + 1, i:j], v[b : b + 1, i:j], None)[
                                    0
                                ]
                                for i, j in row
                            ]
                        )
                        for b, row in enumerate(segments)
                    ]
                )
        if not s.causal and not s.documents and (s.window is None or s.window >= t):
            return sdpa(q, k, v, None, causal=False)
        return sdpa(q, k, v, attn.mask())
