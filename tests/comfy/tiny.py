"""Tiny SD1-structured ComfyUI objects built from configs: MODEL, CLIP, VAE, and a hypernetwork.

The UNet keeps SD1's block layout (layers_per_block 2, attention in the first three levels,
context_dim 768) with 32/64 channels, so UnHype's sd1 naming and ComfyUI's key map apply
unchanged; the CLIP has SD1's width (768, so pooled_output fits sd1 files) and one layer; the VAE
is ComfyUI's TAESD. All weights random.
"""

from __future__ import annotations

import json
import os

import torch

TINY_UNET = {  # ComfyUI unet_config (what comfy.model_detection would produce)
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "context_dim": 768, "use_linear_in_transformer": False, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

TINY_DIFFUSERS_UNET = {  # the same structure in diffusers (for Family.targets)
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [32, 32, 64, 64], "attention_head_dim": 8, "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}

TINY_CLIP = {
    "_name_or_path": "tiny", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 1,
    "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32", "vocab_size": 49408,
}


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.device.type == "meta":
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def tiny_model(seed: int = 0, unet_config: dict | None = None, weight_dtype=None):
    """A ComfyUI MODEL (ModelPatcher) with SD15's model config class. `weight_dtype` (e.g.
    float8_e4m3fn): weights stored in it and cast to fp32 per layer at run time, as ComfyUI
    loads a UNet with a weight dtype (UNETLoader's fp8 options, --fp8_e4m3fn-unet)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(unet_config or TINY_UNET))
    if weight_dtype is not None:
        config.set_inference_dtype(weight_dtype, torch.float32)
    base = config.get_model({})
    _randomize(base.diffusion_model, seed)
    base.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device,
                                            offload_device=torch.device("cpu"))


def tiny_clip(tmp_dir, seed: int = 1):
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget

    path = os.path.join(str(tmp_dir), "tiny_clip.json")
    with open(path, "w") as fh:
        json.dump(TINY_CLIP, fh)
    target = ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": path}
    with torch.no_grad():  # ComfyUI builds models under inference mode; old CLIPs need it
        clip = comfy.sd.CLIP(target=target)
    _randomize(clip.cond_stage_model, seed, std=0.02)
    return clip


TINY_T5 = {"d_ff": 64, "d_kv": 8, "d_model": 32, "decoder_start_token_id": 0,
           "dropout_rate": 0.0, "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh",
           "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
           "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 1,
           "num_heads": 4, "num_layers": 1, "pad_token_id": 0,
           "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
           "vocab_size": 32128}


def tiny_flux_clip(tmp_dir, seed: int = 1):
    """ComfyUI's FLUX text encoder (comfy.text_encoders.flux: FluxTokenizer, FluxClipModel's
    clip_l + t5xxl) with the tiny CLIP-L above and a one-layer T5 in place of T5-XXL (the one
    thing changed: the configs), as DualCLIPLoader type flux gives it. Needs a current ComfyUI."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.t5
    from comfy.supported_models_base import ClipTarget

    path = os.path.join(str(tmp_dir), "tiny_clip.json")
    with open(path, "w") as fh:
        json.dump(TINY_CLIP, fh)

    class TinyFluxClipModel(flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=path,
                return_projected_pooled=False, model_options=model_options)
            self.t5xxl = comfy.sd1_clip.SDClipModel(  # as sd3_clip.T5XXLModel, tiny config
                device=device, dtype=dtype, textmodel_json_config=dict(TINY_T5),
                special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                model_options={**model_options, "model_name": "t5xxl"})
            self.dtypes = {dtype}

    with torch.no_grad():
        clip = comfy.sd.CLIP(target=ClipTarget(flux.FluxTokenizer, TinyFluxClipModel))
    _randomize(clip.cond_stage_model, seed, std=0.02)
    return clip


def tiny_vae(seed: int = 2):
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    _randomize(taesd, seed)
    return comfy.sd.VAE(sd=taesd.state_dict())


def tiny_diffusers_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**TINY_DIFFUSERS_UNET)


def tiny_hypernet(family: str = "sd1", rank: int = 2, seed: int = 0, perturb: float = 0.05):
    """A hypernetwork on the tiny UNet's attn2.to_k/to_v with non-zero B heads."""
    from tests.helpers import hypernet_for

    return hypernet_for(tiny_diffusers_unet(), family=family, rank=rank, seed=seed,
                        perturb=perturb, embed_dim=768)


def save_tiny_hypernet(path, family: str = "sd1", **kw):
    from unhype.fileformat import save_hypernet

    net = tiny_hypernet(family, **kw)
    return save_hypernet(path, net, family, concepts=[
        {"target": "a photo of a cat", "anchor": "a photo", "synonyms": ["kitten"]}],
        training={"note": "random test network"})
