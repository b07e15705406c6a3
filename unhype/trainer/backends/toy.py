"""The embedded toy world (`unhype.toy`): tiny CLIP text tower + tiny x0-predicting UNet.

The UNet works on the toy's fixed linear latent (16x16 RGB pixel-unshuffled to 12x8x8).

The UNet predicts x0 (`prediction_type="sample"`), so the ESD target is built on x0 predictions:
x0_n = x0_a - eta (x0_p - x0_a), linear like the epsilon form. Sampling follows the toy's own
contract (DDIM, guided x0 clipped to [-1, 1], eps re-derived from it). The retain set is the toy
vocabulary minus the erased shapes and their synonyms.
"""

from __future__ import annotations

import torch

from unhype.trainer.backends.base import Backend, Cond
from unhype.families import get_family


class ToyBackend(Backend):
    description = "toy model"

    def __init__(self, device="cpu", weights=None):
        from diffusers import DDIMScheduler
        from unhype.toy import model as toy_model

        self.toy = toy_model.load_toy(device=device, weights=weights)
        self.weights = weights or toy_model.weights_dir()
        self.family = get_family("toy")
        self.device, self.dtype = torch.device(device), torch.float32
        self.unet = self.toy.unet
        self.scheduler = DDIMScheduler.from_config(self.toy.scheduler.config)
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.default_guidance = toy_model.DEFAULT_GUIDANCE
        self.default_steps = toy_model.DEFAULT_STEPS
        self.freeze()

    def modules(self):
        return [self.unet, self.toy.text_encoder]

    def encode(self, prompts):
        return Cond(self.toy.encode_prompts(list(prompts))[0].float())

    def embed(self, prompts):
        return self.toy.encode_prompts(list(prompts))[1].float()

    def decode(self, latents):
        return self.toy.decode_latents(latents.float()).cpu()

    def default_synonyms(self, target):
        from unhype.toy import data

        return list(data.SYNONYMS.get(target.strip().lower(), [])[1:])

    def default_retain_prompts(self, concepts):
        return retain_prompts([c.target for c in concepts] +
                              [s for c in concepts for s in c.synonyms])


def retain_prompts(erased_words: list[str]) -> list[str]:
    """Every toy caption (all templates, all words) that names none of the erased shapes."""
    from unhype.toy import data

    erased = {w.lower() for w in erased_words}
    erased_shapes = {s for s, words in data.SYNONYMS.items() if erased & {w.lower() for w in words}}
    prompts = []
    for shape, words in data.SYNONYMS.items():
        if shape in erased_shapes:
            continue
        for word in words:
            for tpl in data.SHAPE_TEMPLATES:
                prompts.append(data.fill(tpl, word))
            for cwords in data.COLOUR_SYNONYMS.values():
                for cword in cwords:
                    for tpl in data.FULL_TEMPLATES:
                        prompts.append(data.fill(tpl, word, cword))
    for colour, cwords in data.COLOUR_SYNONYMS.items():
        for cword in cwords:
            for tpl in data.COLOUR_TEMPLATES:
                prompts.append(data.fill(tpl, None, cword))
    return list(dict.fromkeys(prompts))
