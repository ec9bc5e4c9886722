"""What a plan is asked for (`PlanRequest`, validated) and what it proposes (`Layout`)."""

from __future__ import annotations

from dataclasses import dataclass

from parallm.config import AC_MODES
from parallm.distributed.parallel_dims import ParallelDims
from parallm.errors import UserError

AXES_SHOWN = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost first, as the mesh


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """GPUs, memory per GPU (GiB), sequence length, global batch (sequences per optimizer
    step), sequences per micro-batch, the bytes of the compute dtype (2: bf16), the ZeRO stage
    under FSDP (`--parallel.zero_stage`) and activation checkpointing
    (`--parallel.activation_checkpoint`: none, full or selective)."""

    gpus: int
    gpu_memory_gb: float
    seq_len: int
    batch: int
    micro_batch: int = 1
    dtype_bytes: int = 2
    zero_stage: int = 3
    activation_checkpoint: str = "none"

    def __post_init__(self) -> None:
        for name in ("gpus", "seq_len", "batch", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"plan: {name}={value!r} is not valid; must be an integer >= 1")
        if not self.gpu_memory_gb > 0:
            raise UserError(
                f"plan: gpu_memory_gb={self.gpu_memory_gb!r} is not valid; must be > 0 "
                "(GiB per GPU)"
            )
        if self.batch % self.micro_batch:
            raise UserError(
                f"plan: micro_batch={self.micro_batch} is not valid; it must divide "
                f"batch={self.batch}"
            )
        if self.dtype_bytes not in (2, 4):
            raise UserError(
                f"plan: dtype_bytes={self.dtype_bytes!r} is not valid; 2 (bf16) or 4 (float32)"
            )
        if self.zero_stage not in (1, 2, 3):
            raise UserError(f"plan: zero_stage={self.zero_stage!r} is not valid; 1, 2 or 3")
        if self.activation_checkpoint not in AC_MODES:
            raise UserError(
                f"plan: activation_checkpoint={self.activation_checkpoint!r} is not valid; "
                f"valid: {', '.join(AC_MODES)}"
            )


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Degrees of one layout (`cp_mode` only matters when cp > 1)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    cp_mode: str = "ulysses"

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def micro_batches(self, req: PlanRequest) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return req.batch // (self.dp * req.micro_batch)

    def dims(self) -> ParallelDims:
        return ParallelDims(
            dp_replicate=self.dp_replicate,
            dp_shard=self.dp_shard,
            cp=self.cp,
            tp=self.tp,
            pp=self.pp,
            world_size=self.gpus,
        )

    def label(self) -> str:
        """`dp_shard=4 tp=2`, `cp=2(ring)`; `single` for one GPU."""
        parts = []
        for axis in AXES_SHOWN:
            size = getattr(self, axis)
            if size > 1:
                parts.append(f"{axis}={size}" + (f"({self.cp_mode})" if axis == "cp" else ""))
        return " ".join(parts) or "single"

    def trainer_flags(self, req: PlanRequest) -> list[str]:
        """`parallm train` overrides that run this layout for `req`.

        Under a pipeline each trainer micro-batch is one schedule call, so the whole per-rank
        batch goes in one call, cut into pipeline micro-batches of `req.micro_batch` sequences.
        """
        flags = [f"--parallel.{axis}={getattr(self, axis)}" for axis in AXES_SHOWN]
        if self.cp > 1:
            flags.append(f"--parallel.cp_mode={self.cp_mode}")
        if self.pp > 1:
            flags.append(f"--parallel.pp_microbatches={self.micro_batches(req)}")
        if req.zero_stage != 3 and self.dims().fsdp_enabled:
            flags.append(f"--parallel.zero_stage={req.zero_stage}")
        if req.activation_checkpoint != "none":
            flags.append(f"--parallel.activation_checkpoint={req.activation_checkpoint}")
        micro = req.batch // self.dp if self.pp > 1 else req.micro_batch
        return flags + [
            f"--data.seq_len={req.seq_len}",
            f"--train.batch_size={req.batch}",
            f"--train.micro_batch_size={micro}",
        ]
