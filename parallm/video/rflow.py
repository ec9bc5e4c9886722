"""Rectified flow, as Open-Sora v1.2 trains and samples STDiT3 (its `schedulers/rf`).

A timestep `t` lies in [0, num_timesteps] (1000): `t = 0` is the clean video `x0`, `t = 1000` pure
noise, and in between `x_t = (1 - t/1000) x0 + (t/1000) noise`. The model predicts the velocity
`x0 - noise` (the direction from noise to data), trained with a mean-squared error. Training draws
`t` logit-normal (`sigmoid(N(loc, scale)) * 1000`), optionally shifted towards noise for large or
long videos (`timestep_transform`); sampling takes Euler steps from pure noise at t = 1000 down to
0 with classifier-free guidance.

Frame masks (image / video conditioning): `x_mask` (B, T) is True for a frame the model generates
and False for a conditioning frame, which stays clean (`x_t = x0`), gets timestep 0 inside the
model and is not in the loss. All functions take video-shaped tensors (B, C, T, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NUM_TIMESTEPS = 1000
BASE_RESOLUTION = 512 * 512  # Open-Sora's timestep_transform: the resolution of ratio 1


@dataclass(frozen=True, kw_only=True)
class Shift:
    """The video size Open-Sora's timestep shift reads, per sample (pixel space): height, width,
    num_frames (B,) tensors, and the user's extra factor `scale`."""

    height: torch.Tensor
    width: torch.Tensor
    num_frames: torch.Tensor
    scale: float = 1.0


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcasting against `like` (B, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def logit_normal_timesteps(
    n: int,
    generator: torch.Generator,
    *,
    loc: float = 0.0,
    scale: float = 1.0,
    num_timesteps: int = NUM_TIMESTEPS,
) -> torch.Tensor:
    """(n,) float32 timesteps `sigmoid(N(loc, scale)) * num_timesteps` from `generator` (a CPU
    generator: the same seed draws the same timesteps on any device). Open-Sora's
    `LogisticNormal(loc, scale)`'s first component is this sigmoid."""
    z = torch.randn(n, generator=generator, dtype=torch.float32)
    return torch.sigmoid(loc + scale * z) * num_timesteps


def timestep_transform(
    t: torch.Tensor,
    shift: Shift,
    *,
    num_timesteps: int = NUM_TIMESTEPS,
    base_resolution: int = BASE_RESOLUTION,
    base_num_frames: int = 1,
) -> torch.Tensor:
    """Open-Sora v1.2's resolution- and length-dependent shift of timesteps t (B,) in
    [0, num_timesteps]: with `r = sqrt(H W / 512^2) * sqrt(F' / base_num_frames) * scale`, where
    F' = 1 for a single frame and `num_frames // 17 * 5` otherwise (the latent frames of its
    video VAE), `t' = r t / (1 + (r - 1) t)` on t / num_timesteps. r > 1 moves timesteps towards
    noise. Open-Sora tests the first sample's frame count for the whole batch; here each sample
    is shifted by its own (the same when a batch shares a shape, as buckets make it)."""
    t = t.float() / num_timesteps
    height, width = shift.height.float(), shift.width.float()
    ratio_space = (height * width / base_resolution).sqrt()
    frames = shift.num_frames
    latent_frames = torch.where(frames == 1, torch.ones_like(frames), frames // 17 * 5)
    ratio_time = (latent_frames.float() / base_num_frames).sqrt()
    ratio = (ratio_space * ratio_time * shift.scale).to(t.device)
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, num_timesteps: int = NUM_TIMESTEPS
) -> torch.Tensor:
    """x_t = (1 - t/num_timesteps) x0 + (t/num_timesteps) noise, per sample t (B,)."""
    tau = _expand(t.float() / num_timesteps, x0).to(x0.dtype)
    return (1 - tau) * x0 + tau * noise


def noised(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    x_mask: torch.Tensor | None = None,
    *,
    num_timesteps: int = NUM_TIMESTEPS,
) -> torch.Tensor:
    """The model's input in training: `add_noise`, with conditioning frames (x_mask False,
    (B, T)) left clean, as Open-Sora's training_losses does (x_t at t = 0 is x0)."""
    x_t = add_noise(x0, noise, t, num_timesteps=num_timesteps)
    if x_mask is None:
        return x_t
    return torch.where(x_mask[:, None, :, None, None], x_t, x0)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: x0 - noise."""
    return x0 - noise


def mean_flat(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) per-sample mean of x (B, C, T, H, W) over every other dimension; with `mask`
    (B, T) over the masked-in frames only: sum over those frames / (frames x C x H x W)."""
    if mask is None:
        return x.mean(dim=list(range(1, x.dim())))
    b, c, t, h, w = x.shape
    per_frame = x.transpose(1, 2).reshape(b, t, c * h * w).sum(-1)  # (B, T)
    return (per_frame * mask).sum(1) / (mask.sum(1) * (c * h * w))


def flow_loss(
    v_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Open-Sora's per-sample loss (B,): mean_flat((v_pred - (x0 - noise))^2) over the generated
    frames. `v_pred` (B, Co, T, H, W) may carry learned-sigma channels after the C velocity ones
    (Co = 2C); only the first C are compared."""
    v = v_pred[:, : x0.shape[1]]
    mask = None if x_mask is None else x_mask.to(v.dtype)
    return mean_flat((v.float() - velocity_target(x0, noise).float()).pow(2), mask)


def sampling_timesteps(steps: int, *, num_timesteps: int = NUM_TIMESTEPS) -> list[float]:
    """Open-Sora's Euler grid: num_timesteps * (1 - i / steps) for i = 0..steps-1 (1000 first;
    the last step goes from the last one to 0)."""
    return [(1.0 - i / steps) * num_timesteps for i in range(steps)]


def initial_noise(
    shape: tuple[int, ...],
    *,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape` drawn on the CPU from `seed`, then moved: the same seed
    gives the same starting noise (so the same video) on every device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _doubled(value):
    """A per-sample tensor argument for the batched [cond, uncond] call: two copies stacked."""
    return torch.cat([value, value]) if isinstance(value, torch.Tensor) else value


ModelFn = Callable[..., torch.Tensor]


@torch.no_grad()
def euler_sample(
    model_fn: ModelFn,
    z: torch.Tensor,
    *,
    y: torch.Tensor,
    y_null: torch.Tensor,
    steps: int,
    guidance: float,
    x_mask: torch.Tensor | None = None,
    shift: Shift | None = None,
    num_timesteps: int = NUM_TIMESTEPS,
    on_step: Callable[[int], None] | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Open-Sora v1.2's RFLOW.sample: Euler steps from `z` (B, C, T, H, W; noise, with any
    conditioning frames already in place) at t = num_timesteps down to 0.

    Each step calls `model_fn(z_in, t, y=cat([y, y_null]), x_mask=..., **model_kwargs)` once on
    the conditional and unconditional halves batched (2B rows: every tensor in `model_kwargs`,
    e.g. the caption mask, fps, height, width, is stacked twice), takes the first C output
    channels as velocities, guides them `v = v_uncond + guidance (v_cond - v_uncond)` and steps
    `z = z + v dt` with dt = (t_i - t_{i+1}) / num_timesteps (t_i / num_timesteps at the last
    step). With `shift`, every timestep of the grid is shifted per sample first
    (`timestep_transform`; Open-Sora samples with scale 1). Frames with `x_mask` False keep the
    values they start with. Deterministic: the same `z` gives the same result. `on_step(i)` is
    called after each step (progress)."""
    b = z.shape[0]
    grid = [torch.full((b,), t, device=z.device) for t in sampling_timesteps(steps)]
    if shift is not None:
        grid = [timestep_transform(t, shift, num_timesteps=num_timesteps) for t in grid]
    kwargs = {name: _doubled(value) for name, value in model_kwargs.items()}
    if x_mask is not None:
        kwargs["x_mask"] = _doubled(x_mask)
        keep = x_mask[:, None, :, None, None]  # (B, 1, T, 1, 1)
        start = z.clone()
    y_in = torch.cat([y, y_null])
    for i, t in enumerate(grid):
        out = model_fn(torch.cat([z, z]), torch.cat([t, t]), y=y_in, **kwargs)
        v_cond, v_uncond = out[:, : z.shape[1]].float().chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        dt = (t - grid[i + 1] if i + 1 < len(grid) else t) / num_timesteps
        z = z + (v * _expand(dt.float(), v)).to(z.dtype)
        if x_mask is not None:
            z = torch.where(keep, z, start)
        if on_step is not None:
            on_step(i)
    return z
