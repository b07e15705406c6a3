"""Bake the LoRA a hypernetwork generates for one prompt into a standard kohya LoRA file.

kohya layout per target: ``{name}.lora_down.weight`` [r, in] = A^T, ``{name}.lora_up.weight``
[out, r] = strength * B, ``{name}.alpha`` = r (so kohya's alpha / rank scale is 1), plus the
``ss_*``/``sshs_*`` training metadata and ``modelspec.*`` keys that loaders and UIs read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json

import torch
from safetensors.torch import save

from unhype import __version__
from unhype.dynamic_lora import check_strength
from unhype.fileformat import LoadedHypernet, atomic_save_safetensors


def lora_state_dict(factors, strength: float = 1.0, index: int = 0) -> dict[str, torch.Tensor]:
    """kohya tensors for prompt `index` of generated factors."""
    strength = check_strength(strength)
    state = {}
    for name, (a, b) in factors.items():
        rank = a.shape[-1]
        state[f"{name}.lora_down.weight"] = a[index].T.contiguous().float()
        state[f"{name}.lora_up.weight"] = (b[index] * strength).contiguous().float()
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    return state


def kohya_hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    """sshs_model_hash / sshs_legacy_hash as kohya's train_util computes them (over ss_* only)."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    buf = io.BytesIO(data)
    header_len = int.from_bytes(buf.read(8), "little")
    buf.seek(8 + header_len)
    model_hash = hashlib.sha256(buf.read()).hexdigest()
    buf.seek(0x100000)
    legacy_hash = hashlib.sha256(buf.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def lora_metadata(loaded: LoadedHypernet, prompt: str, strength: float, title: str) -> dict:
    family = loaded.family
    cfg = loaded.meta.config
    now = _dt.datetime.now(_dt.timezone.utc)
    erased = [c.get("target", "") for c in loaded.meta.concepts]
    return {
        "ss_base_model_version": family.base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(float(cfg.rank)),
        "ss_network_args": json.dumps({"unhype_prompt": prompt, "unhype_strength": strength}),
        "ss_output_name": title,
        "ss_training_comment": f"baked by UnHype {__version__} from {loaded.path.name} for "
                               f"prompt {prompt!r} at strength {strength}; erases {erased}",
        "ss_v2": str(family.name == "sd2"),
        "ss_sd_model_name": loaded.meta.training.get("pretrained_model_name_or_path", ""),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family.name != "flux" else "https://github.com/black-forest-labs/flux",
        "modelspec.title": title,
        "modelspec.description": f"UnHype concept-erasure LoRA for {prompt!r} (erases {erased})",
        "modelspec.date": now.date().isoformat(),
        "modelspec.resolution": "1024x1024" if family.name in ("sdxl", "flux") else "512x512",
    }


def bake_lora(loaded: LoadedHypernet, embedding: torch.Tensor, prompt: str,
              strength: float = 1.0, title: str | None = None) -> tuple[dict, dict]:
    """(kohya tensors, metadata) of the LoRA the hypernetwork generates for one embedding."""
    with torch.no_grad():
        factors = loaded.hypernet(embedding.reshape(1, -1))
    tensors = lora_state_dict(factors, strength)
    metadata = lora_metadata(loaded, prompt, strength, title or f"unhype_{loaded.path.stem}")
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(tensors, metadata)
    return tensors, metadata


def save_lora(path, tensors: dict, metadata: dict) -> None:
    atomic_save_safetensors(tensors, path, metadata)
