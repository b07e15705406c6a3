"""Is a loaded UNet the family a hypernetwork file was trained for?

Read from the model itself (the cross-attention context width of its ``attn2.to_k`` layers and
whether it takes a pooled ``vector``), so every host answers the same way without relying on
host flags: 768 -> sd1, 1024 -> sd2, 2048 -> sdxl; a BFL-layout transformer (``double_blocks``
with a fused ``img_attn.qkv``) that reads CLIP-L's pooled vector (``vector_in``) is flux. Other
widths (SDXL refiner 1280, ...) and transformers sharing FLUX's blocks (Chroma, FLUX.2,
HunyuanVideo) are "unknown" and refused; `checkpoint_architecture` names them for messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unhype.errors import UnHypeError

CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
REFINER_CONTEXT = 1280  # the SDXL refiner reads OpenCLIP-G alone


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


@dataclass(frozen=True)
class Header:
    """A .safetensors file's tensor names and shapes, read once per check (no weight)."""
    keys: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]


UNREAD = object()  # no header passed: the function reads the file's


def header_of(f) -> Header:
    """The `Header` of a file open with safetensors' ``safe_open``."""
    keys = tuple(f.keys())
    return Header(keys, {k: tuple(f.get_slice(k).get_shape()) for k in keys})


def checkpoint_header(path) -> Header | None:
    """The `Header` of a .safetensors file, or None when it is not one or cannot be read
    (other formats are never opened: a .ckpt is a pickle)."""
    if not str(path).lower().endswith(".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return header_of(f)
    except Exception:  # unreadable header: the check at load time still applies
        return None


def _header(path, header) -> Header | None:
    return checkpoint_header(path) if header is UNREAD else header


# transformers with FLUX.1's double/single blocks (or close) that UnHype does not support, by
# a key only they have (bare, BFL or diffusers names); ComfyUI model_detection tells them
# apart by the same keys
RELATIVES = (("FLUX.2", ("double_stream_modulation_img.",)),
             ("Chroma", ("distilled_guidance_layer.",)),
             ("HunyuanVideo", ("txt_in.individual_token_refiner.", "txt_in.input_embedder.",
                               "context_embedder.token_refiner.", "double_blocks.0.img_attn_qkv.")),
             ("SD3", ("joint_blocks.",)))
FLUX_BFL = {"double_blocks.0.img_attn.qkv.weight", "vector_in.in_layer.weight"}
FLUX_DIFFUSERS = {"x_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                  "single_transformer_blocks.0.proj_out.weight"}
FLUX_LIKE = "transformer with FLUX-style blocks but no FLUX.1 pooled CLIP-L input (vector_in)"


def transformer_architecture(keys) -> str | None:
    """'flux' when tensor names `keys` are a FLUX.1 transformer's (BFL layout, bare or under
    ``model.diffusion_model.``, or diffusers layout); the name of a transformer UnHype does not
    support (FLUX.2, Chroma, HunyuanVideo, SD3, `FLUX_LIKE`); None for anything else (UNets)."""
    names = {k.removeprefix("model.diffusion_model.") for k in keys}
    for name, marks in RELATIVES:
        if any(n.startswith(marks) for n in names):
            return name
    if FLUX_BFL <= names or FLUX_DIFFUSERS <= names:
        return "flux"
    if any(n.startswith(("double_blocks.", "single_transformer_blocks.")) for n in names):
        return FLUX_LIKE
    return None


def checkpoint_architecture(path, header=UNREAD) -> str | None:
    """`transformer_architecture` of a single-file checkpoint, from its header (`header`: the
    one already read, None for a file that is not a readable .safetensors)."""
    header = _header(path, header)
    return transformer_architecture(header.keys) if header else None


def checkpoint_family(path, header=UNREAD) -> str | None:
    """The family of a single-file checkpoint (A1111 / Forge / ComfyUI layout), from its
    safetensors header alone: no weight is read. 'unknown' for a denoiser UnHype does not
    support (SDXL refiner, Chroma, FLUX.2, ...); None when the file is not a readable
    .safetensors or holds no denoiser key this recognises (other formats are never opened:
    a .ckpt is a pickle)."""
    header = _header(path, header)
    if not header or not header.keys:
        return None
    architecture = transformer_architecture(header.keys)
    if architecture is not None:
        return "flux" if architecture == "flux" else "unknown"
    width = checkpoint_context_width(path, header)
    return None if width is None else CONTEXT_FAMILY.get(width, "unknown")


def checkpoint_context_width(path, header=UNREAD) -> int | None:
    """The cross-attention context width of a single-file checkpoint's UNet (its first
    ``attn2.to_k``), from its header; None when it has none."""
    header = _header(path, header)
    for key in header.keys if header else ():
        if "diffusion_model." in key and key.endswith("attn2.to_k.weight"):
            shape = header.shapes[key]
            return int(shape[1]) if len(shape) == 2 else None
    return None


REFINER, TRANSFORMER = "refiner", "transformer"
REFINER_TEXT = "an SDXL refiner UNet (OpenCLIP-G only, 1280-d context)"


@dataclass(frozen=True)
class Unsupported:
    """A model UnHype knows and does not support: `kind` (REFINER: the SDXL refiner UNet;
    TRANSFORMER: one sharing FLUX.1's blocks, or SD3) for callers to test, `text` ('an SDXL
    refiner UNet', 'a Chroma transformer', ...) for messages only."""
    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


def unsupported_checkpoint(path, header=UNREAD) -> Unsupported | None:
    """What a single-file checkpoint is, when it is a model UnHype knows and does not support;
    else None. One header read (none when `header` is given)."""
    header = _header(path, header)
    architecture = checkpoint_architecture(path, header)
    if architecture == FLUX_LIKE:
        return Unsupported(TRANSFORMER, f"a {FLUX_LIKE}")
    if architecture not in (None, "flux"):
        return Unsupported(TRANSFORMER, f"{article(architecture)} {architecture} transformer")
    if architecture is None and checkpoint_context_width(path, header) == REFINER_CONTEXT:
        return Unsupported(REFINER, REFINER_TEXT)
    return None


def article(name: str) -> str:
    """'a' or 'an' before a family or model name as it is read out ('an sdxl', 'an SD3',
    'a flux', 'a Chroma')."""
    return "an" if name[:1].lower() in "aeiou" or name.lower().startswith("sd") else "a"


def checkpoint_input_channels(path, header=UNREAD) -> int | None:
    """The UNet's input channels in a single-file checkpoint, from its header (4: text-to-image;
    9: inpainting; 8: instruct-pix2pix); None when the file or the key is not there."""
    header = _header(path, header)
    shape = header.shapes.get("model.diffusion_model.input_blocks.0.0.weight") if header else None
    return int(shape[1]) if shape and len(shape) > 1 else None


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
