"""Typed job configuration: dataclass sections, TOML job files, `--section.key value` overrides.

A job is a `JobConfig` whose fields are sections (`[data]`, `[model]`, `[train]`, ...), each a
keyword-only dataclass that validates itself in `__post_init__`. Values from a TOML file and from
the command line are coerced to the declared field types; an unknown section or key, a value of
the wrong type or an invalid value is a `UserError` naming the field, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from parallm.errors import UserError
from parallm.utils.fs import read_text


def _check(ok: bool, name: str, value: Any, valid: str) -> None:
    """Raise a UserError for `name` = `value` unless `ok`; `valid` says what would be valid."""
    if not ok:
        raise UserError(f"{name}: {value!r} is not valid; {valid}")


@dataclass(kw_only=True)
class DataConfig:
    """Training text: local files or directories, tokenized and packed into fixed-length rows."""

    # Files or directories; "{stdlib}" stands for the running Python's standard library.
    paths: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=lambda: [".txt", ".jsonl", ".parquet"])
    # Directory names skipped anywhere below a directory in `paths`.
    exclude: list[str] = field(default_factory=list)
    text_field: str = "text"  # the field holding the text in .jsonl / .parquet rows
    seq_len: int = 512
    max_files: int = 0  # 0: all files; else an evenly spread, sorted subset of this many
    shuffle: bool = True
    cache_dir: str | None = None  # tokenized files are cached here when set
    # > 0: this many uniformly random token ids instead of files (benchmarks; needs
    # model.vocab_size and no tokenizer)
    random_tokens: int = 0
    # > 0: this share of the samples (seeded) is held out; the trainer reports its loss as
    # `eval_loss` (every train.eval_every steps and after the last)
    eval_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check(self.seq_len >= 1, "data.seq_len", self.seq_len, "must be >= 1")
        _check(
            0 <= self.eval_fraction < 1,
            "data.eval_fraction",
            self.eval_fraction,
            "must be in [0, 1)",
        )
        _check(self.max_files >= 0, "data.max_files", self.max_files, "must be >= 0 (0: all)")
        _check(self.random_tokens >= 0, "data.random_tokens", self.random_tokens, "must be >= 0")
        for ext in self.extensions:
            _check(ext.startswith("."), "data.extensions", ext, "extensions start with '.'")


@dataclass(kw_only=True)
class TokenizerConfig:
    """Either a directory holding `tokenizer.json`, or a BPE vocabulary size to train one."""

    path: str | None = None  # defaults to model.path
    train_vocab_size: int | None = None  # train a byte-level BPE tokenizer on the data

    def __post_init__(self) -> None:
        if self.train_vocab_size is not None:
            _check(
                self.train_vocab_size >= 259,
                "tokenizer.train_vocab_size",
                self.train_vocab_size,
                "must be >= 259 (256 bytes + 3 special tokens)",
            )


@dataclass(kw_only=True)
class ModelConfig:
    """A model to start from (`path`, a HF directory) or the shape of a fresh one."""

    path: str | None = None
    architecture: str = "llama"  # a registered model type (parallm.models.registry)
    vocab_size: int | None = None  # defaults to the tokenizer's vocabulary
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # defaults to n_heads
    head_dim: int | None = None  # defaults to dim // n_heads
    ffn_dim: int = 688
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        from parallm.models.families import model_types  # torch-free: errors answer at once

        types_ = model_types()
        _check(
            self.architecture in types_,
            "model.architecture",
            self.architecture,
            f"valid: {', '.join(types_)}",
        )
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{name}", value, "must be >= 1")
        n_kv = self.n_kv_heads or self.n_heads
        _check(
            n_kv >= 1 and self.n_heads % n_kv == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads={self.n_heads}",
        )
        if self.head_dim is None:
            _check(
                self.dim % self.n_heads == 0,
                "model.dim",
                self.dim,
                f"must be a multiple of model.n_heads={self.n_heads}, or set model.head_dim",
            )
        else:
            _check(self.head_dim % 2 == 0, "model.head_dim", self.head_dim, "must be even (RoPE)")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation: steps, batch, AdamW, warmup + cosine schedule, clipping, numerics."""

    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step (the global batch)
    # Sequences per forward/backward (the rest is accumulation); "auto": the layout's whole
    # per-data-parallel-rank share, reduced until the pipeline's micro-batches divide it
    micro_batch_size: int | str = "auto"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on GPU, float32 on CPU) | float32 | bfloat16
    # Steps between progress lines when not on a terminal (a line also comes after a minute
    # without one, so a slow job is never silent); a terminal gets a progress bar instead.
    log_every: int = 1
    eval_every: int = 0  # steps between evaluations of the held-out data (0: after the last)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        micro = self.micro_batch_size
        _check(
            micro == "auto"
            or (isinstance(micro, int) and 1 <= micro and self.batch_size % micro == 0),
            "train.micro_batch_size",
            micro,
            f'must divide train.batch_size={self.batch_size}, or be "auto" (the layout\'s share)',
        )
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            self.betas,
            "two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
        _check(self.eps > 0, "train.eps", self.eps, "must be > 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0: off)")
        _check(
            self.dtype in ("auto", "float32", "bfloat16"),
            "train.dtype",
            self.dtype,
            "valid: auto, float32, bfloat16",
        )
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0")


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "dualpipev")
CP_MODES = ("ulysses", "ring")
AC_MODES = ("none", "full", "selective")


@dataclass(kw_only=True)
class ParallelConfig:
    """The layout: degrees multiply to the number of processes (dp_shard=-1 fills the rest)."""

    dp_replicate: int = 1  # plain data parallel (replicas); with dp_shard > 1: hybrid sharding
    dp_shard: int = -1  # FSDP / ZeRO sharding degree; -1: what the other degrees leave
    tp: int = 1  # tensor parallel (with sequence parallelism)
    pp: int = 1  # pipeline stages (ranks)
    cp: int = 1  # context parallel: each sequence split over cp ranks
    zero_stage: int = 3  # 1: optimizer state, 2: + gradients, 3: + parameters sharded
    cpu_offload: bool = False  # keep sharded parameters and optimizer state in CPU memory
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # per pipeline step (divides micro_batch_size); 0: one per stage
    pp_virtual_stages: int = 2  # stages per rank for interleaved_1f1b
    pp_layers: list[int] = field(default_factory=list)  # layers per stage; empty: balanced
    cp_mode: str = "ulysses"  # ulysses (all-to-all over heads) | ring (K/V blocks, balanced)
    activation_checkpoint: str = "none"  # none | full | selective
    compile: bool = False  # torch.compile each block
    timeout_s: float = 600.0  # collective timeout: a stuck rank fails everyone after this

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "cp"):
            value = getattr(self, name)
            _check(value >= 1, f"parallel.{name}", value, "must be >= 1")
        _check(
            self.dp_shard == -1 or self.dp_shard >= 1,
            "parallel.dp_shard",
            self.dp_shard,
            "must be >= 1, or -1 for the rest of the world size",
        )
        _check(
            self.zero_stage in (1, 2, 3), "parallel.zero_stage", self.zero_stage, "valid: 1, 2, 3"
        )
        _check(
            self.pp_schedule in PP_SCHEDULES,
            "parallel.pp_schedule",
            self.pp_schedule,
            f"valid: {', '.join(PP_SCHEDULES)}",
        )
        _check(self.pp_microbatches >= 0, "parallel.pp_microbatches", self.pp_microbatches, ">= 0")
        _check(
            self.pp_virtual_stages >= 1,
            "parallel.pp_virtual_stages",
            self.pp_virtual_stages,
            ">= 1",
        )
        _check(
            self.cp_mode in CP_MODES,
            "parallel.cp_mode",
            self.cp_mode,
            f"valid: {', '.join(CP_MODES)}",
        )
        _check(
            self.activation_checkpoint in AC_MODES,
            "parallel.activation_checkpoint",
            self.activation_checkpoint,
            f"valid: {', '.join(AC_MODES)}",
        )
        _check(self.timeout_s > 0, "parallel.timeout_s", self.timeout_s, "must be > 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When to save (`parallm/train/checkpoint.py`). A stop by SIGTERM or SIGINT also saves."""

    every: int = 0  # save every N optimizer steps (0: only at the end)
    # Keep the newest N checkpoints (0: keep all). Formerly `keep`: a job file still naming it
    # gets the unknown-key error, which lists keep_last (one name per setting, no alias).
    keep_last: int = 2
    async_save: bool = False  # write from a thread while training goes on (DCP async_save)
    export_hf: bool = True  # write <output.dir>/hf at the end

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", self.every, "must be >= 0 (0: at the end)")
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "must be >= 0 (0: all)")


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = "runs/job"


@dataclass(kw_only=True)
class GenerateConfig:
    """The sample printed after training (max_tokens 0 skips it)."""

    prompt: str = "def "
    max_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 0, "generate.max_tokens", self.max_tokens, "must be >= 0")
        _check(self.temperature >= 0, "generate.temperature", self.temperature, "must be >= 0")
        _check(self.top_k >= 0, "generate.top_k", self.top_k, "must be >= 0 (0: off)")
        _check(0 < self.top_p <= 1, "generate.top_p", self.top_p, "must be in (0, 1]")


TASK_ATTENTION = ("causal", "document")
OVERLONG = ("truncate", "drop")
DPO_LOSSES = ("sigmoid", "ipo", "simpo")
GRPO_NORMALIZATION = ("token", "sequence")  # DAPO's token-level mean | GRPO's per sequence
SCALE_REWARDS = ("group", "batch", "none")  # TRL's scale_rewards
FROZEN_DTYPES = ("float32", "bfloat16")


# The objectives in parallm/train/tasks/<name>.py; each registers itself when imported.
BUILTIN_TASKS = ("dpo", "flow", "grpo", "pretrain", "sft")


def _task_names() -> list[str]:
    """The registered task names. A task registers through `parallm.train.tasks` (torch), so
    while that is not imported only the built-ins exist, and a job file is checked without it."""
    tasks = sys.modules.get("parallm.train.tasks")
    return tasks.task_names() if tasks is not None else sorted(BUILTIN_TASKS)


@dataclass(kw_only=True)
class TaskConfig:
    """The training objective (`parallm/train/tasks/`): `pretrain` (causal LM on packed text),
    `sft` (conversations, loss on the assistant's tokens) or `dpo` (preference pairs).

    pretrain: `attention` is `causal` over whole rows, or `document`: packed documents do not
    attend to each other and their positions restart (a document ends at EOS).
    sft: `packing` puts many conversations in a row (per-document attention, positions restart)
    or, when false, one per row padded to `data.seq_len + 1`; a conversation longer than that is
    cut to its first tokens (`overlong = "truncate"`) or left out (`"drop"`), and counted.
    flow: text-to-video rectified flow (Open-Sora v1.2) on the videos of `[data]` with the
    sizes, text encoder and autoencoder of `[video]`: timesteps drawn logit-normal
    (`sigmoid(N(timestep_loc, timestep_scale)) * 1000`), shifted by resolution and length when
    `timestep_shift` (Open-Sora's transform times `shift_scale`; it needs video.frames 1 or
    >= 17), captions replaced by the null caption with probability `caption_dropout` (for
    classifier-free guidance), a sample's first frame given as a clean condition with
    probability `condition_frames`; the loss is the velocity's mean squared error over the
    generated frames, averaged over samples. Data parallel, ZeRO and sequence parallel
    (`parallel.cp`) layouts.
    dpo: preference pairs (`prompt`, `chosen`, `rejected`: strings, or message lists rendered
    with the chat template); `loss` is `sigmoid` (DPO), `ipo` (log-ratios averaged over the
    completion tokens, as TRL), or `simpo` (reference-free, length-normalised, with margin
    `simpo_gamma`); `beta` as in TRL. A pair is two documents of one row (`packing`: several
    pairs a row); a pair longer than a row is dropped or each sequence cut to half a row
    (`overlong`). The reference is the starting policy: the base under LoRA (adapters off; the
    starting adapter when `lora.init_from` is set), a frozen copy under full fine-tuning. Data
    and tensor parallelism and ZeRO work; pipeline and context parallelism are refused.
    grpo: online RL (GRPO, as TRL's GRPOTrainer) on prompts (`prompt`: a string or a message
    list rendered with the chat template; other fields go to the reward functions). Each step's
    `train.batch_size` prompts get `group_size` completions of at most `max_completion_tokens`
    from parallm's own engine at `temperature`, sampled from the weights being trained (no
    checkpoint, no copy on one process); `rewards` (built-ins "exact_match", "numeric",
    "format" with `format_pattern`, comparing with the row's `answer_field`, or
    "package.module:function" taking `(prompt, completion, **row)`) are summed with
    `reward_weights`; advantages are the rewards less their group's mean, divided by the
    group's (`scale_rewards = "group"`), the batch's ("batch") or no ("none") standard
    deviation. The loss is the clipped policy gradient (ratio clipped to [1 - epsilon,
    1 + epsilon_high]) plus `beta` times the k3 KL estimate to the reference (the starting
    policy, as for dpo; `beta = 0` builds no reference), times the ratio when
    `kl_bias_correction` (TRL's default, `use_bias_correction_kl`), averaged over completion tokens
    (`loss_normalization = "token"`, DAPO) or per sequence then over sequences ("sequence",
    GRPO). `iterations` optimizer steps reuse one rollout batch, its log-probabilities from
    rollout time as the old policy's. Data, tensor parallelism and ZeRO work; pipeline and
    context parallelism are refused.
    """

    name: str = "pretrain"
    attention: str = "causal"
    packing: bool = True
    overlong: str = "truncate"
    loss: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    caption_dropout: float = 0.1
    timestep_loc: float = 0.0
    timestep_scale: float = 1.0
    timestep_shift: bool = False
    shift_scale: float = 1.0
    condition_frames: float = 0.0
    group_size: int = 8
    max_completion_tokens: int = 64
    temperature: float = 1.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (symmetric clipping)
    loss_normalization: str = "token"
    iterations: int = 1
    scale_rewards: str = "group"
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    reward_weights: list[float] | None = None
    format_pattern: str = ""
    answer_field: str = "answer"
    kl_bias_correction: bool = True

    def __post_init__(self) -> None:
        names = _task_names()
        _check(self.name in names, "task.name", self.name, f"valid: {', '.join(names)}")
        _check(
            self.attention in TASK_ATTENTION,
            "task.attention",
            self.attention,
            f"valid: {', '.join(TASK_ATTENTION)}",
        )
        _check(
            self.overlong in OVERLONG,
            "task.overlong",
            self.overlong,
            f"valid: {', '.join(OVERLONG)}",
        )
        _check(self.loss in DPO_LOSSES, "task.loss", self.loss, f"valid: {', '.join(DPO_LOSSES)}")
        if self.name == "grpo":
            self._check_grpo()
        else:
            _check(self.beta > 0, "task.beta", self.beta, "must be > 0")
        for name in ("caption_dropout", "condition_frames"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"task.{name}", value, "a probability in [0, 1]")
        _check(self.timestep_scale > 0, "task.timestep_scale", self.timestep_scale, "must be > 0")
        _check(self.shift_scale > 0, "task.shift_scale", self.shift_scale, "must be > 0")

    def _check_grpo(self) -> None:
        _check(self.beta >= 0, "task.beta", self.beta, "must be >= 0 (0: no reference model)")
        _check(
            self.group_size >= 2,
            "task.group_size",
            self.group_size,
            "must be >= 2 (advantages compare the completions of one prompt)",
        )
        for name in ("max_completion_tokens", "iterations"):
            _check(getattr(self, name) >= 1, f"task.{name}", getattr(self, name), "must be >= 1")
        _check(self.temperature > 0, "task.temperature", self.temperature, "must be > 0")
        _check(0 < self.epsilon < 1, "task.epsilon", self.epsilon, "must be in (0, 1)")
        if self.epsilon_high is not None:
            _check(self.epsilon_high > 0, "task.epsilon_high", self.epsilon_high, "must be > 0")
        for name, valid in (
            ("loss_normalization", GRPO_NORMALIZATION),
            ("scale_rewards", SCALE_REWARDS),
        ):
            value = getattr(self, name)
            _check(value in valid, f"task.{name}", value, f"valid: {', '.join(valid)}")
        _check(bool(self.rewards), "task.rewards", self.rewards, "name at least one reward")
        if self.reward_weights is not None:
            _check(
                len(self.reward_weights) == len(self.rewards),
                "task.reward_weights",
                self.reward_weights,
                f"give one weight per reward ({len(self.rewards)})",
            )


SHORT_CLIPS = ("drop", "pad")  # what becomes of a clip shorter than its bucket


@dataclass(kw_only=True)
class VideoConfig:
    """Videos for the `flow` task and the STDiT3 model trained on them.

    Every sample is `frames` frames of `height` x `width` pixels (the data is resized and
    sampled to it) shown at `fps`. `patch` is the model's (t, h, w) patch in latent space; a size
    that is not a multiple of it is padded, as Open-Sora pads. Captions are `caption_length`
    tokens (longer ones are cut, and counted) of `caption_channels` features: `text_encoder` is
    "trainable" (a small caption encoder trained inside the model, its tokenizer saved with it)
    or a local Hugging Face T5 encoder directory (Open-Sora: T5-XXL, 4096 channels, 300 tokens);
    `caption_cache` a directory where T5 embeddings are computed once and reused ("" none). `vae`
    is "" to train in pixel space or a local diffusers AutoencoderKL directory, applied frame by
    frame (latents are 8x smaller in height and width).

    `buckets`: the shapes a batch may take, [[frames, height, width], ...] (empty: the one
    shape above); each clip goes to a bucket it can fill and each global batch is drawn from one
    bucket. `short_clips`: a clip with fewer frames than its bucket is left out ("drop", as
    Open-Sora does) or its last frame repeated ("pad"); either way it is counted in the log.

    `temporal_pos_embed`: give a fresh model a fixed sine-cosine embedding of the frame index
    (Open-Sora v1.0's; v1.2 has none, so its checkpoints leave it off). Its rotary temporal
    attention sees only frame offsets, so without it a model generating from pure noise cannot
    tell the first frame from the last (the demo's motion needs it).
    """

    frames: int = 16
    height: int = 64
    width: int = 64
    fps: float = 8.0
    patch: list[int] = field(default_factory=lambda: [1, 2, 2])
    caption_length: int = 300
    caption_channels: int = 4096
    text_encoder: str = "trainable"
    caption_cache: str = ""
    vae: str = ""
    buckets: list[list[int]] = field(default_factory=list)
    short_clips: str = "drop"
    temporal_pos_embed: bool = False

    def __post_init__(self) -> None:
        for bucket in self.buckets:
            _check(
                isinstance(bucket, list)
                and len(bucket) == 3
                and all(isinstance(v, int) and v >= 1 for v in bucket),
                "video.buckets",
                bucket,
                "each bucket is [frames, height, width] of integers >= 1",
            )
        _check(
            self.short_clips in SHORT_CLIPS,
            "video.short_clips",
            self.short_clips,
            f"valid: {', '.join(SHORT_CLIPS)}",
        )
        for name in ("frames", "height", "width", "caption_length", "caption_channels"):
            value = getattr(self, name)
            _check(value >= 1, f"video.{name}", value, "must be >= 1")
        _check(self.fps > 0, "video.fps", self.fps, "must be > 0")
        _check(
            len(self.patch) == 3 and all(p >= 1 for p in self.patch),
            "video.patch",
            self.patch,
            "three sizes >= 1: [t, h, w], e.g. [1, 2, 2]",
        )
        _check(
            bool(self.text_encoder),
            "video.text_encoder",
            self.text_encoder,
            '"trainable" or a T5 encoder directory',
        )
        _check(
            not self.caption_cache or self.text_encoder != "trainable",
            "video.caption_cache",
            self.caption_cache,
            'caches a T5 encoder\'s embeddings; a "trainable" text_encoder trains, so leave it ""',
        )

    @property
    def trainable_text(self) -> bool:
        return self.text_encoder == "trainable"

    def _vae_config(self) -> dict:
        """The VAE directory's config.json (read without torch or diffusers)."""
        import json

        path = Path(self.vae) / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(
                f"video.vae: {self.vae!r} has no readable config.json ({e}); give a local "
                'diffusers AutoencoderKL directory, or "" for pixel space'
            ) from None

    @property
    def channels(self) -> int:
        """Channels the model sees: 3 in pixel space, else the VAE's latent channels."""
        return int(self._vae_config().get("latent_channels", 4)) if self.vae else 3

    @property
    def spatial_factor(self) -> int:
        """How much smaller latents are than frames (height and width): 1 in pixel space."""
        if not self.vae:
            return 1
        return 2 ** (len(self._vae_config().get("block_out_channels", [0] * 4)) - 1)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (frames, height, width) a batch may have: the buckets, or the one size."""
        if self.buckets:
            return [tuple(b) for b in self.buckets]
        return [(self.frames, self.height, self.width)]

    def tokens(
        self, patch: tuple[int, int, int] | list[int], shape: tuple[int, int, int] | None = None
    ) -> tuple[int, int]:
        """(T', S): patch tokens along time and per frame for `patch`, in latent space, of
        `shape` (frames, height, width; default the one size) (a size the patch does not divide
        is padded, as Open-Sora pads)."""
        frames, height, width = shape or (self.frames, self.height, self.width)
        f, (pt, ph, pw) = self.spatial_factor, patch
        return -(-frames // pt), -(-height // f // ph) * -(-width // f // pw)


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters (`[lora]`; r = 0: off, every parameter trains). Field names and defaults
    follow peft's `LoraConfig`: `target_modules` are module names or suffixes (`q_proj`), or
    "all-linear"; `modules_to_save` train whole (e.g. `lm_head`). `base_dtype = "bfloat16"`
    keeps the frozen base in bf16 (the step then runs under bf16 autocast). `init_from`: a PEFT
    adapter directory to start from instead of a fresh adapter."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    base_dtype: str = "float32"
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check(self.r >= 0, "lora.r", self.r, "must be >= 0 (0: no LoRA, full fine-tuning)")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(
            bool(self.target_modules),
            "lora.target_modules",
            self.target_modules,
            "must name at least one module",
        )
        _check(
            self.base_dtype in FROZEN_DTYPES,
            "lora.base_dtype",
            self.base_dtype,
            f"valid: {', '.join(FROZEN_DTYPES)}",
        )

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def spec(self):
        """The adapter this section describes (`models.lora.LoraSpec`); None when off."""
        from parallm.models.lora import ALL_LINEAR, LoraSpec

        if not self.enabled:
            return None
        targets = self.target_modules
        return LoraSpec(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else tuple(targets),
            modules_to_save=tuple(self.modules_to_save),
            use_rslora=self.use_rslora,
        )


@dataclass(kw_only=True)
class JobConfig:
    """A training job: one field per TOML section."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# ---------------------------------------------------------------------------------------------
# Loading

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, name: str, from_cli: bool) -> Any:
    """`value` as type `tp`; CLI values arrive as strings and are parsed, TOML values checked."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            return None
        errors = []
        for option in options:  # the first type the value fits (`int | str`: 16, then "auto")
            try:
                return _coerce(option, value, name, from_cli)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            value = _parse_cli_list(value)
        if not isinstance(value, list):
            raise UserError(f"{name}: expected a list, got {value!r}")
        return [_coerce(item, v, name, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise UserError(f"{name}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{name}: expected {tp.__name__}, got {value!r}")
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if from_cli and isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise UserError(f"{name}: expected {tp.__name__}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{name}: expected a string, got {value!r}")
    raise AssertionError(f"config field {name} has unsupported type {_type_name(tp)}")


def _parse_cli_list(text: str) -> list:
    """A TOML array (`[1, 2]`, `["a"]`) or comma-separated bare words (`a,b`)."""
    if text.strip().startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return [part.strip() for part in text.split(",") if part.strip()]


def _build_section(cls: type, values: dict[str, Any], section: str, from_cli: set[str]) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        name = f"{section}.{key}"
        if key not in hints:
            raise UserError(f"unknown key {name!r}; valid keys of [{section}]: {', '.join(valid)}")
        kwargs[key] = _coerce(hints[key], value, name, key in from_cli)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, str]]:
    """`--section.key value` / `--section.key=value` arguments -> {section: {key: raw value}}."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(
                f"unrecognized argument {arg!r}; overrides look like --section.key value"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise UserError(f"override {arg!r} has no value; use {arg} VALUE")
            key, value = arg[2:], overrides[i + 1]
            i += 2
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def load_config(
    cls: type[C], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> C:
    """Build `cls` from a TOML job file (or defaults when `path` is None) plus CLI overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(read_text(path, "job file"))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"job file {str(path)!r} is not valid TOML ({e})") from None
    cli = parse_overrides(list(overrides))
    sections = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for section in [*raw, *cli]:
        if section not in sections:
            raise UserError(f"unknown section [{section}]; valid sections: {', '.join(sections)}")
        if section in raw and not isinstance(raw[section], dict):
            raise UserError(f"[{section}] must be a table of keys, got {raw[section]!r}")
    built = {}
    for name in sections:
        values = {**raw.get(name, {}), **cli.get(name, {})}
        built[name] = _build_section(hints[name], values, name, set(cli.get(name, {})))
    return cls(**built)


def config_to_toml(cfg: Any) -> str:
    """The TOML text of a config (fields that are None are left out: TOML has no null)."""

    def clean(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {k: clean(v) for k, v in vars(obj).items() if v is not None}
        return obj

    return tomli_w.dumps(clean(cfg))
