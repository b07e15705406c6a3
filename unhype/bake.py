"""Bake the LoRA a hypernetwork generates for one prompt into a standard kohya LoRA file.

kohya layout per target: ``{name}.lora_down.weight`` [r, in] = A^T, ``{name}.lora_up.weight``
[out, r] = strength * B, ``{name}.alpha`` = r (so kohya's alpha / rank scale is 1), plus the
``ss_*``/``sshs_*`` training metadata and ``modelspec.*`` keys that loaders and UIs read.

Formats: ``kohya`` (the canonical names; for FLUX the diffusers-path ``lora_transformer_*`` form
that ComfyUI's key map and diffusers' loader read) and, for FLUX only, ``kohya_bfl``: kohya
sd-scripts' BFL names (``lora_unet_double_blocks_0_img_attn_qkv``) on the fused layers, each
q/k/v slice's ``lora_up`` zero-padded to the fused rows and the slices of one layer stacked
along the rank (for loaders that only know BFL names, e.g. Forge).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math

import torch
from safetensors.torch import save

from unhype import __version__
from unhype.dynamic_lora import check_strength
from unhype.errors import UnHypeError
from unhype.fileformat import LoadedHypernet, atomic_save_safetensors, host_paths

FORMATS = ("kohya", "kohya_bfl")
FLUX_MLP_RATIO = 4  # FLUX.1: single_blocks.N.linear1 rows = 3 h (q, k, v) + 4 h (MLP)


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


def fused_rows(path: str, inner: int) -> int:
    """Output rows of a BFL fused layer, from the width h of one of its q/k/v slices."""
    if path.endswith(".linear1"):
        return (3 + FLUX_MLP_RATIO) * inner
    return 3 * inner


def bfl_state_dict(loaded: LoadedHypernet, factors, strength: float = 1.0,
                   index: int = 0) -> dict[str, torch.Tensor]:
    """kohya sd-scripts FLUX tensors on BFL's fused layers (``lora_unet_`` + BFL path)."""
    if loaded.meta.family != "flux":
        raise UnHypeError(f"{loaded.path.name}: the kohya_bfl format is for FLUX files; this one "
                          f"is {loaded.meta.family}")
    strength = check_strength(strength)
    by_layer: dict[str, list] = {}
    for name, hp in host_paths(loaded.meta, "ldm").items():
        by_layer.setdefault(hp.path, []).append((hp.out_slice, factors[name]))
    state = {}
    for path, parts in by_layer.items():
        downs, ups, rank = [], [], 0
        for out_slice, (a, b) in parts:
            a, b = a[index].float(), b[index].float() * strength
            downs.append(a.T)
            ups.append((out_slice, b))
            rank += a.shape[-1]
        sliced = [s for s, _ in ups if s is not None]
        if sliced and len(sliced) != len(ups):
            raise UnHypeError(f"{loaded.path.name}: {path} has both sliced and whole targets")
        if sliced:
            inner = sliced[0][1] - sliced[0][0]
            up = torch.zeros(fused_rows(path, inner), rank)
            col = 0
            for (start, stop), b in ups:
                up[start:stop, col:col + b.shape[1]] = b
                col += b.shape[1]
        else:
            up = torch.cat([b for _, b in ups], dim=1) if len(ups) > 1 else ups[0][1]
        key = "lora_unet_" + path.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
        state[f"{key}.lora_up.weight"] = up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(rank))
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


def network_dim_alpha(tensors: dict | None, rank: int) -> tuple[str, str]:
    """ss_network_dim / ss_network_alpha: one rank (alpha = rank: scale 1), or sd-scripts'
    "Dynamic" when layers differ (kohya_bfl: a fused layer's rank is the sum of its slices')."""
    alphas = {float(v) for k, v in (tensors or {}).items() if k.endswith(".alpha")}
    if len(alphas) > 1:
        return "Dynamic", "Dynamic"
    r = int(alphas.pop()) if alphas else rank
    return str(r), str(float(r))


def _modelspec_architecture(loaded: LoadedHypernet) -> tuple[str, str]:
    """(modelspec.architecture, modelspec.resolution) as sd-scripts writes them: SD 2.x is
    768-v only for a v-prediction model (the file records what it was trained on)."""
    family = loaded.family
    if family.name == "sd2" and loaded.meta.training.get("prediction_type") == "epsilon":
        return "stable-diffusion-v2-512/lora", "512x512"
    if family.name == "sd2":
        return family.modelspec_architecture, "768x768"
    return family.modelspec_architecture, \
        "1024x1024" if family.name in ("sdxl", "flux") else "512x512"


def probe_embedding(loaded: LoadedHypernet, embedding: torch.Tensor, prompt: str,
                    embed=None):
    """unhype.probe of the very embedding(s) a bake uses (not re-encoded: a long prompt's
    readings [M, D] stay those readings), against the file's concept texts encoded with
    `embed` (list[str] -> [N, D]); without `embed` no concept is measured, only the share of
    the file's gate_reference."""
    from unhype.probe import concept_embeddings, concept_texts, probe_readings

    concepts = concept_texts(loaded.meta) if embed is not None else []
    own = embedding.reshape(-1, embedding.shape[-1]).float()
    return probe_readings(loaded, own, [0] * len(own), [prompt or ""],
                          concept_embeddings(loaded, embed, concepts, own), concepts)[0]


def prompt_claim(result) -> str:
    """What the baked LoRA does for its prompt, from its unhype.probe result: the concept(s) it
    fires, the nearest by direction and the update's share of the reference."""
    top, rel, threshold = result.nearest, result.relative, result.threshold
    if result.magnitude == 0:
        return "fires nothing, its update is zero"
    if result.fired:
        parts = [f"fires {', '.join(result.fired)}"]
    else:
        parts = ["fires nothing" if result.concepts else
                 "concepts not measured (no text encoder)"]
    if result.concepts:
        parts.append(f"nearest concept {top.concept} at cosine {top.cosine:.2f}" if top else
                     "no concept in its direction")
    if rel is not None:
        whose = f"{top.concept}'s" if top else "the"
        parts.append(f"{rel:.2f} of {whose} reference"
                     + (f", under the firing threshold {threshold:g}" if rel < threshold else ""))
    return "; ".join(parts)


def weak_note(result) -> str | None:
    """The warning for a LoRA whose prompt fires no concept (None: it fires one, or its update
    is exactly zero, NO_OP_NOTE's case)."""
    if result.magnitude == 0:
        return None
    rel = result.relative
    weak = not result.fired if result.concepts else rel is not None and rel < result.threshold
    if not weak:
        return None
    return (f"this LoRA is weak for this prompt ({prompt_claim(result)}): it erases little; "
            "bake a prompt that names the concept")


def lora_metadata(loaded: LoadedHypernet, prompt: str, strength: float, title: str,
                  tensors: dict | None = None, probed=None) -> dict:
    family = loaded.family
    cfg = loaded.meta.config
    now = _dt.datetime.now(_dt.timezone.utc)
    erased = [c.get("target", "") for c in loaded.meta.concepts]
    claim = f"for prompt {prompt!r}: {prompt_claim(probed)}; " if probed is not None else \
        f"for prompt {prompt!r}; "
    probe_args = {} if probed is None else {
        "unhype_fires": probed.fired, "unhype_share_of_reference": probed.relative,
        "unhype_nearest_concept": probed.nearest.concept if probed.nearest else None}
    dim, alpha = network_dim_alpha(tensors, cfg.rank)
    architecture, resolution = _modelspec_architecture(loaded)
    return {
        "ss_base_model_version": family.base_model_version,
        # sd-scripts' own FLUX LoRAs name networks.lora_flux
        "ss_network_module": "networks.lora_flux" if family.name == "flux" else "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps({"unhype_prompt": prompt, "unhype_strength": strength,
                                       **probe_args}),
        "ss_output_name": title,
        "ss_training_comment": f"baked by UnHype {__version__} from {loaded.path.name} at "
                               f"strength {strength} {claim}the hypernetwork file erases "
                               f"{erased}",
        "ss_v2": str(family.name == "sd2"),
        "ss_sd_model_name": loaded.meta.training.get("pretrained_model_name_or_path", ""),
        # the base model's hashes where the trainer had one file to hash (unhype.model_hash)
        **{key: str(loaded.meta.training[field]) for key, field in (
            ("ss_new_sd_model_hash", "base_model_sha256"),
            ("ss_sd_model_hash", "base_model_legacy_hash")) if field in loaded.meta.training},
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family.name != "flux" else "https://github.com/black-forest-labs/flux",
        "modelspec.title": title,
        "modelspec.description": f"UnHype concept-erasure LoRA {claim}the hypernetwork file "
                                 f"erases {erased}",
        "modelspec.date": now.date().isoformat(),
        "modelspec.resolution": resolution,
    }


NO_OP_NOTE = ("its update is zero: the prompt does not switch on an erased concept, or is "
              "under the file's gate floor; this LoRA changes nothing")


def update_norm(tensors: dict) -> float:
    """||dW|| of a baked LoRA, the root of the sum over layers of ||(alpha / r) up down||^2,
    in float64, by the hypernetwork's own measure (never forming up @ down)."""
    from unhype.hypernet import update_size_sq

    factors = {}
    for key, up in tensors.items():
        if not key.endswith(".lora_up.weight"):
            continue
        stem = key[:-len(".lora_up.weight")]
        down = tensors[stem + ".lora_down.weight"].double()
        scale = float(tensors[stem + ".alpha"]) / down.shape[0] if stem + ".alpha" in tensors \
            else 1.0
        factors[stem] = ((scale * down).T[None], up.double()[None])
    return math.sqrt(max(float(update_size_sq(factors)), 0.0)) if factors else 0.0


def bake_readings(loaded: LoadedHypernet, candidates: torch.Tensor) -> torch.Tensor:
    """Of a prompt's candidate embeddings [K, D] (the prompt's own, then its windows'), those
    [M, D] whose updates the hosts apply to it (unhype.prompt_windows.combined_rows): the strongest,
    and with a file that names its concepts, the strongest of each other concept a window
    switches on. A baked LoRA is their sum, the update the prompt gets when applied live."""
    candidates = candidates.reshape(-1, candidates.shape[-1]).float()
    if candidates.shape[0] == 1:
        return candidates
    with torch.no_grad():
        _, [picks] = loaded.pick_readings(candidates, [0] * len(candidates), 1)
    return candidates[picks]  # ties: the first, the prompt itself


def baked_factors(loaded: LoadedHypernet, readings: torch.Tensor):
    """The factors of one prompt whose readings are `readings` [M, D] (`bake_readings`): their
    updates summed, side by side along the rank."""
    from unhype.prompt_windows import stack_rows

    readings = readings.reshape(-1, readings.shape[-1])
    with torch.no_grad():
        return stack_rows(loaded.generate(readings), [list(range(len(readings)))])


def bake_lora(loaded: LoadedHypernet, embedding: torch.Tensor, prompt: str,
              strength: float = 1.0, title: str | None = None,
              fmt: str = "kohya", probed=None) -> tuple[dict, dict]:
    """(kohya tensors, metadata) of the LoRA the hypernetwork generates for one embedding, or
    the sum of a long prompt's readings [M, D] (`bake_readings`).
    `probed`: `probe_embedding` of it with the text encoder (names the concept(s) it fires in
    the metadata); None: probed here without concept texts (the share of the reference only)."""
    if fmt not in FORMATS:
        raise UnHypeError(f"unknown LoRA format {fmt!r}; choose one of {list(FORMATS)}")
    factors = baked_factors(loaded, embedding)
    tensors = lora_state_dict(factors, strength) if fmt == "kohya" else \
        bfl_state_dict(loaded, factors, strength)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise UnHypeError(f"the LoRA for {prompt!r} at strength {strength:g} overflows "
                          f"float32 (Inf/NaN in {bad[0]}): use a smaller strength")
    if probed is None:
        probed = probe_embedding(loaded, embedding, prompt)
    metadata = lora_metadata(loaded, prompt, strength, title or f"unhype_{loaded.path.stem}",
                             tensors, probed)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(tensors, metadata)
    return tensors, metadata


def save_lora(path, tensors: dict, metadata: dict) -> None:
    atomic_save_safetensors(tensors, path, metadata)
