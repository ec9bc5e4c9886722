"""A family's parallel plan: which modules tensor parallelism shards and how, and how a model is
cut into pipeline stages. Declarative, so that one plan serves every reader:

  training   `distributed/parallelize.apply_tp` turns it into DTensor styles (with sequence
             parallelism and a vocabulary-parallel loss)
  serving    `inference/tp_model.py` shards plain tensors by it and adds the collectives
  planner    `planner/state.py` derives each parameter's sharded dimension from it
  checks     `ParallelDims.validate_model` reads the sizes tensor parallelism must divide

Styles (a module's weight is (out, in) as in `nn.Linear`):
  COLWISE      shard the output features (weight dim 0, bias dim 0): q/k/v, gate/up
  ROWWISE      shard the input features (weight dim 1; bias replicated, added once after the
               sum): o, down
  VOCAB_EMBED  an embedding sharded over the vocabulary (rows)
  VOCAB_HEAD   the output head sharded over the vocabulary (logits sharded)
  SEQUENCE     replicated weights over sequence-sharded activations (norms between blocks)
  HEAD_LOCAL   replicated weights over head-sharded activations (Qwen3's q/k norms)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class TP(Enum):
    COLWISE = "colwise"
    ROWWISE = "rowwise"
    VOCAB_EMBED = "vocab_embed"
    VOCAB_HEAD = "vocab_head"
    SEQUENCE = "sequence"
    HEAD_LOCAL = "head_local"


# The dimension of a parameter (by its last name part) that a style shards; None: replicated.
_SHARDED_DIM: dict[TP, dict[str, int | None]] = {
    TP.COLWISE: {"weight": 0, "bias": 0},
    TP.ROWWISE: {"weight": 1, "bias": None},
    TP.VOCAB_EMBED: {"weight": 0},
    TP.VOCAB_HEAD: {"weight": 0, "bias": 0},
    TP.SEQUENCE: {"weight": None, "bias": None},
    TP.HEAD_LOCAL: {"weight": None, "bias": None},
}


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """Tensor-parallel styles by module name, and the pipeline cut.

    `top`: modules outside the repeated blocks; `block`: module names relative to one block of
    `layers` (a `ModuleDict`, or a tuple of them: STDiT's spatial and temporal blocks; activation
    checkpointing, compile and FSDP wrap the blocks of each). `gather_inputs`: block submodules whose sequence-sharded first input is
    all-gathered before they run (attention, MLP), with their number of positional inputs. A module named in the plan that a model (or a
    pipeline stage) does not have is skipped. `first_stage` / `last_stage`: the top modules only
    the first / last pipeline stage keeps (the others set them to None). `tp_divides(args)`:
    the sizes (by name) tensor parallelism must divide.
    """

    top: dict[str, TP]
    block: dict[str, TP]
    gather_inputs: dict[str, int] = field(default_factory=dict)
    layers: str | tuple[str, ...] = "layers"
    first_stage: tuple[str, ...] = ()
    last_stage: tuple[str, ...] = ()
    tp_divides: Callable[[Any], dict[str, int]] = field(default=lambda args: {})

    @property
    def containers(self) -> tuple[str, ...]:
        """The names of the block containers (`layers` as a tuple)."""
        return (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)

    def style_of(self, module_name: str) -> TP | None:
        """The style of a module given by its name in the model (`layers.3.mlp.up_proj`)."""
        for container in self.containers:
            prefix = f"{container}."
            if module_name.startswith(prefix):
                _, _, rel = module_name[len(prefix) :].partition(".")
                return self.block.get(rel)
        return self.top.get(module_name)

    def sharded_dim(self, param_name: str) -> int | None:
        """The dimension tensor parallelism shards of a parameter (`layers.0.self_attn.o_proj.
        weight` -> 1); None when it is replicated."""
        module, _, leaf = param_name.rpartition(".")
        style = self.style_of(module)
        return None if style is None else _SHARDED_DIM[style].get(leaf)
