"""Is a loaded UNet the family a hypernetwork file was trained for?

Read from the model itself (the cross-attention context width of its ``attn2.to_k`` layers and
whether it takes a pooled ``vector``), so every host answers the same way without relying on
host flags: 768 -> sd1, 1024 -> sd2, 2048 -> sdxl; a BFL-layout transformer (``double_blocks``
with a fused ``img_attn.qkv``) is flux. Other widths (SDXL refiner 1280, SD3, ...) are "unknown"
and refused.
"""

from __future__ import annotations

import torch
from torch import nn

from unhype.errors import UnHypeError

CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """A layer weight's logical [out, in] shape. bitsandbytes 4-bit weights (Forge's NF4 / FP4
    models) are stored packed as [out * in / 2, 1] uint8 and keep the shape in ``quant_state``;
    Forge's GGUF parameters already report their real shape."""
    quant_state = getattr(weight, "quant_state", None)
    if getattr(quant_state, "shape", None) is not None:
        return torch.Size(quant_state.shape)
    return weight.shape


def context_dim(unet: nn.Module) -> int | None:
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k"):
            weight = getattr(module, "weight", None)
            shape = weight_shape(weight) if weight is not None else ()
            if len(shape) == 2:
                return int(shape[1])
    return None


def is_flux(model: nn.Module) -> bool:
    """A BFL-layout FLUX transformer (ComfyUI comfy.ldm.flux, Forge backend/nn/flux.py) that
    reads CLIP-L's pooled vector (``vector_in``): Chroma has the same blocks but no pooled
    input (ComfyUI comfy.ldm.chroma, Forge backend/nn/chroma.py), so there is nothing for
    the hypernetwork to read."""
    blocks = getattr(model, "double_blocks", None)
    return blocks is not None and hasattr(model, "single_blocks") and len(blocks) > 0 and \
        hasattr(getattr(blocks[0], "img_attn", None), "qkv") and hasattr(model, "vector_in")


def checkpoint_family(path) -> str | None:
    """The family of a single-file checkpoint (A1111 / Forge / ComfyUI layout), from its
    safetensors header alone: no weight is read. None when the file is not a readable
    .safetensors or holds no denoiser key this recognises (other formats are never opened:
    a .ckpt is a pickle)."""
    if not str(path).lower().endswith(".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if "double_blocks.0.img_attn.qkv" in key:
                    return "flux"
                if "diffusion_model." in key and key.endswith("attn2.to_k.weight"):
                    shape = f.get_slice(key).get_shape()
                    return CONTEXT_FAMILY.get(int(shape[1]), "unknown") if len(shape) == 2 \
                        else None
    except Exception:  # unreadable header: the check at load time still applies
        return None
    return None


def checkpoint_input_channels(path) -> int | None:
    """The UNet's input channels in a single-file checkpoint, from its header (4: text-to-image;
    9: inpainting; 8: instruct-pix2pix); None when the file or the key is not there."""
    from safetensors import safe_open

    key = "model.diffusion_model.input_blocks.0.0.weight"
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice(key).get_shape()[1]) if key in f.keys() else None
    except Exception:
        return None


def detect_family(unet: nn.Module) -> str:
    """'sd1', 'sd2', 'sdxl', 'flux' or 'unknown' for a host's denoiser (A1111/Forge/ComfyUI)."""
    if is_flux(unet):
        return "flux"
    return CONTEXT_FAMILY.get(context_dim(unet), "unknown")


def family_problem(file_family: str, model_family: str, file_name: str = "") -> str | None:
    """A message for the UI when the file does not fit the model, else None."""
    if file_family == model_family:
        return None
    what = f"{file_name} " if file_name else ""
    if model_family == "unknown":
        return (f"UnHype: hypernetwork {what}is for {file_family}, but the loaded model is not "
                "a Stable Diffusion 1.x/2.x/XL UNet or FLUX transformer UnHype recognises; not "
                "applied")
    return (f"UnHype: hypernetwork {what}is for {file_family}, but the loaded model is "
            f"{model_family}; load a {file_family} checkpoint or pick a {model_family} "
            "hypernetwork")


def check_family(file_family: str, unet: nn.Module, file_name: str = "") -> None:
    problem = family_problem(file_family, detect_family(unet), file_name)
    if problem:
        raise UnHypeError(problem)
