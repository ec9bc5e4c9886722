"""The STDiT3 family's parallel plan: no tensor or pipeline parallelism (refused before launch:
the family supports data parallel, ZeRO and sequence parallel over the spatial tokens), so no
module styles; the repeated blocks are the spatial and the temporal ones, which activation
checkpointing, compile and FSDP wrap one by one.
"""

from __future__ import annotations

from parallm.models.plan import ParallelPlan

PLAN = ParallelPlan(top={}, block={}, layers=("spatial_blocks", "temporal_blocks"))
