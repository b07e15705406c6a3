"""FLUX latents and the rectified-flow Euler sampler, shared by every FLUX code path.

One implementation for the toy flow model (`unhype.toy.flow`) and the trainer's FLUX backends
(`unhype.trainer.backends.flux`): latents [N, C, H, W] are packed in 2x2 patches into [N, H/2 * W/2, 4C]
tokens by diffusers' `FluxPipeline._pack_latents` and addressed by
`_prepare_latent_image_ids`. Flow convention (diffusers FlowMatch): z_sigma = (1 - sigma) x0 +
sigma noise, the model predicts v = noise - x0, and sampling is `FlowMatchEulerDiscreteScheduler`
on FluxPipeline's sigmas (1 .. 1/steps, shifted by the scheduler's config) from pure noise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

# velocity(step_index, timestep, z) -> the (guided) velocity for the packed latents z
Velocity = Callable[[int, Tensor, Tensor], Tensor]


def pack(latents: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, H/2 * W/2, 4C]."""
    from diffusers import FluxPipeline

    n, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, n, c, h, w)


def unpack(packed: Tensor, height: int, width: int) -> Tensor:
    """[N, H/2 * W/2, 4C] -> [N, C, H, W] for a latent of `height` x `width`."""
    from diffusers import FluxPipeline

    # _unpack_latents takes pixel sizes and a VAE factor; factor 1 with latent sizes is exact
    return FluxPipeline._unpack_latents(packed, height, width, 1)


def image_ids(height: int, width: int, device="cpu", dtype=torch.float32) -> Tensor:
    """Position ids [H/2 * W/2, 3] of the packed tokens of a `height` x `width` latent."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def make_scheduler(config, steps: int, height: int, width: int, device="cpu"):
    """FlowMatchEuler set to FluxPipeline's sigmas, with its resolution shift when the config
    asks for dynamic shifting (a static `shift` is applied by the scheduler itself)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    cfg = scheduler.config
    mu = None
    if cfg.get("use_dynamic_shifting"):
        mu = calculate_shift((height // 2) * (width // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler


def initial_noise(n: int, latent_shape, generator: torch.Generator, device="cpu") -> Tensor:
    """Packed pure noise for n latents of `latent_shape` (C, H, W), drawn on the CPU."""
    return pack(torch.randn((n, *latent_shape), generator=generator)).to(device)


def euler(z: Tensor, scheduler, velocity: Velocity, stop: int | None = None) -> Tensor:
    """Euler steps of `scheduler` from z (all of them, or the first `stop`)."""
    for i, t in enumerate(scheduler.timesteps[:stop]):
        z = scheduler.step(velocity(i, t, z), t, z, return_dict=False)[0]
    return z
