"""The toy flow model (`unhype.toy.flow`) as a trainer backend: FLUX code path, toy world.

Everything FLUX-specific (packing, FlowMatch Euler sampling, velocity ESD target) comes from
`FluxBackend`; this class only supplies the toy text encoder (last hidden state for the
transformer, pooled vector for both `pooled_projections` and the hypernetwork), the toy latent
(12x8x8, 16 packed tokens) and the toy vocabulary for synonyms and retained prompts. The toy
flow model has no guidance embedding, so sampling uses CFG and the LoRA goes on cond rows only.
"""

from __future__ import annotations

import torch

from unhype.trainer.backends.flux import FluxBackend
from unhype.trainer.backends.toy import ToyBackend


class ToyFluxBackend(FluxBackend):
    description = "toy flow model"

    def __init__(self, device="cpu", weights=None, guidance: float | None = None):
        from unhype.toy import flow
        from unhype.toy import model as toy_model

        self.toy = flow.load_toy_flow(device=device, weights=weights)
        self.weights = weights or toy_model.weights_dir()  # the judge lives here
        _, h, w = self.toy.latent_shape
        super().__init__(self.toy.transformer, self.toy.scheduler, "toy_flux", device,
                         torch.float32, (h, w), guidance)
        self.default_guidance = flow.DEFAULT_GUIDANCE
        self.default_steps = flow.DEFAULT_STEPS
        self.freeze()

    def modules(self):
        return [self.transformer, self.toy.text_encoder]

    def _text(self, prompts):
        return self.toy.encode_prompts(prompts)

    # the same toy text encoder, decoder and vocabulary as the SD toy: one implementation
    embed = ToyBackend.embed
    decode = ToyBackend.decode
    default_synonyms = ToyBackend.default_synonyms
    default_retain_prompts = ToyBackend.default_retain_prompts
