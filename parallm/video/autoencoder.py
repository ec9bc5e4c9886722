"""Where the diffusion runs: pixel space or an image VAE's latent space, behind one interface.

`video.vae = ""` trains and samples pixels (`PixelSpace`, the embedded demo); a directory holding
a `diffusers` `AutoencoderKL` (Stable Diffusion's VAE, as Open-Sora v1.0/1.1 use it) encodes each
frame on its own (`ImageVAE`), as Open-Sora's `VideoAutoencoderKL` does. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from parallm.errors import UserError


class Autoencoder(ABC):
    """Maps videos (B, 3, T, H, W) in [-1, 1] to latents (B, C, T / ft, H / fs, W / fs) and back.
    `decode` returns videos clamped to [-1, 1]."""

    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    @abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_size(
        self, frames: int, height: int, width: int, *, fields: str = "video."
    ) -> tuple[int, int, int]:
        """(T, H, W) of the latents of a (frames, height, width) video; sizes the factors do not
        divide are a UserError naming the field (`fields` + frames / height / width: the job
        file's, or "" for a generation request's)."""
        for field, size, factor in (
            ("frames", frames, self.temporal_factor),
            ("height", height, self.spatial_factor),
            ("width", width, self.spatial_factor),
        ):
            if size % factor:
                raise UserError(
                    f"{fields}{field}: {size} is not divisible by the autoencoder's factor "
                    f"{factor}; use a multiple of {factor}"
                )
        return (
            frames // self.temporal_factor,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )


class PixelSpace(Autoencoder):
    """No autoencoder: latents are the pixels (3 channels, factors 1)."""

    latent_channels = 3
    spatial_factor = 1
    temporal_factor = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class ImageVAE(Autoencoder):
    """A `diffusers.AutoencoderKL` applied frame by frame: the frames are folded into the batch
    and run `micro_frames` at a time (bounding memory for long videos).

    Latents are `(z - shift_factor) * scaling_factor` with the factors from the VAE's config
    (0.18215 and none for Stable Diffusion's VAE, the constant Open-Sora's `VideoAutoencoderKL`
    hard-codes) unless `scaling_factor` is given.

    `encode` returns the mean of the latent distribution unless a generator is given. Open-Sora
    samples; the mean makes latents a function of the video alone, so every layout, rank and
    micro-batch split sees the same training targets, and latents can be cached. (The SD VAE's
    posterior standard deviation is small next to its mean: the two differ by little.)
    With `generator`, latents are sampled as Open-Sora does, from that generator."""

    temporal_factor = 1

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        scaling_factor: float | None = None,
        micro_frames: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        path = _vae_dir(path)
        diffusers = _import_diffusers()
        if micro_frames < 1:
            raise UserError(f"micro_frames: {micro_frames} must be at least 1")
        self.vae = diffusers.AutoencoderKL.from_pretrained(path, local_files_only=True)
        self.vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        config = self.vae.config
        self.path = path
        self.latent_channels = int(config.latent_channels)
        self.spatial_factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(
            config.scaling_factor if scaling_factor is None else scaling_factor
        )
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.micro_frames = micro_frames

    def _frames(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply `fn` to (N, C, H, W) frames of x (B, C, T, H, W), `micro_frames` at a time."""
        b, _, t = x.shape[:3]
        param = next(self.vae.parameters())
        frames = x.transpose(1, 2).flatten(0, 1).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            out = torch.cat([fn(chunk) for chunk in frames.split(self.micro_frames)])
        return out.float().unflatten(0, (b, t)).transpose(1, 2)  # (B, C', T, H', W')

    def encode(
        self, video: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """video (B, 3, T, H, W) in [-1, 1] -> latents (B, C, T, H / f, W / f) float32."""
        self.latent_size(video.shape[2], video.shape[3], video.shape[4])

        def encode(frames):
            dist = self.vae.encode(frames).latent_dist
            z = dist.mean if generator is None else dist.sample(generator=generator)
            return (z - self.shift_factor) * self.scaling_factor

        return self._frames(video, encode)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, T, h, w) -> video (B, 3, T, h * f, w * f) float32 in [-1, 1]."""

        def decode(z):
            return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample

        return self._frames(latents, decode).clamp(-1, 1)


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise UserError(
            "video.vae: an image VAE needs diffusers (not installed): pip install diffusers"
        ) from None
    return diffusers


def _vae_dir(path: str | os.PathLike) -> Path:
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"video.vae: {str(d)!r} is not a directory (a diffusers AutoencoderKL)")
    try:
        class_name = json.loads((d / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        class_name = None
    if class_name != "AutoencoderKL":
        raise UserError(
            f"video.vae: {str(d)!r} is not a diffusers AutoencoderKL directory (config.json "
            f"_class_name {class_name!r}); give one, or '' for pixel space"
        )
    return d


def make_autoencoder(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Autoencoder:
    """`video.vae`: "" -> PixelSpace; a diffusers AutoencoderKL directory -> ImageVAE."""
    if not spec:
        return PixelSpace()
    return ImageVAE(spec, device=device, dtype=dtype)
