"""The toy flow model: a tiny diffusers `FluxTransformer2DModel` trained by rectified flow.

Same world, same latent and same text encoder as the toy UNet (`unhype.toy.model`): the 16x16
image pixel-unshuffled to 12x8x8, packed by `FluxPipeline._pack_latents` into 16 tokens of 48
values; the transformer attends to the toy CLIP's `last_hidden_state` (64-d, the
`joint_attention_dim`) and its `pooler_output` (64-d) is the `pooled_projections` input, which is
also what the hypernetwork reads. No guidance embedding (it is not guidance-distilled): sampling
uses CFG with the SD toy's batch contract, [uncond rows; cond rows] in one call and
`before_unet_call(step_index, timestep, rows)` first (rows[j] = prompt index, -1 uncond).

Flow convention (diffusers FlowMatch): z_sigma = (1 - sigma) x0 + sigma noise, the model
predicts v = noise - x0 at timestep sigma (the transformer's input; 1000 sigma on the
scheduler's scale), sampled with `FlowMatchEulerDiscreteScheduler` from sigma = 1. Packing and the
Euler sampler are `unhype.flow_latents`, the same code as the trainer's FLUX backends.

Weights: `unhype/toy/weights/flow/` (transformer/ in fp16, scheduler/, build.json); rebuild with
`unhype toy build --stages flow`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from unhype import flow_latents
from unhype.toy.model import (LATENT_CHANNELS, LATENT_SIZE, TOY_TEXT_DIM, BeforeUnetCall,
                              ToyModel, decode_latents, encode_images, weights_dir)

DEFAULT_STEPS = 12
DEFAULT_GUIDANCE = 5.0  # judge shape accuracy 90% at 3, 92% at 4, 93% at 5, 91% at 7
FLOW_STEPS = 5000  # ~0.3 s/step on one CPU thread: ~25 min
FLOW_BATCH = 64
FLOW_LR = 1e-3


def flow_dir(weights: Path | None = None) -> Path:
    return Path(weights if weights is not None else weights_dir()) / "flow"


def toy_flow_config() -> dict:
    """diffusers `FluxTransformer2DModel` config of the toy flow model."""
    return {
        "patch_size": 1, "in_channels": 4 * LATENT_CHANNELS, "num_layers": 3,
        "num_single_layers": 3, "attention_head_dim": 24, "num_attention_heads": 4,
        "joint_attention_dim": TOY_TEXT_DIM, "pooled_projection_dim": TOY_TEXT_DIM,
        "guidance_embeds": False, "axes_dims_rope": [8, 8, 8],  # sums to attention_head_dim
    }


def scheduler_config() -> dict:
    """FlowMatchEuler, static shift 2 (more of the few steps at high noise, where shapes form)."""
    return {"num_train_timesteps": 1000, "shift": 2.0, "use_dynamic_shifting": False}


def image_ids(device="cpu", dtype=torch.float32) -> torch.Tensor:
    return flow_latents.image_ids(LATENT_SIZE, LATENT_SIZE, device, dtype)


def velocity(transformer, z: torch.Tensor, sigma: torch.Tensor, hidden: torch.Tensor,
             pooled: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for packed z [N, 16, 48] at sigma [N] in [0, 1]."""
    txt_ids = torch.zeros(hidden.shape[1], 3, device=z.device)
    return transformer(hidden_states=z, timestep=sigma, encoder_hidden_states=hidden,
                       pooled_projections=pooled, txt_ids=txt_ids,
                       img_ids=image_ids(z.device), return_dict=False)[0]


@dataclass
class ToyFlow:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    scheduler: object  # FlowMatchEulerDiscreteScheduler
    device: str = "cpu"

    latent_shape = (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)

    @staticmethod
    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        """Packed [N, 16, 48] or unpacked [N, 12, 8, 8] latents -> images [N, 3, 16, 16]."""
        if latents.dim() == 3:
            latents = flow_latents.unpack(latents, LATENT_SIZE, LATENT_SIZE)
        return decode_latents(latents)

    # (last_hidden_state [N, 16, 64], pooler_output [N, 64]): the same text encoder, same call
    encode_prompts = ToyModel.encode_prompts

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS,
               guidance: float = DEFAULT_GUIDANCE,
               transformer: Optional[torch.nn.Module] = None,
               before_unet_call: Optional[BeforeUnetCall] = None) -> torch.Tensor:
        """Images [N, 3, 16, 16] in [0, 1], deterministic in `seed` (Euler + CFG)."""
        model = transformer if transformer is not None else self.transformer
        n = len(prompts)
        hidden, pooled = self.encode_prompts(prompts)
        guided = guidance != 1.0
        if guided:
            u_hidden, u_pooled = self.encode_prompts([""])
            hidden = torch.cat([u_hidden.expand(n, -1, -1), hidden])
            pooled = torch.cat([u_pooled.expand(n, -1), pooled])
            rows = [-1] * n + list(range(n))
        else:
            rows = list(range(n))
        generator = torch.Generator("cpu").manual_seed(int(seed))
        z = flow_latents.initial_noise(n, self.latent_shape, generator, self.device)
        scheduler = flow_latents.make_scheduler(self.scheduler.config, steps, LATENT_SIZE,
                                                LATENT_SIZE, self.device)

        def guided_velocity(i, t, z):
            if before_unet_call is not None:
                before_unet_call(i, int(t), rows)
            batch = torch.cat([z, z]) if guided else z
            sigma = (t / 1000).reshape(1).expand(len(batch)).to(self.device)
            v = velocity(model, batch, sigma, hidden, pooled)
            if not guided:
                return v
            v_u, v_c = v.chunk(2)
            return v_u + guidance * (v_c - v_u)

        return self.decode_latents(flow_latents.euler(z, scheduler, guided_velocity)).cpu()


def load_transformer(path: Path, device="cpu"):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def load_toy_flow(device: str = "cpu", weights: Optional[Path] = None) -> ToyFlow:
    """The committed toy flow model (transformer from `weights/flow`, text encoder shared)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from unhype.errors import UnHypeError
    from unhype.toy import clip

    weights = Path(weights) if weights is not None else weights_dir()
    folder = flow_dir(weights)
    if not (folder / "transformer" / "config.json").is_file():
        raise UnHypeError(f"no toy flow weights in {folder}; run `unhype toy build --stages "
                          "flow`")
    return ToyFlow(tokenizer=clip.load_tokenizer(weights),
                   text_encoder=clip.load_text_encoder(weights, device),
                   transformer=load_transformer(folder / "transformer", device),
                   scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
                   device=device)


# --- training -----------------------------------------------------------------------------------
def train_flow(tokenizer, text_encoder, seed: int, steps: int = FLOW_STEPS,
               batch: int = FLOW_BATCH, lr: float = FLOW_LR, dropout: float = 0.1,
               ema_decay: float = 0.998, progress=None, transformer=None):
    """Rectified-flow training on freshly rendered toy images; returns the EMA copy.

    sigma is drawn half uniform, half logit-normal (SD3's), which weights mid and high noise
    where the shape is decided; captions as the toy UNet's (`train.CaptionSampler`)."""
    from diffusers import FluxTransformer2DModel

    from unhype.toy import data, train

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    texts, cap_s, cap_c = train.caption_table()
    table_h, table_p = train.encode_captions(tokenizer, text_encoder, texts)
    empty_h, empty_p = train.encode_captions(tokenizer, text_encoder, [""])
    sampler = train.CaptionSampler(cap_s, cap_c)
    model = transformer if transformer is not None else FluxTransformer2DModel(
        **toy_flow_config())
    opt = train.EmaOptimiser(model, lr, steps, lr_floor=0.05, ema_decay=ema_decay)
    ids = image_ids()
    txt_ids = torch.zeros(table_h.shape[1], 3)
    for step in range(steps):
        images, s_idx, c_idx = data.render_batch(batch, rng)
        x0 = flow_latents.pack(encode_images(torch.from_numpy(images)))
        rows = [sampler(s, c, rng) for s, c in zip(s_idx, c_idx)]
        hidden, pooled = table_h[rows], table_p[rows]
        drop = torch.from_numpy(rng.random(batch) < dropout)
        hidden = torch.where(drop[:, None, None], empty_h, hidden)
        pooled = torch.where(drop[:, None], empty_p, pooled)
        noise = torch.randn_like(x0)
        sigma = torch.where(torch.rand(batch) < 0.5, torch.rand(batch),
                            torch.sigmoid(torch.randn(batch)))
        zt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = model(hidden_states=zt, timestep=sigma, encoder_hidden_states=hidden,
                     pooled_projections=pooled, txt_ids=txt_ids, img_ids=ids,
                     return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.step(step, loss)
        if progress is not None:
            progress(step, loss.item(), opt.ema)
    return opt.ema


def text_encoder_digest(weights: Path | None = None) -> str:
    """sha256 of the toy text encoder's weights: the flow model is only valid with the one it
    was trained against (recorded in flow/build.json, checked by the tests)."""
    import hashlib

    path = Path(weights if weights is not None else weights_dir()) / "text_encoder" / \
        "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_flow(out_dir: Path, seed: int = 0, steps: int = FLOW_STEPS, progress=None) -> dict:
    """Train the flow model against the text encoder in `out_dir`; write `out_dir/flow/`."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from unhype.atomic import atomic_write_text
    from unhype.toy import clip

    out_dir = Path(out_dir)
    t0 = time.time()
    tokenizer = clip.load_tokenizer(out_dir)
    text_encoder = clip.load_text_encoder(out_dir)
    ema = train_flow(tokenizer, text_encoder, seed + 7, steps=steps, progress=progress)
    folder = flow_dir(out_dir)
    clip.save_atomic(ema.half(), folder / "transformer")  # fp16 on disk, loaded as fp32
    clip.save_atomic(FlowMatchEulerDiscreteScheduler(**scheduler_config()), folder / "scheduler")
    summary = {"flow_steps": steps, "flow_batch": FLOW_BATCH, "flow_seed": seed + 7,
               "flow_minutes": (time.time() - t0) / 60, "threads": torch.get_num_threads(),
               "text_encoder_sha256": text_encoder_digest(out_dir)}
    atomic_write_text(folder / "build.json", json.dumps(summary, indent=2) + "\n")
    return summary
