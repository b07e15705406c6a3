"""Layer names across ecosystems: kohya <-> diffusers <-> LDM (ComfyUI/A1111) <-> BFL (FLUX).

One rule per family for the canonical (kohya) name, used as the key in every UnHype file:

* sd1, sd2, toy: ``lora_unet_`` + diffusers path with dots as underscores (kohya's SD1/2 rule)
* sdxl: ``lora_unet_`` + LDM (SAI) path with dots as underscores (kohya's SDXL rule)
* flux: ``lora_transformer_`` + diffusers path with dots as underscores (the diffusers-FLUX
  kohya form that ComfyUI's key map and diffusers' FLUX LoRA loader both accept)

UNet attention blocks map to LDM by block index; everything below ``attentions.j`` keeps its
name. FLUX's q/k/v projections are row slices of BFL's fused ``qkv`` / ``linear1`` layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unhype.errors import UnHypeError

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_FLUX_PREFIX = "lora_transformer_"


@dataclass(frozen=True)
class HostPath:
    """A module path in a host's naming, optionally a row slice of a fused layer's output."""

    path: str
    out_slice: tuple[int, int] | None = None  # [start, stop) of output features


def kohya_name(family, diffusers_path: str) -> str:
    if family.name == "sdxl":
        return KOHYA_UNET_PREFIX + ldm_path(family, diffusers_path).replace(".", "_")
    if family.name == "flux":
        return KOHYA_FLUX_PREFIX + diffusers_path.replace(".", "_")
    return KOHYA_UNET_PREFIX + diffusers_path.replace(".", "_")


_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")


def ldm_path(family, diffusers_path: str) -> str:
    """LDM/SGM module path (under ``diffusion_model.``) of a UNet attention-block layer."""
    if family.name == "flux":
        raise UnHypeError("FLUX has no LDM UNet path; use bfl_path()")
    per_level = family.config()["layers_per_block"] + 1
    if m := _DOWN.match(diffusers_path):
        block, attn, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{block * per_level + attn + 1}.1.{rest}"
    if m := _MID.match(diffusers_path):
        return f"middle_block.1.{m[1]}"
    if m := _UP.match(diffusers_path):
        block, attn, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{block * per_level + attn}.1.{rest}"
    raise UnHypeError(f"{diffusers_path!r} is not inside a UNet attention block; "
                      "UnHype maps attention-block layers only")


def flux_inner_dim(family) -> int:
    cfg = family.config()
    return cfg["num_attention_heads"] * cfg["attention_head_dim"]


_FLUX_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_FLUX_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}
_ADD_QKV = {"add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}


def bfl_path(family, diffusers_path: str, inner_dim: int | None = None) -> HostPath:
    """BFL/ComfyUI FLUX path (under ``diffusion_model.``), with the row slice of fused layers.

    ``inner_dim`` (heads * head dim) defaults to the reference architecture's; pass the q/k/v
    target's out_dim for another size (a test-sized FLUX)."""
    h = inner_dim or flux_inner_dim(family)
    if m := _FLUX_DOUBLE.match(diffusers_path):
        n, rest = m[1], m[2]
        if rest.startswith("attn."):
            op = rest[len("attn."):]
            if op in _QKV:
                i = _QKV[op]
                return HostPath(f"double_blocks.{n}.img_attn.qkv", (i * h, (i + 1) * h))
            if op in _ADD_QKV:
                i = _ADD_QKV[op]
                return HostPath(f"double_blocks.{n}.txt_attn.qkv", (i * h, (i + 1) * h))
            if op == "to_out.0":
                return HostPath(f"double_blocks.{n}.img_attn.proj")
            if op == "to_add_out":
                return HostPath(f"double_blocks.{n}.txt_attn.proj")
    if m := _FLUX_SINGLE.match(diffusers_path):
        n, rest = m[1], m[2]
        if rest.startswith("attn.") and rest[len("attn."):] in _QKV:
            i = _QKV[rest[len("attn."):]]
            return HostPath(f"single_blocks.{n}.linear1", (i * h, (i + 1) * h))
    raise UnHypeError(f"no BFL mapping for FLUX layer {diffusers_path!r}")


def host_path(family, diffusers_path: str, host: str, out_dim: int | None = None) -> HostPath:
    """Module path of a target in a host's model: 'diffusers', 'ldm' (ComfyUI/A1111 UNet).

    ``out_dim``: the target's output width; for FLUX q/k/v it sizes the fused-layer slice."""
    if host == "diffusers":
        return HostPath(diffusers_path)
    if host == "ldm":
        if family.name == "flux":
            op = diffusers_path.rsplit(".", 1)[-1]
            sliced = op in _QKV or op in _ADD_QKV
            return bfl_path(family, diffusers_path, out_dim if sliced else None)
        return HostPath(ldm_path(family, diffusers_path))
    raise UnHypeError(f"unknown host naming {host!r}")
