"""Model families UnHype knows: architecture, target-layer presets, embedding source.

Each family carries the full-size diffusers config of its reference architecture. Target layers
are never listed by hand: `Family.targets()` instantiates the architecture on the `meta` device
(exact names and shapes, no memory) or walks a model the caller passes, and keeps every
`nn.Linear` whose diffusers path ends with one of the preset's module types.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from unhype.errors import UnHypeError
from unhype.presets import FLUX_DEFAULT, FLUX_PRESETS, SD_DEFAULT, SD_PRESETS
from unhype.toy.model import TOY_TEXT_DIM  # cheap: constants only until a function runs

APPLY_COND_ONLY = "cond_only"  # SD-style CFG: the unconditional branch runs the base weights
APPLY_ALL = "all"  # guidance-distilled single pass (FLUX)


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which text vector the hypernetwork reads, so every host can produce the same one."""

    source: str
    dim: int
    description: str


@dataclass(frozen=True)
class Target:
    """One layer the hypernetwork writes a LoRA for."""

    name: str  # canonical kohya name, the key used in files
    path: str  # diffusers module path
    module_type: str  # the preset suffix it matched, e.g. "attn2.to_k"
    in_dim: int
    out_dim: int

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "module_type": self.module_type,
                "in_dim": self.in_dim, "out_dim": self.out_dim}


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_class: str  # diffusers class of the denoiser
    config: Callable[[], dict] = field(repr=False)
    embedding: EmbeddingSpec
    presets: Mapping[str, tuple[str, ...]]
    default_preset: str
    apply_to: str
    base_model_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str

    def preset(self, preset: str | None) -> tuple[str, ...]:
        preset = preset or self.default_preset
        if preset not in self.presets:
            raise UnHypeError(
                f"family {self.name!r} has no target preset {preset!r}; "
                f"choose one of {sorted(self.presets)}")
        return self.presets[preset]

    def build_meta_model(self) -> nn.Module:
        """The full-size reference architecture on the meta device (no weights, no memory)."""
        return _meta_model(self.name)

    def targets(self, preset: str | None = None, model: nn.Module | None = None) -> list[Target]:
        """Target layers of `preset` in `model` (default: the reference architecture)."""
        from unhype import naming

        suffixes = self.preset(preset)
        root = model if model is not None else self.build_meta_model()
        found = []
        for path, module in root.named_modules():
            for suffix in suffixes:
                if path == suffix or path.endswith("." + suffix):
                    if not isinstance(module, nn.Linear):
                        raise UnHypeError(f"{self.name}: target {path} is a "
                                          f"{type(module).__name__}, not a Linear layer")
                    found.append(Target(
                        name=naming.kohya_name(self, path), path=path, module_type=suffix,
                        in_dim=module.in_features, out_dim=module.out_features))
                    break
        if not found:
            raise UnHypeError(f"{self.name}: preset {preset or self.default_preset!r} matches "
                              "no Linear layer in this model; is it the right family?")
        return found


@functools.lru_cache(maxsize=None)
def _meta_model(name: str) -> nn.Module:
    import diffusers
    import torch

    family = get_family(name)
    cls = getattr(diffusers, family.model_class)
    with torch.device("meta"):
        return cls.from_config(family.config())


def sd15_unet_config() -> dict:
    return {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }


def sd21_unet_config() -> dict:
    return {**sd15_unet_config(), "sample_size": 96, "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024, "use_linear_projection": True}


def sdxl_unet_config() -> dict:
    return {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    }


def flux_dev_transformer_config() -> dict:
    return {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
    }


def _toy_config() -> dict:
    from unhype.toy import model as toy_model

    return toy_model.toy_unet_config()


CLIP_L = EmbeddingSpec("clip_l_pooled", 768,
                       "CLIP ViT-L/14 text model, EOS token after the final layer norm, "
                       "unprojected (SD1 conditioning / ComfyUI pooled_output)")

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


register_family(Family(
    name="sd1", description="Stable Diffusion 1.x (SD1.4, SD1.5 and finetunes)",
    model_class="UNet2DConditionModel", config=sd15_unet_config, embedding=CLIP_L,
    presets=SD_PRESETS, default_preset=SD_DEFAULT, apply_to=APPLY_COND_ONLY,
    base_model_version="sd_v1", modelspec_architecture="stable-diffusion-v1/lora"))
register_family(Family(
    name="sd2", description="Stable Diffusion 2.x (512 and 768-v)",
    model_class="UNet2DConditionModel", config=sd21_unet_config,
    embedding=EmbeddingSpec("openclip_h_pooled", 1024,
                            "OpenCLIP ViT-H/14 text model as SD2 ships it, EOS token after "
                            "the final layer norm, unprojected"),
    presets=SD_PRESETS, default_preset=SD_DEFAULT, apply_to=APPLY_COND_ONLY,
    base_model_version="sd_v2", modelspec_architecture="stable-diffusion-v2-768-v/lora"))
register_family(Family(
    name="sdxl", description="Stable Diffusion XL 1.0 base and finetunes",
    model_class="UNet2DConditionModel", config=sdxl_unet_config,
    embedding=EmbeddingSpec("clip_g_pooled_projected", 1280,
                            "OpenCLIP ViT-bigG/14 text model with its text projection "
                            "(SDXL's pooled 'vector' input / ComfyUI pooled_output)"),
    presets=SD_PRESETS, default_preset=SD_DEFAULT, apply_to=APPLY_COND_ONLY,
    base_model_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base/lora"))
register_family(Family(
    name="flux", description="FLUX.1 dev/schnell (rectified flow, guidance-distilled)",
    model_class="FluxTransformer2DModel", config=flux_dev_transformer_config, embedding=CLIP_L,
    presets=FLUX_PRESETS, default_preset=FLUX_DEFAULT, apply_to=APPLY_ALL,
    base_model_version="flux1", modelspec_architecture="Flux.1-dev/lora"))
register_family(Family(
    name="toy", description="UnHype's embedded toy text-to-image model (unhype/toy)",
    model_class="UNet2DConditionModel", config=_toy_config,
    embedding=EmbeddingSpec("toy_clip_pooled", TOY_TEXT_DIM, "the toy CLIP text model, EOS "
                            "token after the final layer norm (unhype.toy.model)"),
    presets=SD_PRESETS, default_preset=SD_DEFAULT, apply_to=APPLY_COND_ONLY,
    base_model_version="unhype_toy", modelspec_architecture="unhype-toy/lora"))


register_family(Family(
    name="toy_flux", description="UnHype's embedded toy flow model (unhype/toy/flow.py, a tiny "
    "FluxTransformer2DModel with CFG)",
    model_class="FluxTransformer2DModel", config=lambda: _toy_flow_config(),
    embedding=FAMILIES["toy"].embedding, presets=FLUX_PRESETS, default_preset=FLUX_DEFAULT,
    apply_to=APPLY_COND_ONLY, base_model_version="unhype_toy_flux",
    modelspec_architecture="unhype-toy-flux/lora"))


def _toy_flow_config() -> dict:
    from unhype.toy import flow

    return flow.toy_flow_config()


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnHypeError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None
