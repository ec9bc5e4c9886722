"""Degrees of parallelism -> one named `DeviceMesh`, validated before any communication.

The mesh has the axes ("pp", "dp_replicate", "dp_shard", "cp", "tp"), outermost first, so that
tensor parallelism (the most communication per step) runs between neighbouring ranks. Flattened
views serve the pieces that span several axes:
  "dp"          dp_replicate x dp_shard: which slice of the global batch a rank loads
  "dp_shard_cp" dp_shard x cp: what FSDP shards over (context-parallel ranks hold the same
                parameters and each sees part of every sequence, so their gradients average too)
  "dp_cp"       dp_replicate x dp_shard x cp: over which the loss is averaged for logging
Nothing else in parallm reads ranks or environment variables to learn the layout.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parallm.errors import UserError

if TYPE_CHECKING:  # torch is imported where a mesh is built: degrees are checked without it
    from torch.distributed.device_mesh import DeviceMesh

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(kw_only=True)
class ParallelDims:
    """The degrees of one layout; `dp_shard=-1` takes whatever the others leave of the world."""

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int = 1
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "pp"):
            value = getattr(self, name)
            if value < 1:
                raise UserError(f"parallel.{name}: {value} is not valid; must be >= 1")
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise UserError(self._mismatch("cannot fill parallel.dp_shard=-1"))
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise UserError(f"parallel.dp_shard: {self.dp_shard} is not valid; >= 1 or -1 (auto)")
        if others * self.dp_shard != self.world_size:
            raise UserError(self._mismatch("the degrees must multiply to the world size"))

    @classmethod
    def from_config(cls, pcfg, world_size: int) -> ParallelDims:
        """From a `ParallelConfig` (the `[parallel]` section) and the number of processes."""
        return cls(
            dp_replicate=pcfg.dp_replicate,
            dp_shard=pcfg.dp_shard,
            tp=pcfg.tp,
            pp=pcfg.pp,
            cp=pcfg.cp,
            world_size=world_size,
        )

    def _mismatch(self, why: str) -> str:
        return (
            f"parallel layout: {why}: dp_replicate={self.dp_replicate} x dp_shard="
            f"{self.dp_shard} x cp={self.cp} x tp={self.tp} x pp={self.pp} vs world size "
            f"{self.world_size} (processes started)"
        )

    # -- which pieces are on ------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks load different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP (or plain replication through it) manages parameters when any data or context
        axis has more than one rank."""
        return self.dp_replicate * self.dp_shard * self.cp > 1

    def validate_model(
        self, args, *, seq_len: int, cp_mode: str, n_stages: int, skip: tuple[str, ...] = ()
    ) -> None:
        """Check the layout against the model (its family's plan and facts) and the sequence
        before any communication; sizes named in `skip` are not known yet (the vocabulary
        before the tokenizer is read)."""
        from parallm.models.registry import family_of_args

        spec = family_of_args(args)
        facts = spec.facts(args)
        n_heads, n_kv_heads, n_layers = facts.n_heads, facts.n_kv_heads, facts.n_layers
        if self.tp > 1:
            for name, value in spec.plan.tp_divides(args).items():
                if name not in skip and value % self.tp:
                    raise UserError(
                        f"parallel.tp: {self.tp} must divide the model's {name}={value}"
                    )
            if seq_len % self.tp:  # sequence parallelism splits the norms' tokens over tp
                raise UserError(f"parallel.tp: {self.tp} must divide data.seq_len={seq_len}")
        if self.cp > 1:
            if cp_mode == "ulysses":
                tp_heads = (n_heads // self.tp, n_kv_heads // self.tp)
                if any(h % self.cp for h in tp_heads):
                    raise UserError(
                        f"parallel.cp: {self.cp} must divide the attention heads per tensor-"
                        f"parallel rank (n_heads={tp_heads[0]}, n_kv_heads={tp_heads[1]}) for "
                        "cp_mode='ulysses'; use cp_mode='ring' or a smaller cp"
                    )
            chunks = self.cp * (2 if cp_mode == "ring" else 1) * self.tp
            if seq_len % chunks:
                raise UserError(
                    f"parallel.cp: data.seq_len={seq_len} must be divisible by {chunks} "
                    f"(cp={self.cp}{' x 2 load-balanced chunks' if cp_mode == 'ring' else ''}"
                    f"{f' x tp={self.tp}' if self.tp > 1 else ''})"
                )
        if n_stages > n_layers:
            raise UserError(
                f"parallel.pp: {n_stages} pipeline stages need at least as many layers; the "
                f"model has n_layers={n_layers}"
            )

    # -- the mesh ------------------------------------------------------------------------------

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the world mesh (all ranks must call this together)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        assert dist.is_initialized(), "build_mesh needs an initialized process group"
        # torch >= 2.11 warns at every slice of a flattened axis ("dp", "dp_shard_cp", ...)
        # from the root mesh, which FSDP's (dp_replicate, dp_shard_cp) mesh needs; the slices
        # are what torch documents today, so the warning is silenced rather than printed by
        # every rank many times.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
        shape = tuple(getattr(self, a) for a in AXES)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
        mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")
        mesh[("dp_replicate", "dp_shard", "cp")]._flatten("dp_cp")
        self._mesh = mesh
        return mesh

    @property
    def mesh(self) -> DeviceMesh:
        assert self._mesh is not None, "call build_mesh first"
        return self._mesh

    def coordinate(self, axis: str) -> int:
        """This rank's index along `axis` (0 when not distributed)."""
        if self._mesh is None:
            return 0
        return self._mesh[axis].get_local_rank()
