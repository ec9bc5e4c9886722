"""Text-to-video rectified flow (Open-Sora v1.2) for the STDiT3 family: `[task] name = "flow"`.

The loader's rows are a video dataset's collated batch (`parallm/video/data.py`: `video`
(B, 3, T, H, W) in [-1, 1], `caption_index`, `fps`, `num_frames`, `height`, `width`, and the
global `sample_index` the loader adds); they travel in `Batch.extras`, with empty (B, 0) token
tensors, so they follow rows through micro-batches. The task owns the model call (`forward`):
videos go through the autoencoder (`[video] vae`: pixel space or an image VAE) and captions
through the text encoder (`[video] text_encoder`: the model's own trainable caption encoder fed
token ids, or T5 embeddings, optionally cached on disk); then the rectified-flow training input
(`parallm/video/rflow.py`) and the model's patch tokens.

Randomness is a function of (train.seed, the sample's global index) alone: a sample's timestep,
caption dropout, conditioning frame and noise come from its own generator, so every layout and
micro-batch split draws the same ones.

Sequence parallelism: the layout gives the model its spatial shard, so each cp rank predicts its
slice of every sample's spatial tokens (`forward_tokens`) and scores it against the same slice
of the target. A sample's loss is Open-Sora's mean over the generated frames' elements; each
rank adds its tokens' part of that mean and counts 1/cp of the sample (the step divides by cp),
so the loss is the mean over samples on every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from parallm.errors import UserError
from parallm.models.attention import AttentionSpec
from parallm.train.tasks import Batch, Task, register_task
from parallm.video import rflow

CAPTION_TOKENIZER_DIR = "caption_tokenizer"  # under output.dir: the trainable encoder's tokenizer
CAPTION_VOCAB = 4096  # words the trainable caption tokenizer learns at most (specials included)


@dataclass
class FlowOutput:
    """What `loss_sum` scores, on this rank's spatial tokens (B, T', S_local, P) with P the
    patch's elements (pt * ph * pw * Co): the prediction, the velocity target, and each
    element's weight (1 / the sample's counted elements, 0 for conditioning frames, padding
    and learned-sigma channels)."""

    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def sample_seed(seed: int, index: int) -> int:
    """The seed of the generator of the sample drawn `index`-th since training began."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@register_task
class Flow(Task):
    name = "flow"
    random_tokens = False
    uses_tokenizer = False
    model_shards_tokens = True
    attention_kind = "full"

    def __init__(self, cfg, *, tokenizer=None, job=None) -> None:
        if job is None:  # the defaults of every other section
            from parallm.config import JobConfig

            job = JobConfig(task=cfg)
        super().__init__(cfg, tokenizer=tokenizer, job=job)
        self.video = job.video
        self.seed = job.train.seed
        self.captions: list[str] = []
        self.caption_tokenizer = None  # the trainable encoder's CaptionTokenizer
        self._caption_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # (N, L) ids, mask
        self._t5 = None
        self._cache = None
        self._autoencoder = None

    # -- checks ----------------------------------------------------------------------------

    def check_layout(self, dims) -> None:
        for name, degree in (("tp", dims.tp), ("pp", dims.pp)):
            if degree > 1:
                raise UserError(
                    f"parallel.{name}: {degree} is not valid for task 'flow'; the STDiT3 family "
                    "supports data parallel, ZeRO and sequence parallel (parallel.cp)"
                )

    def check_model(self, args, dims) -> None:
        from parallm.models.registry import family_of_args

        spec = family_of_args(args)
        if not spec.is_video:
            raise UserError(
                f"model.architecture: {spec.model_types[0]!r} is a language model; task 'flow' "
                'trains a video model (model.architecture = "STDiT3")'
            )
        v = self.video
        for field, value, model_value in (
            ("video.caption_length", v.caption_length, args.model_max_length),
            ("video.caption_channels", v.caption_channels, args.caption_channels),
            ("video.patch", list(v.patch), list(args.patch_size)),
        ):
            if value != model_value:
                raise UserError(
                    f"{field}: {value} does not match the model's {model_value} "
                    f"({self.job.model.path or 'model'}); set it to {model_value}"
                )
        for frames, height, width in v.shapes:
            self._check_shape(args, dims, frames, height, width)
        if self.cfg.condition_frames > 0 and args.patch_size[0] > 1:
            raise UserError(
                f"task.condition_frames: {self.cfg.condition_frames} needs a model whose time "
                f"patch is 1 (a clean first frame is one patch frame); this one's is "
                f"{args.patch_size[0]}"
            )
        if args.in_channels != v.channels:
            raise UserError(
                f"video.vae: the model takes {args.in_channels} channels but "
                f"{'the VAE gives' if v.vae else 'pixel space has'} {v.channels}"
            )
        if dims.cp > 1 and self.job.parallel.cp_mode == "ulysses" and args.num_heads % dims.cp:
            raise UserError(
                f"parallel.cp: {dims.cp} must divide the model's {args.num_heads} heads for "
                "cp_mode='ulysses'; use cp_mode='ring' or a smaller cp"
            )

    def _check_shape(self, args, dims, frames: int, height: int, width: int) -> None:
        """One batch shape (the [video] size, or a bucket) against the task and the layout."""
        v = self.video
        where = "video.buckets" if v.buckets else "video"
        if self.cfg.timestep_shift and 1 < frames < 17:
            raise UserError(
                f"task.timestep_shift: needs {where} frames 1 or >= 17 (got {frames}): "
                "Open-Sora's length factor frames // 17 * 5 is 0 below 17 frames and would send "
                "every timestep to 0"
            )
        factor = v.spatial_factor
        for field, size in (("height", height), ("width", width)):
            if size % factor:
                raise UserError(
                    f"{where}.{field}: {size} is not divisible by the VAE's factor {factor}; use "
                    f"a multiple of {factor}"
                )
        _, ph, pw = args.patch_size
        _, s = v.tokens(args.patch_size, (frames, height, width))
        if dims.cp > 1 and s % dims.cp:
            raise UserError(
                f"parallel.cp: {dims.cp} must divide the {s} spatial tokens per frame of "
                f"{frames}x{height}x{width} ({where} height/{factor}/{ph} x width/{factor}/{pw}, "
                "rounded up)"
            )

    def sample_tokens(self, args, data_cfg) -> tuple[int, int]:
        """(patch tokens of one sample, T' x S, and S, the spatial attention's length)."""
        frames, s = self.video.tokens(args.patch_size)
        return frames * s, s

    # -- data -----------------------------------------------------------------------------

    def dataset(self, files: list[Path], data_cfg, *, seed: int):
        """The videos of the manifests in `files` (.csv / .jsonl of path, text), sized as
        `[video]` says, in global batches of one shape (`train.batch_size`)."""
        from parallm.video.data import VideoDataset

        v = self.video
        dataset = VideoDataset.from_manifests(
            files,
            frames=v.frames,
            height=v.height,
            width=v.width,
            fps=v.fps,
            seed=seed,
            shuffle=data_cfg.shuffle,
            batch_size=self.job.train.batch_size,
            buckets=v.shapes,
            short_clips=v.short_clips,
        )
        self.data_summary = dataset.summary
        return dataset

    def use_captions(self, captions: list[str], tokenizer_dir: Path | None) -> str:
        """Take the dataset's captions (indexed by `caption_index`); for the trainable encoder,
        read its tokenizer from `tokenizer_dir` (written there by `train_caption_tokenizer`)
        and tokenize them all once. Returns a line for the log."""
        from parallm.video.text import CaptionTokenizer

        self.captions = list(captions)
        v = self.video
        if not v.trainable_text:
            return f"captions: {len(captions)}, encoded by T5 ({v.text_encoder})"
        self.caption_tokenizer = CaptionTokenizer.load(tokenizer_dir, max_length=v.caption_length)
        ids, mask, truncated = self.caption_tokenizer.encode(self.captions)
        self._caption_ids = (ids, mask)
        return (
            f"captions: {len(captions)}, {self.caption_tokenizer.vocab_size} caption tokens; "
            f"{truncated} cut to video.caption_length={v.caption_length} tokens"
        )

    def train_caption_tokenizer(self, captions: list[str], directory: Path) -> None:
        """Learn the trainable encoder's tokenizer from the captions, into `directory` (one
        rank writes it; every rank reads it, so all share the same vocabulary)."""
        from parallm.video.text import CaptionTokenizer

        tok = CaptionTokenizer.train(
            sorted(captions), vocab_size=CAPTION_VOCAB, max_length=self.video.caption_length
        )
        directory.mkdir(parents=True, exist_ok=True)
        tok.save(directory)

    @property
    def caption_vocab_size(self) -> int:
        """The model's caption_vocab_size: the trainable encoder's vocabulary, 0 with T5."""
        return 0 if self.caption_tokenizer is None else self.caption_tokenizer.vocab_size

    def batch(self, rows) -> Batch:
        """The collated videos as per-row extras, beside empty (B, 0) token tensors."""
        b = rows["video"].shape[0]
        empty = torch.zeros(b, 0, dtype=torch.long)
        extras = {k: v for k, v in rows.items() if isinstance(v, torch.Tensor)}
        return Batch(empty, empty.clone(), attention=AttentionSpec(causal=False), extras=extras)

    def count(self, batch: Batch) -> torch.Tensor:
        """Counted units: samples."""
        return torch.tensor(float(batch.rows))

    # -- the model call -------------------------------------------------------------------

    def _latents(self, video: torch.Tensor) -> torch.Tensor:
        from parallm.video.autoencoder import make_autoencoder

        if self._autoencoder is None:
            self._autoencoder = make_autoencoder(self.video.vae, device=video.device)
        # In float32 whatever the step's autocast: the targets are the data, not the model.
        with torch.no_grad(), torch.autocast(video.device.type, enabled=False):
            return self._autoencoder.encode(video).float()

    def _encode_captions(
        self, index: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, mask) of the captions `index` (B,): token ids (B, L) for the trainable encoder,
        T5 embeddings (B, 1, L, Cy) otherwise."""
        idx = index.cpu()
        if self._caption_ids is not None:
            ids, mask = self._caption_ids
            return ids[idx].to(device), mask[idx].to(device)
        captions = [self.captions[i] for i in idx.tolist()]
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            if self.video.caption_cache:
                cache = self._caption_cache()
                missing = cache.missing(captions)
                if missing:  # T5 is loaded only for captions not cached yet
                    cache.precompute(self._t5_encoder(device), missing)
                y, mask = cache.get(captions)
            else:
                y, mask, _ = self._t5_encoder(device).encode(captions)
        return y.to(device), mask.to(device)

    def _t5_encoder(self, device: torch.device):
        from parallm.video.text import T5TextEncoder

        if self._t5 is None:
            v = self.video
            self._t5 = T5TextEncoder(v.text_encoder, max_length=v.caption_length, device=device)
            if self._t5.caption_channels != v.caption_channels:
                raise UserError(
                    f"video.caption_channels: {v.caption_channels} does not match the T5 "
                    f"encoder's {self._t5.caption_channels} (d_model of {v.text_encoder})"
                )
        return self._t5

    def _caption_cache(self):
        """The disk cache of the T5 encoder's (float32) caption embeddings, keyed as
        `T5TextEncoder.name` keys them, opened without loading T5."""
        from parallm.video import text

        if self._cache is None:
            v = self.video
            name = text.t5_encoder_name(v.text_encoder, torch.float32)
            self._cache = text.CaptionCache(v.caption_cache, name, v.caption_length)
        return self._cache

    def _draws(self, sample_index: torch.Tensor, latent: tuple[int, ...]):
        """Per sample, from its own generator: timestep (B,), caption dropped (B,), first frame
        a condition (B,), noise (B, *latent); all on the CPU."""
        c = self.cfg
        ts, drops, conds, noises = [], [], [], []
        for index in sample_index.tolist():
            g = torch.Generator().manual_seed(sample_seed(self.seed, index))
            ts.append(
                rflow.logit_normal_timesteps(1, g, loc=c.timestep_loc, scale=c.timestep_scale)
            )
            u = torch.rand(2, generator=g)
            drops.append(u[0] < c.caption_dropout)
            conds.append(u[1] < c.condition_frames)
            noises.append(torch.randn(latent, generator=g))
        return torch.cat(ts), torch.stack(drops), torch.stack(conds), torch.stack(noises)

    def forward(self, model, batch: Batch, *, logit_rows=None) -> FlowOutput:
        e = batch.extras
        device = e["video"].device
        x0 = self._latents(e["video"])  # (B, C, T, H, W)
        t, drop, cond, noise = self._draws(e["sample_index"], tuple(x0.shape[1:]))
        t, drop, cond, noise = t.to(device), drop.to(device), cond.to(device), noise.to(device)
        if self.cfg.timestep_shift:
            shift = rflow.Shift(
                height=e["height"],
                width=e["width"],
                num_frames=e["num_frames"],
                scale=self.cfg.shift_scale,
            )
            t = rflow.timestep_transform(t, shift)
        x_mask = None
        if bool(cond.any()) and x0.shape[2] > 1:
            x_mask = torch.ones(x0.shape[0], x0.shape[2], dtype=torch.bool, device=device)
            x_mask[:, 0] = ~cond  # a conditioning sample's first frame is given, clean
        x_t = rflow.noised(x0, noise, t, x_mask)
        y, mask = self._encode_captions(e["caption_index"], device)
        pred = model.forward_tokens(
            x_t,
            t,
            y,
            mask,
            x_mask,
            fps=e.get("fps"),
            height=e.get("height"),
            width=e.get("width"),
            drop_caption=drop,
        )  # (B, T', S_local, P)
        target, weight = self._target_tokens(model, x0, noise, x_mask, pred.shape[-1])
        lo, hi = model.shard_range(target.shape[2])
        return FlowOutput(pred, target[:, :, lo:hi], weight[:, :, lo:hi])

    @staticmethod
    def _target_tokens(model, x0, noise, x_mask, patch_elements: int):
        """The velocity target and the per-element loss weights as patch tokens (B, T', S, P):
        Open-Sora's mean over a sample's generated frames' elements becomes a weighted sum."""
        b, c, t, h, w = x0.shape
        v = rflow.velocity_target(x0, noise)
        frames = (
            torch.ones(b, t, device=x0.device) if x_mask is None else x_mask.to(x0.dtype)
        )  # (B, T)
        per_sample = frames.sum(1) * (c * h * w)  # elements the sample's mean is over
        weight = (frames / per_sample[:, None])[:, None, :, None, None].expand(b, c, t, h, w)
        extra = patch_elements // model.args.patch_volume - c  # learned-sigma channels: unscored
        if extra:
            zeros = v.new_zeros(b, extra, t, h, w)
            v, weight = torch.cat([v, zeros], 1), torch.cat([weight, zeros], 1)
        return model.patchify(v), model.patchify(weight)

    def loss_sum(self, output: FlowOutput, batch: Batch) -> torch.Tensor:
        """The sum over samples of each one's mean squared velocity error (this rank's tokens'
        part of it under sequence parallelism)."""
        diff = output.pred.float() - output.target.float()
        return (diff.pow(2) * output.weight).sum()

    # -- export ---------------------------------------------------------------------------

    def export_extras(self, path: Path) -> None:
        """Beside the STDiT3 weights: `video.json` (text encoder, vae, size, timestep shift:
        what `VideoPipeline.load` reads) and the trainable encoder's caption tokenizer."""
        from parallm.video.pipeline import save_video_config, video_config_from_job

        save_video_config(path, video_config_from_job(self.job))
        if self.caption_tokenizer is not None:
            self.caption_tokenizer.save(path)
