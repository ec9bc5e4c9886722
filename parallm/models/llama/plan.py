"""The Llama family's parallel plan (Megatron-style tensor parallelism, sequence parallel).

  embed_tokens   vocabulary-parallel (rows of the table)
  norms          sequence parallel: each TP rank normalises its slice of the tokens
  q/k/v, gate/up column-parallel (heads / ffn columns)
  o, down        row-parallel (partial sums reduced back to sequence shards)
  q/k norms      (Qwen3) replicated weights over head-sharded activations
  lm_head        column-parallel over the vocabulary (the loss runs on the vocabulary shards)

Pipeline stages: the first keeps `embed_tokens`, the last `norm` and `lm_head`.
"""

from __future__ import annotations

from parallm.models.llama.model import ModelArgs
from parallm.models.plan import TP, ParallelPlan


def _tp_divides(args: ModelArgs) -> dict[str, int]:
    return {
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "ffn_dim": args.ffn_dim,
        "vocab_size": args.vocab_size,
    }


PLAN = ParallelPlan(
    top={"embed_tokens": TP.VOCAB_EMBED, "norm": TP.SEQUENCE, "lm_head": TP.VOCAB_HEAD},
    block={
        "input_layernorm": TP.SEQUENCE,
        "self_attn.q_proj": TP.COLWISE,
        "self_attn.k_proj": TP.COLWISE,
        "self_attn.v_proj": TP.COLWISE,
        "self_attn.q_norm": TP.HEAD_LOCAL,
        "self_attn.k_norm": TP.HEAD_LOCAL,
        "self_attn.o_proj": TP.ROWWISE,
        "post_attention_layernorm": TP.SEQUENCE,
        "mlp.gate_proj": TP.COLWISE,
        "mlp.up_proj": TP.COLWISE,
        "mlp.down_proj": TP.ROWWISE,
    },
    gather_inputs={"self_attn": 5, "mlp": 1},  # (x, cos, sin, attn, backend); (x,)
    layers="layers",
    first_stage=("embed_tokens",),
    last_stage=("norm", "lm_head"),
    tp_divides=_tp_divides,
)
