"""Choose a training layout: enumerate the valid ones, predict memory, traffic and step time.

Everything is arithmetic on the model family's facts and plan; nothing is allocated. The state
(parameters, gradients, AdamW) is exact, from `planner.state`; the rest of a rank's peak memory
is a model of what the trainer holds, checked against measured peaks on CPU; traffic and time
are standard estimates whose assumptions are listed here, so a reader can tell what a number
means and where it is rough.

Numerics, as the trainer runs (`train/trainer.py`, `train/layout.py`):
  * Parameters are stored in float32 and sharded by FSDP; they are AdamW's master weights, so
    there is no separate master copy. Gradients are reduced in float32 (`reduce_dtype`) and kept
    sharded in float32; AdamW adds two float32 moments and a float32 step per tensor. That is
    16 bytes per parameter, the same total as the usual "bf16 weights + bf16 grads + fp32 master
    + 2 fp32 moments" accounting, divided differently.
  * Compute runs in `dtype_bytes` d (2: bf16) through FSDP mixed precision, or autocast when FSDP
    is off; activations and gathered parameters are in that dtype.
  * No CPU offload; AdamW runs parameter by parameter (`foreach=False`).

Memory (`predict_memory`): the bytes one rank holds at its peak, which is the larger of two
moments of the step, each the sum of what is alive then (the columns of `parallm plan`):

  At the last micro-batch's backward (phase "backward"):
  parameters   the rank's float32 shards (exact, `planner.state`)
  gradients    its float32 sharded gradients (exact), made by the first micro-batch's reduce-
               scatter; absent under ZeRO-1 with accumulation (made by the step's one reduce-
               scatter, after the peak)
  optimizer    AdamW's two moments and steps (exact; they exist from the first step on)
  gathered     unsharded parameters in d bytes. FSDP: ZeRO-3 keeps the root (embeddings, final
               norm, head) and the block running gathered; ZeRO-1/2 keep every block gathered
               from its forward to its backward; under a pipeline the whole stage stays gathered
               across micro-batches. dp_replicate alone runs through FSDP, with the same rules.
               Without FSDP and d < 4, autocast's low-precision copy of every weight.
  unsharded    full float32 gradients kept across micro-batches: ZeRO-1 with more than one
               micro-batch (gradient sync only on the last), and FSDP under a pipeline (one
               reduce-scatter per step)
  activations  what autograd saves, per layer and micro-batch in flight (a 1F1B pipeline rank r
               of pp keeps min(pp - r, m) micro-batches; otherwise one), for N = micro_batch *
               seq_len / cp local tokens, in bytes:
                 norms    2 x (N h / tp x (d + 4) + N / tp x 4 + N h x d): each RMSNorm's input
                          and float32 normalized value (sequence-sharded), its float32 rstd per
                          row, and the all-gathered output the next matmuls save (DTensor saves
                          the gathered tensor, not the shard)
                 attn     N / tp x ((2 Hq + 2 Hkv) D x d + 4 Hq): rotated q, k, v, the attention
                          output, flash attention's float32 log-sum-exp (no (T, T) scores)
                 ffn      4 N ffn / tp x d: gate, up, silu(gate) and their product
               plus the rotary cos/sin once (2 N D x d) and, on the last stage, the final norm.
               Activation checkpointing: `full` keeps each layer's input (N h / tp x d) and
               recomputes one layer at a time (one layer's activations on top); `selective`
               keeps the input and the matmul outputs (q, k, v, gate, up: / tp; the two row-
               parallel outputs before their reduce-scatter: N h each) and recomputes the rest
               of one layer at a time. The recomputation comes after the loss's backward has
               freed the logits, so only what it needs beyond the logits adds to the peak.
  logits       last stage: N x vocab / tp logits at the loss's backward, (d + 8) bytes each: the
               logits, the float32 log-softmax cross entropy saves and its gradient
  pipeline     under a pipeline, every micro-batch's stage output (N x h / tp; on the last stage
               its logits, N x vocab / tp), in d bytes, held until the step ends

  At the optimizer step (phase "optimizer"): parameters, gradients, optimizer, pipeline, plus
  `temporaries`: AdamW's per-parameter scratch (two copies of the largest local parameter).

Measured on CPU (tests/test_planner_memory.py: `parallm.utils.memory.AllocationTracker`, the
peak of live tensor storages in a real Trainer step, float32) within 10% on every rank of one
process (also with full and selective activation checkpointing), pp=2, tp=2, dp_replicate=2 and
dp_shard=2 under ZeRO-1 and ZeRO-3 (and, once, tp=2 x dp_shard=2: +1 to +2%). Not measured:
bf16 (autocast's cache, the logits' dtype), ZeRO-2, FSDP under a pipeline, context
parallelism's buffers (Ulysses all-to-all, ring K/V), GPU allocator fragmentation (covered by
`reserved`).

Traffic: the bytes one GPU sends per optimizer step on each mesh axis, ring collectives
(all-gather / reduce-scatter move (n - 1) / n of the full size, all-reduce twice that):
  dp_shard_cp  FSDP: per micro-batch all-gather the parameters for forward and (ZeRO-3) the
               blocks again for backward (compute dtype), reduce-scatter the gradients (float32;
               ZeRO-1 once per step); under a pipeline about one gather per micro-batch and one
               reduce-scatter per step
  dp_replicate HSDP all-reduce of the sharded float32 gradients, per gradient sync
  tp           sequence parallelism: per layer 2 all-gathers and 2 reduce-scatters of (N, h)
               forward and the same backward (8 per layer), 2 more for the embedding's
               reduce-scatter and the head's all-gather
  cp           Ulysses: all-to-all of q, k, v and the output, forward and backward; ring: K/V
               round the ring forward and backward, dK/dV accumulators (float32) cp hops
  pp           hidden states forward and their gradients back, (N, h / tp) per micro-batch and
               stage boundary; tied embeddings also all-reduce the embedding gradient

Time (roofline, no latency terms): compute = FLOPs / (peak * MFU) with the FLOPs of
`train.metrics.flops_per_token` split by stage (full activation checkpointing runs each block's
forward twice: 8 instead of 6 FLOPs per parameter and token; selective recomputes only
element-wise work, not counted); TP, CP and PP transfers block the compute stream
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
LOGIT_EXTRA_BYTES = 8  # per logit, besides the logits: float32 log-softmax and its gradient
LSE_BYTES = 4  # flash attention's float32 log-sum-exp per query row and head
NORM_BYTES = 4  # RMSNorm's float32 normalized value and rstd
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
    """Bytes one rank holds at its peak, by what holds them (module docstring, "Memory"); the
    terms are those alive at `phase`, the moment of the step with the larger sum."""

    parameters: int  # float32 sharded parameters = AdamW master weights (exact)
    gradients: int  # float32 sharded gradients (exact), when they exist at the peak
    optimizer: int  # AdamW moments and steps (exact)
    gathered: int  # unsharded parameters in the compute dtype
    unsharded: int  # full float32 gradients kept across micro-batches
    activations: int  # saved for backward, every micro-batch in flight
    logits: int  # the loss's logits, log-softmax and gradient (last stage)
    pipeline: int  # stage outputs kept across micro-batches (pipeline)
    temporaries: int  # AdamW's scratch (optimizer phase)
    reserved: int  # CUDA context, communication buffers, fragmentation (`Hardware`)
    phase: str = "backward"  # "backward" or "optimizer"

    @property
    def allocated(self) -> int:
        """The tensor bytes: what `torch.cuda.max_memory_allocated` (or, on CPU,
        `parallm.utils.memory.AllocationTracker`) measures."""
        return self.total - self.reserved

    @property
    def total(self) -> int:
        return sum(v for v in asdict(self).values() if isinstance(v, int))


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
        out["memory"]["allocated"] = self.memory.allocated
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


def activation_bytes_per_layer(
    args, tokens: int, tp: int, dtype_bytes: int, checkpoint: str = "none"
) -> float:
    """Bytes one decoder layer keeps for backward for `tokens` local tokens and one micro-batch,
    under activation checkpointing `checkpoint` (module docstring, "activations")."""
    f = facts_of(args)
    h, hd, hq, hkv, d, n = f.dim, f.head_dim, f.n_heads, f.n_kv_heads, dtype_bytes, tokens
    if checkpoint == "full":
        return n * h / tp * d  # the block's input
    if checkpoint == "selective":  # the input and the matmul outputs
        return n * d * (h / tp + (hq + 2 * hkv) * hd / tp + 2 * f.ffn_dim / tp + 2 * h)
    norms = 2 * (n * h / tp * (d + NORM_BYTES) + n / tp * NORM_BYTES + n * h * d)
    attn = n / tp * ((2 * hq + 2 * hkv) * hd * d + hq * LSE_BYTES)
    ffn = 4 * n * f.ffn_dim / tp * d
    return norms + attn + ffn


def predict_memory(
    args,
    layout: Layout,
    req: PlanRequest,
    *,
    rank_coords: dict[str, int] | None = None,
    hw: Hardware | None = None,
) -> Memory:
    """The peak bytes of the rank at `rank_coords` (keys pp, dp_replicate, dp_shard, cp, tp; a
    missing key is coordinate 0) training `args` in `layout` as `req` asks (compute dtype, ZeRO
    stage, activation checkpointing): the larger of the last backward's and the optimizer
    step's holdings (module docstring, "Memory")."""
    hw = hw or Hardware()
    coords = rank_coords or {}
    dims, d, pp, tp = layout.dims(), req.dtype_bytes, layout.pp, layout.tp
    state = predict_state_bytes(args, dims, rank_coords=coords, dtype_bytes=MASTER_BYTES)
    r = coords.get("pp", 0)
    held = rank_holdings(args, pp, r)
    f = facts_of(args)
    m = layout.micro_batches(req)
    n = req.micro_batch * req.seq_len // layout.cp
    where = {"tp": tp, "tp_rank": coords.get("tp", 0)}
    layer_tp = sum(local_numel(s, **where) for s in layer_params(args))
    ends_tp = sum(local_numel(s, **where) for s in held.ends)
    rank_tp = held.n_layers * layer_tp + ends_tp
    zero, fsdp = req.zero_stage, dims.fsdp_enabled

    gathered = unsharded = 0
    gradients = state["gradients"]
    if not fsdp:
        gathered = rank_tp * d if d < MASTER_BYTES else 0  # autocast's weight cache
    elif pp > 1:  # the stage stays gathered; one reduce-scatter per step
        gathered, unsharded = rank_tp * d, rank_tp * GRAD_BYTES
    elif zero in (1, 2):  # every block gathered from its forward to its backward
        gathered = rank_tp * d
        if zero == 1 and m > 1:  # full gradients accumulate; the shards come after the peak
            unsharded, gradients = rank_tp * GRAD_BYTES, 0
    else:  # ZeRO-3: the root and the running block
        gathered = (ends_tp + layer_tp) * d

    in_flight = min(pp - r, m) if pp > 1 else 1
    ac = req.activation_checkpoint
    kept = activation_bytes_per_layer(args, n, tp, d, ac)
    activations = kept * held.n_layers * in_flight
    activations += 2 * n * f.head_dim * d  # rotary cos and sin
    logits = pipeline_bytes = 0
    if held.last:
        h = f.dim
        activations += n * h / tp * (d + NORM_BYTES) + n / tp * NORM_BYTES + n * h * d
        logits = n * f.vocab_size // tp * (d + LOGIT_EXTRA_BYTES)
    if ac != "none":
        # The backward recomputes one layer at a time (the rest of its activations), after the
        # loss's backward has freed the logits: the larger of the two moments counts.
        whole = activation_bytes_per_layer(args, n, tp, d)
        recomputed = whole - kept if ac == "selective" else whole
        activations += max(0.0, recomputed - logits)
    if pp > 1:
        width = f.vocab_size / tp if held.last else f.dim / tp
        pipeline_bytes = m * n * width * d
    backward = Memory(
        parameters=state["parameters"],
        gradients=gradients,
        optimizer=state["optimizer"],
        gathered=int(gathered),
        unsharded=int(unsharded),
        activations=int(activations),
        logits=int(logits),
        pipeline=int(pipeline_bytes),
        temporaries=0,
        reserved=hw.reserved_bytes,
    )
    shard = dims.dp_shard * dims.cp if fsdp else 1
    largest = max(local_numel(s, **where, shard=shard) for s in (*layer_params(args), *held.ends))
    step = Memory(
        parameters=state["parameters"],
        gradients=state["gradients"],
        optimizer=state["optimizer"],
        gathered=0,
        unsharded=0,
        activations=0,
        logits=0,
        pipeline=int(pipeline_bytes),
        temporaries=2 * largest * MASTER_BYTES,
        reserved=hw.reserved_bytes,
        phase="optimizer",
    )
    return backward if backward.total >= step.total else step


def _traffic(args, lay: Layout, req: PlanRequest, rk: _Rank) -> dict[str, float]:
    """Bytes this rank sends per step on each mesh axis (module docstring)."""
    d, t, n, m, tokens = req.dtype_bytes, lay.tp, lay.dp_shard * lay.cp, rk.m, rk.tokens
    f = facts_of(args)
    comm = dict.fromkeys(COMM_AXES, 0.0)
    if n > 1:
        frac = (n - 1) / n
        if lay.pp == 1:  # gather all for forward (ZeRO-3: the blocks again for backward)
            gathers = (rk.rank_tp + (rk.blocks_tp if req.zero_stage == 3 else 0)) * d
            reduces = 1 if req.zero_stage == 1 else m  # ZeRO-1: one reduce-scatter per step
            comm["dp_shard_cp"] = frac * (m * gathers + reduces * rk.rank_tp * GRAD_BYTES)
        else:
            comm["dp_shard_cp"] = frac * (m * rk.rank_tp * d + rk.rank_tp * GRAD_BYTES)
    if lay.dp_replicate > 1:
        syncs = m if lay.pp == 1 and req.zero_stage != 1 else 1
        rep = lay.dp_replicate
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
    if req.activation_checkpoint == "full":  # each block's forward runs again in backward
        layer *= 8 / 6
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
    memory = [predict_memory(args, layout, req, rank_coords={"pp": rk.r}, hw=hw) for rk in ranks]
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
