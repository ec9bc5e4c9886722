"""Choose a training layout: enumerate the valid ones, predict memory, traffic and step time.

Everything is arithmetic on the model family's facts and plan; nothing is allocated. The state (parameters, gradients,
AdamW) is exact, from `planner.state`; activations, traffic and time are standard estimates whose
assumptions are listed here, so a reader can tell what a number means and where it is rough.

Numerics, as the trainer runs (`train/trainer.py`, `train/layout.py`):
  * Parameters are stored in float32 and sharded by FSDP; they are AdamW's master weights, so
    there is no separate master copy. Gradients are reduced in float32 (`reduce_dtype`) and kept
    sharded in float32; AdamW adds two float32 moments and a float32 step per tensor. That is
    16 bytes per parameter, the same total as the usual "bf16 weights + bf16 grads + fp32 master
    + 2 fp32 moments" accounting, divided differently.
  * Compute runs in `dtype_bytes` (2: bf16) through FSDP mixed precision, or autocast when FSDP
    is off; activations and gathered parameters are in that dtype.
  * `gathered` is the transient working copies: with FSDP and no pipeline, the root's gathered
    parameters (embeddings, head: not resharded after forward) plus two gathered blocks (the one
    running and the one prefetched) and one block's unsharded gradients (compute dtype plus the
    float32 copy reduce-scattered). Under a pipeline, torch.distributed.pipelining keeps the
    stage's parameters gathered and its gradients unsharded (float32) across micro-batches until
    the step's single reduce-scatter. Without FSDP, autocast caches a low-precision copy of every
    weight for the backward pass.
  * ZeRO-3 (the default `zero_stage`), no activation checkpointing, no CPU offload.

Activations per layer and micro-batch, for N = micro_batch * seq_len / cp local tokens (SDPA with
a flash kernel: no (T, T) scores), in elements:
  2 h / tp               the two RMSNorm inputs, sequence-sharded (sequence parallelism)
  2 h                    the all-gathered norm outputs that q/k/v and gate/up save for their
                         weight gradients (DTensor saves the gathered tensor, not the shard)
  (3 Hq + 3 Hkv) D / tp  q, k, v; the rotated q, k; the attention output
  4 ffn / tp             gate, up, silu(gate) and their product
plus a float32 log-sum-exp per query row and head. A 1F1B pipeline rank r keeps min(pp - r, m)
micro-batches in flight; the last stage also holds the micro-batch's logits (N x vocab / tp):
the float32 upcast and the float32 log-softmax cross entropy saves, LOGIT_BYTES per logit.

Traffic: the bytes one GPU sends per optimizer step on each mesh axis, ring collectives
(all-gather / reduce-scatter move (n - 1) / n of the full size, all-reduce twice that):
  dp_shard_cp  FSDP: per micro-batch all-gather the parameters for forward and the blocks again
               for backward (compute dtype), reduce-scatter the gradients (float32); under a
               pipeline about one gather per micro-batch and one reduce-scatter per step
  dp_replicate HSDP all-reduce of the sharded float32 gradients, per gradient sync
  tp           sequence parallelism: per layer 2 all-gathers and 2 reduce-scatters of (N, h)
               forward and the same backward (8 per layer), 2 more for the embedding's
               reduce-scatter and the head's all-gather
  cp           Ulysses: all-to-all of q, k, v and the output, forward and backward; ring: K/V
               round the ring forward and backward, dK/dV accumulators (float32) cp hops
  pp           hidden states forward and their gradients back, (N, h / tp) per micro-batch and
               stage boundary; tied embeddings also all-reduce the embedding gradient

Time (roofline, no latency terms): compute = FLOPs / (peak * MFU) with the FLOPs of
`train.metrics.flops_per_token` split by stage; TP, CP and PP transfers block the compute stream
(as they do here); FSDP traffic overlaps with compute and only its excess shows. The slowest
pipeline rank sets the pace, stretched by the 1F1B bubble (pp - 1) / m for m micro-batches. A
group whose ranks fit in one node (within GPUS_PER_NODE, the mesh keeps tp innermost, then cp,
dp_shard, dp_replicate, pp) uses NVLink, otherwise the inter-node network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from parallm.models.registry import family_of_args
from parallm.planner.spec import Layout, PlanRequest
from parallm.planner.state import (
    RankHoldings,
    facts_of,
    layer_params,
    local_numel,
    param_specs,
    predict_state_bytes,
    rank_holdings,
)

GIB = 2**30
# Hardware defaults: H100 SXM nodes of 8 GPUs.
PEAK_FLOPS = 989e12  # dense bf16 FLOP/s of an H100 (as train.metrics.PEAK_BF16_FLOPS)
MFU = 0.45  # achieved fraction of peak for a tuned dense transformer step (40-50% is typical)
GPUS_PER_NODE = 8  # NVLink domain; tensor parallelism stays inside it
INTRA_NODE_BW = 450e9  # bytes/s per GPU and direction over NVLink 4 (900 GB/s bidirectional)
INTER_NODE_BW = 50e9  # bytes/s per GPU over a 400 Gb/s InfiniBand NIC per GPU
RESERVED_BYTES = 2 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
TP_DEGREES = (1, 2, 4, 8)  # powers of two up to one node
# Numerics (see the module docstring).
MASTER_BYTES = 4  # float32 sharded parameters
GRAD_BYTES = 4  # float32 gradients (reduce_dtype)
LOGIT_BYTES = 8  # float32 logits + float32 log-softmax saved by cross entropy
LSE_BYTES = 4  # flash attention's float32 log-sum-exp per query row and head
COMM_AXES = ("dp_shard_cp", "dp_replicate", "tp", "cp", "pp")


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """The machine the plan is for; the defaults are H100 SXM nodes of 8 GPUs."""

    peak_flops: float = PEAK_FLOPS
    mfu: float = MFU
    gpus_per_node: int = GPUS_PER_NODE
    intra_node_bw: float = INTRA_NODE_BW
    inter_node_bw: float = INTER_NODE_BW
    reserved_bytes: int = RESERVED_BYTES


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the layout's fullest rank (see the module docstring)."""

    parameters: int  # float32 sharded parameters = AdamW master weights (exact)
    gradients: int  # float32 sharded gradients (exact)
    optimizer: int  # AdamW moments and steps (exact)
    gathered: int  # transient working copies of parameters and gradients
    activations: int
    logits: int
    reserved: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass(frozen=True)
class Candidate:
    """One layout's prediction. Traffic is bytes (and seconds) per GPU per optimizer step by
    mesh axis, the largest over pipeline ranks; compute is the busiest rank's."""

    layout: Layout
    micro_batches: int  # per optimizer step and data-parallel rank
    memory: Memory
    fullest_pp_rank: int
    comm_bytes: dict[str, float]
    comm_s: dict[str, float]
    compute_s: float
    step_s: float
    tokens_per_s: float
    fits: bool
    overrides: list[str] = field(default_factory=list)  # `parallm train` flags

    def to_dict(self) -> dict:
        """A JSON-able form, with the layout's label and the memory total."""
        out = asdict(self)
        out["layout"]["label"] = self.layout.label()
        out["memory"]["total"] = self.memory.total
        return out


@dataclass(frozen=True)
class _Rank:
    """What the estimates of pipeline rank `r` share (its dp/cp/tp rank 0 holds the largest
    FSDP chunks, so it stands for its stage)."""

    r: int
    held: RankHoldings
    m: int  # micro-batches per step
    tokens: int  # local tokens per micro-batch (B * T / cp)
    layer_tp: int  # elements of one layer after tensor parallelism
    blocks_tp: int  # ... of the rank's layers
    rank_tp: int  # ... of everything the rank holds
    state: dict[str, int]  # exact float32 state bytes


def _rank(args, lay: Layout, req: PlanRequest, r: int) -> _Rank:
    held = rank_holdings(args, lay.pp, r)
    layer_tp = sum(local_numel(s, tp=lay.tp) for s in layer_params(args))
    blocks_tp = held.n_layers * layer_tp
    return _Rank(
        r=r,
        held=held,
        m=lay.micro_batches(req),
        tokens=req.micro_batch * req.seq_len // lay.cp,
        layer_tp=layer_tp,
        blocks_tp=blocks_tp,
        rank_tp=blocks_tp + sum(local_numel(s, tp=lay.tp) for s in held.ends),
        state=predict_state_bytes(
            args, lay.dims(), rank_coords={"pp": r}, dtype_bytes=MASTER_BYTES
        ),
    )


def activation_bytes_per_layer(args, tokens: int, tp: int, dtype_bytes: int) -> float:
    """Bytes one decoder layer keeps for backward for `tokens` local tokens (module docstring)."""
    f = facts_of(args)
    h, d, hq, hkv = f.dim, f.head_dim, f.n_heads, f.n_kv_heads
    elements = 2 * h / tp + 2 * h + (3 * hq + 3 * hkv) * d / tp + 4 * f.ffn_dim / tp
    return tokens * (elements * dtype_bytes + hq / tp * LSE_BYTES)


def _memory(args, lay: Layout, req: PlanRequest, hw: Hardware, rk: _Rank) -> Memory:
    d, mixed = req.dtype_bytes, req.dtype_bytes < MASTER_BYTES
    if not lay.dims().fsdp_enabled:
        gathered = rk.rank_tp * d if mixed else 0  # autocast's cached low-precision weights
    elif lay.pp == 1:
        # The root (ends) stays gathered; two blocks gathered, one block's gradients unsharded.
        gathered = (rk.rank_tp - rk.blocks_tp + 2 * rk.layer_tp) * d
        gathered += rk.layer_tp * (GRAD_BYTES + (d if mixed else 0))
    else:
        gathered = rk.rank_tp * (d + GRAD_BYTES)
    in_flight = min(lay.pp - rk.r, rk.m) if lay.pp > 1 else 1
    per_layer = activation_bytes_per_layer(args, rk.tokens, lay.tp, d)
    return Memory(
        parameters=rk.state["parameters"],
        gradients=rk.state["gradients"],
        optimizer=rk.state["optimizer"],
        gathered=int(gathered),
        activations=int(per_layer * rk.held.n_layers * in_flight),
        logits=rk.tokens * (facts_of(args).vocab_size // lay.tp) * LOGIT_BYTES
        if rk.held.last
        else 0,
        reserved=hw.reserved_bytes,
    )


def _traffic(args, lay: Layout, req: PlanRequest, rk: _Rank) -> dict[str, float]:
    """Bytes this rank sends per step on each mesh axis (module docstring)."""
    d, t, n, m, tokens = req.dtype_bytes, lay.tp, lay.dp_shard * lay.cp, rk.m, rk.tokens
    f = facts_of(args)
    comm = dict.fromkeys(COMM_AXES, 0.0)
    if n > 1:
        frac = (n - 1) / n
        if lay.pp == 1:  # gather all for forward, the blocks again for backward; reduce all
            gathers = (rk.rank_tp + rk.blocks_tp) * d
            comm["dp_shard_cp"] = m * frac * (gathers + rk.rank_tp * GRAD_BYTES)
        else:
            comm["dp_shard_cp"] = frac * (m * rk.rank_tp * d + rk.rank_tp * GRAD_BYTES)
    if lay.dp_replicate > 1:
        syncs, rep = (m if lay.pp == 1 else 1), lay.dp_replicate
        comm["dp_replicate"] = 2 * (rep - 1) / rep * syncs * rk.state["gradients"]
    if t > 1:
        collectives = 8 * rk.held.n_layers + 2 * rk.held.first + 2 * rk.held.last
        comm["tp"] = m * collectives * (t - 1) / t * tokens * f.dim * d
    if lay.cp > 1:
        c, kv = lay.cp, tokens * f.n_kv_heads * f.head_dim / t
        if lay.cp_mode == "ulysses":
            q = tokens * f.n_heads * f.head_dim / t
            per_layer = 2 * (c - 1) / c * (2 * q + 2 * kv) * d
        else:
            per_layer = 2 * (c - 1) * 2 * kv * d + c * 2 * kv * GRAD_BYTES
        comm["cp"] = m * rk.held.n_layers * per_layer
    if lay.pp > 1:
        sends = 2 if 0 < rk.r < lay.pp - 1 else 1  # middle ranks pass both ways
        comm["pp"] = sends * m * tokens * f.dim / t * d
        tied = family_of_args(args).tied(args)
        for p in param_specs(args)[1]:  # every pipeline rank joins, those without it with zeros
            if p.name in tied.values():
                shard = local_numel(p, tp=t, shard=n) * GRAD_BYTES
                comm["pp"] += 2 * (lay.pp - 1) / lay.pp * shard
    return comm


def _seconds(comm: dict[str, float], lay: Layout, hw: Hardware) -> dict[str, float]:
    """Transfer time per axis: NVLink when the axis's groups stay inside a node."""
    # The mesh is (pp, dp_replicate, dp_shard, cp, tp), tp innermost: a group of an axis spans
    # the ranks of that axis and every inner one.
    spans = {
        "dp_shard_cp": lay.dp_shard * lay.cp * lay.tp,
        "dp_replicate": lay.dp * lay.cp * lay.tp,
        "tp": lay.tp,
        "cp": lay.cp * lay.tp,
        "pp": lay.gpus,
    }
    out = {}
    for axis in COMM_AXES:
        in_node = lay.gpus <= hw.gpus_per_node or hw.gpus_per_node % spans[axis] == 0
        out[axis] = comm[axis] / (hw.intra_node_bw if in_node else hw.inter_node_bw)
    return out


def _compute_s(args, lay: Layout, req: PlanRequest, hw: Hardware, rk: _Rank) -> float:
    # FLOPs as train.metrics.flops_per_token, split by stage: 6 per parameter and token, plus
    # causal attention (6 * Hq * D * T per token and layer), for this rank's share of tokens.
    f = facts_of(args)
    attn = 6 * f.n_heads * f.head_dim * req.seq_len
    layer = 6 * sum(math.prod(s.shape) for s in layer_params(args)) + attn
    head = 6 * f.vocab_size * f.dim if rk.held.last else 0
    tokens = req.batch * req.seq_len / (lay.dp * lay.cp)
    return tokens * (rk.held.n_layers * layer + head) / lay.tp / (hw.peak_flops * hw.mfu)


def _representative_pp_ranks(args, pp: int) -> list[int]:
    """One pipeline rank per kind (layer count, ends, middle or not): the smallest, which keeps
    the most micro-batches in flight, so the rest of its kind can be skipped."""
    kinds: dict[tuple, int] = {}
    for r in range(pp):
        held = rank_holdings(args, pp, r)
        kinds.setdefault((held.n_layers, held.first, held.last, 0 < r < pp - 1), r)
    return sorted(kinds.values())


def estimate(args, layout: Layout, req: PlanRequest, hw: Hardware | None = None) -> Candidate:
    """Predict memory, traffic and step time of one layout (valid for `args`, see `search`)."""
    hw = hw or Hardware()
    ranks = [_rank(args, layout, req, r) for r in _representative_pp_ranks(args, layout.pp)]
    memory = [_memory(args, layout, req, hw, rk) for rk in ranks]
    comm = [_traffic(args, layout, req, rk) for rk in ranks]
    comm_s = [_seconds(c, layout, hw) for c in comm]
    compute_s = [_compute_s(args, layout, req, hw, rk) for rk in ranks]
    fullest = max(range(len(ranks)), key=lambda i: memory[i].total)
    # TP, CP and PP transfers block the compute stream; the slowest rank sets the pipeline's
    # pace, stretched by the bubble. FSDP's traffic runs beside the compute; its excess shows.
    blocking = max(
        compute_s[i] + comm_s[i]["tp"] + comm_s[i]["cp"] + comm_s[i]["pp"]
        for i in range(len(ranks))
    )
    exposed = max(
        max(0.0, comm_s[i]["dp_shard_cp"] + comm_s[i]["dp_replicate"] - compute_s[i])
        for i in range(len(ranks))
    )
    m = layout.micro_batches(req)
    step_s = blocking * (1 + (layout.pp - 1) / m) + exposed
    return Candidate(
        layout=layout,
        micro_batches=m,
        memory=memory[fullest],
        fullest_pp_rank=ranks[fullest].r,
        comm_bytes={a: max(c[a] for c in comm) for a in COMM_AXES},
        comm_s={a: max(c[a] for c in comm_s) for a in COMM_AXES},
        compute_s=max(compute_s),
        step_s=step_s,
        tokens_per_s=req.batch * req.seq_len / step_s,
        fits=memory[fullest].total <= req.gpu_memory_gb * GIB,
        overrides=layout.trainer_flags(req),
    )
