"""`VideoPipeline`: a trained STDiT3 directory -> videos from text prompts.

A video model directory is what `parallm train` exports for the `flow` task: the STDiT3
`config.json` + `model.safetensors` (any registered loader reads them), `video.json`
(`VideoConfig`: the text encoder, the autoencoder and the size it was trained at), and, with the
trainable caption encoder, `caption_tokenizer.json`.

Generation follows Open-Sora v1.2's inference: the prompts are encoded (the null caption of the
model's `y_embedder` is the unconditional half of classifier-free guidance), noise of the latent
shape is drawn per prompt from its own generator seeded by (seed, prompt index) — so a prompt's
video depends on the seed only, not on which other prompts share its batch — the rectified-flow
Euler sampler integrates from t = 1000 to 0, and the autoencoder decodes the latents to
(B, 3, T, H, W) in [-1, 1].

Sizes: frames, height and width that are not multiples of the model's patch are padded by the
model and its output cropped back (Open-Sora's PatchEmbed3D); with a VAE, height and width must
be multiples of its spatial factor (and frames of its temporal factor): a UserError otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from parallm.errors import UserError
from parallm.utils.fs import model_dir, read_json, write_json_atomic

VIDEO_CONFIG = "video.json"
TRAINABLE = "trainable"
MODEL_TYPE = "STDiT3"


@dataclass(kw_only=True)
class VideoConfig:
    """A video model directory's `video.json`: how to turn prompts into the model's captions and
    its latents into pixels, and the size it was trained at (generation's defaults).

    `text_encoder`: "trainable" (the model's own caption encoder; `caption_tokenizer.json` beside
    the weights) or a local T5 directory; `vae`: "" (pixel space) or a diffusers AutoencoderKL
    directory. Relative directories resolve against the model directory. `timestep_shift` and
    `shift_scale`: Open-Sora's resolution- and length-dependent timestep shift, applied by the
    sampler as the model was trained with it.
    """

    text_encoder: str = TRAINABLE
    vae: str = ""
    frames: int = 16
    height: int = 64
    width: int = 64
    fps: float = 24.0
    timestep_shift: bool = False
    shift_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{VIDEO_CONFIG}: {name}: {value!r} is not valid; must be >= 1")
        if not isinstance(self.fps, int | float) or self.fps <= 0:
            raise UserError(f"{VIDEO_CONFIG}: fps: {self.fps!r} is not valid; must be > 0")
        if not isinstance(self.text_encoder, str) or not self.text_encoder:
            raise UserError(
                f"{VIDEO_CONFIG}: text_encoder: {self.text_encoder!r} is not valid; "
                f"'{TRAINABLE}' or a T5 directory"
            )


def video_config_from_job(job: Any) -> VideoConfig:
    """The `VideoConfig` a training job (`config.JobConfig`) implies: its `[video]` size,
    encoder and autoencoder (directories made absolute, so the exported model works from any
    working directory) and its `[task]` timestep shift, which sampling applies as training did."""
    v = job.video

    def absolute(spec: str) -> str:
        return spec if not spec or spec == TRAINABLE else str(Path(spec).resolve())

    return VideoConfig(
        text_encoder=absolute(v.text_encoder),
        vae=absolute(v.vae),
        frames=v.frames,
        height=v.height,
        width=v.width,
        fps=float(v.fps),
        timestep_shift=job.task.timestep_shift,
        shift_scale=job.task.shift_scale,
    )


def save_video_config(path: str | os.PathLike, config: VideoConfig) -> Path:
    """Write `config` as `path/video.json` (atomically); the trainer calls it on export."""
    out = Path(path) / VIDEO_CONFIG
    write_json_atomic(out, asdict(config))
    return out


def read_video_config(path: str | os.PathLike) -> VideoConfig:
    """The `VideoConfig` of a model directory; a UserError (one line) when the directory is not
    a video model (no video.json, or not STDiT3) or the file names an unknown field."""
    d = model_dir(path)
    model_type = read_json(d / "config.json").get("model_type")
    if model_type != MODEL_TYPE:
        raise UserError(f"{d}: a {model_type!r} model, not a video model ({MODEL_TYPE})")
    if not (d / VIDEO_CONFIG).exists():
        raise UserError(
            f"{d}: no {VIDEO_CONFIG}; a video model directory is what `parallm train` exports "
            "for task flow (config.json, model.safetensors, video.json)"
        )
    raw = read_json(d / VIDEO_CONFIG)
    known = {f.name for f in fields(VideoConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"{d / VIDEO_CONFIG}: unknown field {unknown[0]!r}; valid: {', '.join(sorted(known))}"
        )
    return VideoConfig(**raw)


def _resolve(d: Path, spec: str) -> str:
    """A directory named in video.json: absolute as given, relative against the model dir."""
    if not spec or spec == TRAINABLE or os.path.isabs(spec):
        return spec
    return str(d / spec)


def _noise(shape: tuple[int, ...], count: int, seed: int) -> torch.Tensor:
    """(count, *shape) float32 standard normal; sample i from a CPU generator seeded by
    (seed, i), so a prompt's noise is the same whatever batch it is in and on any device."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            for i in range(count)
        ]
    )


class VideoPipeline:
    """A loaded video model: `generate(prompts, ...)` -> (B, 3, T, H, W) float32 in [-1, 1]."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: VideoConfig,
        *,
        text_encoder: Any,
        autoencoder: Any,
        device: torch.device,
    ) -> None:
        self.model, self.config = model, config
        self.text_encoder, self.autoencoder, self.device = text_encoder, autoencoder, device

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        vae: Any = None,
        text_encoder: Any = None,
    ) -> VideoPipeline:
        """Load a video model directory. `vae` / `text_encoder`: an already loaded autoencoder
        or text encoder to use instead of the ones video.json names (a server shares one)."""
        from parallm.models.hf import load_pretrained, resolve_dtype

        d = model_dir(path)
        config = read_video_config(d)
        device = torch.device(device)
        dtype = resolve_dtype(dtype)
        model = load_pretrained(d, dtype=dtype, device=device)
        if text_encoder is None:
            text_encoder = _load_text_encoder(d, config, model, device=device, dtype=dtype)
        if vae is None:
            from parallm.video.autoencoder import make_autoencoder

            vae = make_autoencoder(_resolve(d, config.vae), device=device, dtype=dtype)
        if vae.latent_channels != model.args.in_channels:
            raise UserError(
                f"{d}: the autoencoder gives {vae.latent_channels} channels but the model takes "
                f"{model.args.in_channels} (in_channels); video.json's vae does not fit it"
            )
        return cls(model, config, text_encoder=text_encoder, autoencoder=vae, device=device)

    # -- generation -------------------------------------------------------------------------

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents; a UserError when the size does not fit the
        autoencoder's factors."""
        ae = self.autoencoder
        return (ae.latent_channels, *ae.latent_size(frames, height, width, fields=""))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 30,
        guidance: float = 7.0,
        seed: int = 0,
        fps: float | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Videos for `prompts`: (B, 3, T, H, W) float32 in [-1, 1], on the pipeline's device.
        Sizes default to video.json's; the same seed gives the same video. `on_step(i)` is
        called after each of the `steps` sampling steps (progress; it may raise to stop)."""
        cfg = self.config
        frames = cfg.frames if frames is None else frames
        height = cfg.height if height is None else height
        width = cfg.width if width is None else width
        fps = cfg.fps if fps is None else fps
        if fps <= 0:
            raise UserError(f"fps: {fps} is not valid; must be > 0")
        _check_request(prompts, frames=frames, height=height, width=width, steps=steps)
        shape = self.latent_shape(frames, height, width)
        n = len(prompts)
        z = _noise(shape, n, seed).to(self.device)  # (B, C, T', H', W')
        y, mask = self.encode(prompts)
        per_sample = {
            "fps": torch.full((n,), float(fps), device=self.device),
            "height": torch.full((n,), float(height), device=self.device),
            "width": torch.full((n,), float(width), device=self.device),
        }
        z = self._sample(
            z, y, mask, per_sample, frames=frames, steps=steps, guidance=guidance, on_step=on_step
        )
        video = self.autoencoder.decode(z.to(self._dtype)).float()
        return video.clamp(-1, 1)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional captions: (y, mask (B, L)); y is what the model's forward takes."""
        y, mask, _ = self.text_encoder.encode(prompts)
        return y.to(self.device), mask.to(self.device)

    def _sample(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        per_sample: dict[str, torch.Tensor],
        *,
        frames: int,
        steps: int,
        guidance: float,
        on_step: Callable[[int], None] | None,
    ) -> torch.Tensor:
        """Euler from noise to latents with classifier-free guidance (Open-Sora's RFLOW.sample,
        `rflow.euler_sample`): the conditional and the null captions in one batch of 2B, both
        halves with the conditional captions' mask, as Open-Sora passes it."""
        from parallm.video import rflow

        n = z.shape[0]
        model, dtype = self.model, self._dtype
        y = self._as_embeddings(y, mask)
        y_null = model.null_caption(n).to(device=y.device, dtype=y.dtype)

        def model_fn(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
            return model(x.to(dtype), t, **kwargs)

        shift = None
        if self.config.timestep_shift:
            shift = rflow.Shift(
                height=per_sample["height"],
                width=per_sample["width"],
                num_frames=torch.full((n,), frames, device=z.device),
                scale=self.config.shift_scale,
            )
        return rflow.euler_sample(
            model_fn,
            z,
            y=y,
            y_null=y_null,
            steps=steps,
            guidance=guidance,
            shift=shift,
            on_step=on_step,
            mask=mask,
            **per_sample,
        )

    def _as_embeddings(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, L, Cy) caption embeddings. Token ids (the trainable encoder) go through the
        model's caption encoder here, so they batch with the null caption's embeddings (which
        replace the encoder's output in training too)."""
        if y.dim() == 4:
            return y.to(self._dtype)
        return self.model.caption_encoder(y, mask)


def _check_request(prompts: list[str], *, frames: int, height: int, width: int, steps: int):
    if not prompts:
        raise UserError("prompts: none given; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"prompts[{i}]: {p!r} is not valid; give the text of the video")
    for name, value in (("frames", frames), ("height", height), ("width", width), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name}: {value!r} is not valid; must be an integer >= 1")


def _load_text_encoder(
    d: Path, config: VideoConfig, model: torch.nn.Module, *, device: torch.device, dtype
) -> Any:
    """The encoder video.json names: the trainable caption tokenizer (ids for the model's own
    caption encoder) or a T5 directory, both at the model's caption length."""
    from parallm.video.text import CAPTION_TOKENIZER_FILE, load_text_encoder

    if config.text_encoder == TRAINABLE:
        if not model.args.caption_vocab_size:
            raise UserError(
                f"{d}: video.json says text_encoder 'trainable' but the model has no caption "
                "encoder (caption_vocab_size 0)"
            )
        if not (d / CAPTION_TOKENIZER_FILE).exists():
            raise UserError(
                f"{d}: video.json says text_encoder 'trainable' but {CAPTION_TOKENIZER_FILE} "
                "is missing"
            )
    return load_text_encoder(
        _resolve(d, config.text_encoder),
        model_dir=d,
        max_length=model.args.model_max_length,
        device=device,
        dtype=dtype,
    )
