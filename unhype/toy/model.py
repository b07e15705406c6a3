"""The toy text-to-image model: tiny CLIP text tower + tiny SD-style UNet over a 16x16 image.

The UNet works on a fixed, lossless linear "latent": the [-1, 1] image pixel-unshuffled into
2x2 patches, [3, 16, 16] -> [12, 8, 8] (`encode_images` / `decode_latents`). At 8x8 its
self-attention is 16x cheaper than at 16x16, which is what makes CPU training affordable.

`load_toy()` returns a `ToyModel` (tokenizer, text_encoder, unet, scheduler) from the committed
weights (`weights_dir()`, diffusers/transformers folder layout). The UNet predicts x0
(`prediction_type="sample"`) and conditions only through cross-attention (`attn2`) on the text
encoder's `last_hidden_state`; the hypernetwork reads `pooler_output` (TOY_TEXT_DIM wide).

Sampling contract (`ToyModel.sample`), so callers can give the two CFG halves different weights:
each DDIM step runs the UNet exactly once, on the concatenated batch
`[uncond rows (prompt ""), one per prompt; cond rows, one per prompt]` (2N rows; with
`guidance == 1` only the N cond rows). Before each call `before_unet_call(step_index, timestep,
rows)` is invoked with `rows[j]` = the prompt index of batch row j, or -1 for an unconditional
row, so a caller can switch per-row LoRA weights (apply to rows >= 0 only for cond-only erasure).
Guided x0 is clamped to [-1, 1] at every step (DDIM `clip_sample`, eps re-derived from it),
which keeps guidance from pushing colours out of range.

Importing this module is cheap (no diffusers/transformers until a function needs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from unhype.toy import DEFAULT_STEPS  # noqa: F401  (defined there, without torch, for help texts)

TOY_TEXT_DIM = 64  # pooled text embedding width (= unhype.toy.clip.TEXT_DIM)
RESOLUTION = 16
PATCH = 2
LATENT_CHANNELS = 3 * PATCH * PATCH
LATENT_SIZE = RESOLUTION // PATCH
DEFAULT_GUIDANCE = 2.0

BeforeUnetCall = Callable[[int, int, list], None]


def set_threads() -> int:
    """Use 2 torch threads, or 1 when other jobs already keep the CPUs busy: on this shared
    2-core machine, measured, 2 threads under contention made a UNet step ~9x slower than 1."""
    import os

    cores = os.cpu_count() or 1
    n = 1 if os.getloadavg()[0] >= cores - 0.5 else min(2, cores)
    torch.set_num_threads(n)
    return n


def weights_dir() -> Path:
    """Folder of the committed toy weights (tokenizer/, text_encoder/, unet/, scheduler/, ...)."""
    return Path(__file__).resolve().parent / "weights"


def toy_unet_config() -> dict:
    """diffusers `UNet2DConditionModel` config of the toy denoiser."""
    return {
        "sample_size": LATENT_SIZE, "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS, "layers_per_block": 1,
        "block_out_channels": [64, 96, 96], "norm_num_groups": 8,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3,
        "up_block_types": ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": TOY_TEXT_DIM, "attention_head_dim": 4,
    }


def scheduler_config() -> dict:
    """Training noise schedule (DDPM); sampling uses DDIM from the same config."""
    return {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.0,
            "timestep_spacing": "trailing"}


def encode_images(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, 16, 16] in [0, 1] -> latents [N, 12, 8, 8] in [-1, 1] (exact, linear)."""
    return torch.nn.functional.pixel_unshuffle(images * 2 - 1, PATCH)


def decode_latents(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_images`, clamped to [0, 1]."""
    return ((torch.nn.functional.pixel_shuffle(latents, PATCH) + 1) / 2).clamp(0, 1)


@dataclass
class ToyModel:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object  # DDIMScheduler
    device: str = "cpu"

    latent_shape = (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)  # one sample, as the UNet sees it

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return encode_images(images)

    @staticmethod
    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(latents)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last_hidden_state [N, L, D], pooler_output [N, D]) of the toy text encoder."""
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(input_ids=ids)
        return out.last_hidden_state, out.pooler_output

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS,
               guidance: float = DEFAULT_GUIDANCE, unet: Optional[torch.nn.Module] = None,
               before_unet_call: Optional[BeforeUnetCall] = None,
               hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] for `prompts`, deterministic in `seed`.

        `unet` replaces the base UNet (e.g. one with LoRA hooks attached); `hidden_states`
        [N, L, D] replaces the encoded prompts for the cond rows. See the module docstring for
        the [uncond; cond] batch layout and `before_unet_call`.
        """
        from diffusers import DDIMScheduler

        unet = unet if unet is not None else self.unet
        n = len(prompts)
        cond = hidden_states.to(self.device) if hidden_states is not None else \
            self.encode_prompts(prompts)[0]
        guided = guidance != 1.0
        if guided:
            uncond = self.encode_prompts([""])[0].expand(n, -1, -1)
            context = torch.cat([uncond, cond])
            rows = [-1] * n + list(range(n))
        else:
            context, rows = cond, list(range(n))
        generator = torch.Generator("cpu").manual_seed(int(seed))
        x = torch.randn(n, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE,
                        generator=generator).to(self.device)
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        for i, t in enumerate(scheduler.timesteps):
            if before_unet_call is not None:
                before_unet_call(i, int(t), rows)
            batch = torch.cat([x, x]) if guided else x
            pred = unet(batch, t, encoder_hidden_states=context).sample
            if guided:
                pred_u, pred_c = pred.chunk(2)
                pred = pred_u + guidance * (pred_c - pred_u)
            x = scheduler.step(pred, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        return decode_latents(x).cpu()


def load_unet(path: Path, device="cpu"):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.float32)
    return unet.to(device).eval().requires_grad_(False)


def load_toy(device: str = "cpu", weights: Optional[Path] = None) -> ToyModel:
    """The committed toy model (or one from `weights`), in eval mode with gradients off."""
    from diffusers import DDIMScheduler
    from unhype.errors import UnHypeError
    from unhype.toy import clip

    weights = Path(weights) if weights is not None else weights_dir()
    if not (weights / "unet" / "config.json").is_file():
        raise UnHypeError(f"no toy weights in {weights}; run `unhype toy build`")
    return ToyModel(
        tokenizer=clip.load_tokenizer(weights),
        text_encoder=clip.load_text_encoder(weights, device),
        unet=load_unet(weights / "unet", device),
        scheduler=DDIMScheduler.from_pretrained(weights / "scheduler"),
        device=device)
