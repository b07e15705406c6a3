"""Training of the toy denoiser: x0-prediction on freshly rendered images, caption dropout, EMA.

Captions come from a precomputed table of every caption the templates can produce (their
text-encoder hidden states computed once, the text encoder being frozen), so a step costs one
UNet forward/backward on freshly rendered images.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

from unhype.toy import data


def caption_table():
    """Every caption the templates produce: (texts, shape index or -1, colour index or -1)."""
    rows: list[tuple[str, int, int]] = []
    for si, shape in enumerate(data.SHAPES):
        for ci, colour in enumerate(data.COLOURS):
            rows += [(data.fill(tpl, sw, cw), si, ci) for tpl, sw, cw in itertools.product(
                data.FULL_TEMPLATES, data.SYNONYMS[shape], data.COLOUR_SYNONYMS[colour])]
        rows += [(data.fill(tpl, sw), si, -1)
                 for tpl, sw in itertools.product(data.SHAPE_TEMPLATES, data.SYNONYMS[shape])]
    for ci, colour in enumerate(data.COLOURS):
        rows += [(data.fill(tpl, None, cw), -1, ci) for tpl, cw in itertools.product(
            data.COLOUR_TEMPLATES, data.COLOUR_SYNONYMS[colour])]
    texts, shapes, colours = zip(*rows)
    return list(texts), np.array(shapes), np.array(colours)


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, texts: list[str], batch: int = 512):
    """(last_hidden_state [N, L, D], pooler_output [N, D]) of `texts`, in batches."""
    hidden, pooled = [], []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i:i + batch], padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
        out = text_encoder(input_ids=ids)
        hidden.append(out.last_hidden_state), pooled.append(out.pooler_output)
    return torch.cat(hidden), torch.cat(pooled)


def encode_table(tokenizer, text_encoder, texts: list[str], batch: int = 512) -> torch.Tensor:
    return encode_captions(tokenizer, text_encoder, texts, batch)[0]


class CaptionSampler:
    """Draws a caption row for an image (shape s, colour c) with data.CAPTION_KIND_P."""

    def __init__(self, shapes: np.ndarray, colours: np.ndarray):
        self.kinds = list(data.CAPTION_KIND_P)
        self.p = list(data.CAPTION_KIND_P.values())
        self.rows = {}
        for s in range(len(data.SHAPES)):
            for c in range(len(data.COLOURS)):
                self.rows[s, c] = {
                    "full": np.flatnonzero((shapes == s) & (colours == c)),
                    "shape": np.flatnonzero((shapes == s) & (colours == -1)),
                    "colour": np.flatnonzero((shapes == -1) & (colours == c))}

    def __call__(self, s: int, c: int, rng: np.random.Generator) -> int:
        rows = self.rows[s, c][self.kinds[rng.choice(len(self.kinds), p=self.p)]]
        return int(rows[rng.integers(len(rows))])


class EmaOptimiser:
    """The toy models' optimisation: AdamW (weight decay 0.01), linear warmup over
    min(200, steps / 10) steps then cosine down to `lr_floor` x lr, gradient norm clipped to 1,
    and an EMA copy of the model (`.ema`, the one to ship; decay warms up to `ema_decay`).
    Puts `model` in train mode."""

    def __init__(self, model, lr: float, steps: int, lr_floor: float, ema_decay: float):
        import copy

        model.train()
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.ema_params, self.params = list(self.ema.parameters()), list(model.parameters())
        self.ema_decay = ema_decay
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        warmup = max(1, min(200, steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda i: min(1.0, (i + 1) / warmup) * (
                lr_floor + (1 - lr_floor) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))

    def step(self, step: int, loss: torch.Tensor) -> None:
        """Backward `loss`, one optimiser and scheduler step, then the EMA update."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1 - decay)


def train_unet(tokenizer, text_encoder, seed: int, steps: int = 2400, batch: int = 32,
               lr: float = 2e-3, dropout: float = 0.1, ema_decay: float = 0.999,
               progress=None, unet=None, high_noise_from: int = 0):
    """Train the toy UNet (from scratch or from `unet`); returns the EMA copy (the one to ship).

    `high_noise_from` > 0 draws half the timesteps from [high_noise_from, T) instead of [0, T).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from unhype.toy import model as toy_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    texts, cap_s, cap_c = caption_table()
    table = encode_table(tokenizer, text_encoder, texts)
    empty = encode_table(tokenizer, text_encoder, [""])[0]
    sampler = CaptionSampler(cap_s, cap_c)
    noise_sched = DDPMScheduler(**toy_model.scheduler_config())
    n_timesteps = noise_sched.config.num_train_timesteps
    if unet is None:
        unet = UNet2DConditionModel(**toy_model.toy_unet_config())
    opt = EmaOptimiser(unet, lr, steps, lr_floor=0.1, ema_decay=ema_decay)
    for step in range(steps):
        images, s_idx, c_idx = data.render_batch(batch, rng)
        x0 = toy_model.encode_images(torch.from_numpy(images))
        rows = [sampler(s, c, rng) for s, c in zip(s_idx, c_idx)]
        context = table[rows]
        drop = torch.from_numpy(rng.random(batch) < dropout)
        context = torch.where(drop[:, None, None], empty, context)
        noise = torch.randn_like(x0)
        t = torch.randint(0, n_timesteps, (batch,))
        if high_noise_from:  # shapes are decided at high noise: draw more of those timesteps
            high = torch.randint(high_noise_from, n_timesteps, (batch,))
            t = torch.where(torch.rand(batch) < 0.5, high, t)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, x0)
        opt.step(step, loss)
        if progress is not None:
            progress(step, loss.item(), opt.ema)
    return opt.ema
