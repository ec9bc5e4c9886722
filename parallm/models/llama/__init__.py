"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3 on one decoder definition."""

from parallm.models.llama import hf_adapter
from parallm.models.llama.model import ModelArgs, Transformer, initial_value
from parallm.models.llama.plan import PLAN
from parallm.models.registry import FamilySpec, ModelFacts, register


def _facts(args: ModelArgs) -> ModelFacts:
    return ModelFacts(
        n_layers=args.n_layers,
        dim=args.dim,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        ffn_dim=args.ffn_dim,
        vocab_size=args.vocab_size,
        max_seq_len=args.max_seq_len,
        tie_embeddings=args.tie_embeddings,
        num_params=args.num_params(),
        num_params_no_embed=args.num_params(embeddings=False),
    )


def _flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding params + causal attention (forward x 3)."""
    matmul = 6 * args.num_params(embeddings=False) + 6 * args.dim * args.vocab_size
    attention = 6 * args.n_layers * args.n_heads * args.head_dim * seq_len  # 12*L*H*D*T / 2
    return float(matmul + attention)


def _tied(args: ModelArgs) -> dict[str, str]:
    return {"lm_head.weight": "embed_tokens.weight"} if args.tie_embeddings else {}


def _args_from_config(cfg, vocab_size: int) -> ModelArgs:
    """A fresh model from the job's `[model]` section (`model.architecture` is the model type)."""
    m = cfg.model
    return ModelArgs(
        architecture=m.architecture,
        vocab_size=m.vocab_size or vocab_size,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads or m.n_heads,
        head_dim=m.head_dim or m.dim // m.n_heads,
        ffn_dim=m.ffn_dim,
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        max_seq_len=m.max_seq_len,
        tie_embeddings=m.tie_embeddings,
        qkv_bias=m.architecture == "qwen2",
        qk_norm=m.architecture == "qwen3",
    )


SPEC = register(
    FamilySpec(
        name="llama",
        model_types=tuple(hf_adapter.MODEL_TYPES),
        architectures=hf_adapter.ARCHITECTURES,
        args_cls=ModelArgs,
        model_cls=Transformer,
        hf=hf_adapter,
        plan=PLAN,
        facts=_facts,
        flops_per_token=_flops_per_token,
        initial_value=initial_value,
        tied=_tied,
        args_from_config=_args_from_config,
    )
)

__all__ = ["SPEC", "ModelArgs", "Transformer"]
