"""ComfyUI glue: the models folder, file cache, family check, key resolution, path choice.

Everything version-dependent is decided by feature detection on the objects ComfyUI hands us
(never by version strings). The math lives in ``unhype.comfy_apply``.
"""

from __future__ import annotations

import logging
import os

import folder_paths
import torch

from unhype.comfy_families import config_name, family_of, family_problem
from unhype.comfy_apply import (ApplyPlan, UnHypeWrapper, merge_rounding_loss, merge_row,
                                merged_delta)
from unhype.dynamic_lora import resolve_modules
from unhype.errors import UnHypeError
from unhype.file_cache import FileCache, cache_limit
from unhype.fileformat import LoadedHypernet
from unhype.model_check import context_dim

log = logging.getLogger("unhype")

FOLDER = "unhype"  # models/unhype (not "hypernetworks": ComfyUI uses that for A1111 files)
EXTENSIONS = {".safetensors"}

PATH_PER_ROW = "per-row wrapper (positive only)"
PATH_HOOKS = "ComfyUI hooks on the conditioning (positive only)"
PATH_MERGE = "merged weights (positive AND negative)"
MODES = ["auto", "per-row (positive only)", "merge into weights (both branches)",
         "comfy hooks (positive only)"]


def register_folder() -> list[str]:
    """Register models/unhype, keeping paths users added in extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None or default not in entry[0]:
        folder_paths.add_model_folder_path(FOLDER, default)
    paths = list(folder_paths.folder_names_and_paths[FOLDER][0])
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:  # read-only installs: the folder is optional
        pass
    return paths


CACHE_FILES = 4  # files kept loaded unless $UNHYPE_CACHE_FILES says otherwise
_CACHE = FileCache()


def load_cached(path: str) -> LoadedHypernet:
    """Load and validate a file once per (path, mtime, size), keeping the most recently used
    ``UNHYPE_CACHE_FILES`` files (default CACHE_FILES)."""
    return _CACHE.get(path, cache_limit(os.environ.get("UNHYPE_CACHE_FILES"), CACHE_FILES))


def model_family(model) -> str | None:
    """UnHype family of a ComfyUI MODEL (ModelPatcher), or None if unknown or unsupported."""
    return family_of(config_name(model))


def diffusion_model(model):
    inner = getattr(model, "model", None)
    root = getattr(inner, "diffusion_model", None)
    if root is None:
        raise UnHypeError("UnHype: this MODEL has no diffusion_model (not a ComfyUI diffusion "
                          "model patcher?)")
    return root


def check_model(model, loaded: LoadedHypernet) -> None:
    """Refuse a file for another family, and one whose targets do not all exist in the model."""
    problem = family_problem(config_name(model), loaded.path.name, loaded.meta.family)
    if problem:
        raise UnHypeError(problem)


def context_width(model) -> int | None:
    """The text-embedding width the model's cross-attention reads (FLUX: its txt_in), or
    None when it cannot be told."""
    root = diffusion_model(model)
    txt_in = getattr(root, "txt_in", None)
    if isinstance(getattr(txt_in, "in_features", None), int):
        return txt_in.in_features
    return context_dim(root)  # attn2.to_k's logical width, NF4 / GGUF included


def check_context(model, conditioning) -> None:
    """Refuse conditioning another model's text encoder made: FLUX's clip_l and SD1's CLIP
    pool to the same 768-d vector, so the pooled width alone lets it through, and sampling
    then fails in the first cross-attention layer."""
    width = context_width(model)
    for i, entry in enumerate(conditioning):
        if width is not None and entry[0].shape[-1] != width:
            raise UnHypeError(f"UnHype: conditioning entry {i} is {entry[0].shape[-1]}-wide text "
                              f"but this model reads {width}-wide: it comes from another "
                              "model's text encoder (wrong CLIP for this model?)")


def is_sd2_clip(clip) -> bool:
    """ComfyUI's SD 2.x text encoder (sd2_clip.SD2ClipModel: OpenCLIP-H as 'clip_h')."""
    return getattr(getattr(clip, "cond_stage_model", None), "clip", None) == "clip_h"


def sd2_embedding(clip, text: str) -> torch.Tensor:
    """[1, 1024] SD 2.x embedding UnHype reads: the EOS row of the penultimate layer's output
    after the final layer norm (diffusers' 23-layer SD2 text encoder's pooler_output, what the
    trainer computes), of the prompt's first chunk. ComfyUI's pooled_output is another vector
    (the last layer, projected). Read at the penultimate layer whatever CLIP Set Last Layer
    says; token weights leave the EOS row alone."""
    penultimate = clip.clone()
    penultimate.clip_layer(-2)
    tokens = penultimate.tokenize(text)
    chunk = tokens["h"][0]
    end = getattr(getattr(penultimate.tokenizer, "clip_h", None), "end_token", 49407)
    ids = [t[0] for t in chunk]
    eos = next((i for i, t in enumerate(ids) if isinstance(t, int) and t == end), None)
    if eos is None:
        raise UnHypeError("UnHype: no end-of-text token in the prompt's first chunk")
    cond, _ = penultimate.encode_from_tokens({"h": [chunk]}, return_pooled=True)
    return cond[:1, eos].float().reshape(1, -1)


def lora_key_map(model) -> dict[str, str]:
    """ComfyUI's own LoRA key map (kohya/diffusers names -> state-dict keys) for the model."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model.model, {})


def resolve_keys(model, plan: ApplyPlan) -> dict[str, str]:
    """Canonical name -> ComfyUI weight key; every target must resolve (nothing ignored) and
    have the shape the file was trained for: ComfyUI's own patching (merge, hooks) only logs
    'WEIGHT SHAPE MISMATCH' and skips such a layer, which would erase nothing."""
    key_map = lora_key_map(model)
    missing = [name for name in plan.factors if name not in key_map]
    if missing:
        raise UnHypeError(f"UnHype: {len(missing)} target layer(s) are unknown to ComfyUI's LoRA "
                          f"key map for this model, e.g. {missing[:2]}")
    keys = {name: key_map[name] for name in plan.factors}
    # The module paths the hooks use must be the same layers ComfyUI's key map names.
    for name, key in keys.items():
        hp = plan.paths[name]
        expected = "diffusion_model." + hp.path + ".weight"
        if hp.out_slice is not None:  # FLUX fused layer: ComfyUI gives (key, (dim, start, len))
            start, stop = hp.out_slice
            if not isinstance(key, tuple) or key[0] != expected or \
                    tuple(key[1][:3]) != (0, start, stop - start):
                raise UnHypeError(f"UnHype: layer {name} maps to {key} in ComfyUI but to "
                                  f"{expected} rows {hp.out_slice} in UnHype's naming; "
                                  "refusing to guess")
        elif key != expected:
            raise UnHypeError(f"UnHype: layer {name} maps to {key} in ComfyUI but to {expected} "
                              "in UnHype's naming; refusing to guess")
    try:
        resolve_modules(diffusion_model(model), plan.paths, plan.dims)
    except UnHypeError as exc:
        raise UnHypeError(f"UnHype: {exc}") from None
    return keys


def has_wrapper_path(model) -> bool:
    return hasattr(model, "set_model_unet_function_wrapper") and \
        isinstance(getattr(model, "model_options", None), dict)


def comfy_hooks():
    """ComfyUI's conditioning hooks module (2024-12 and later), or None."""
    try:
        import comfy.hooks as hooks
    except ImportError:
        return None
    needed = ("HookGroup", "WeightHook", "set_hooks_for_conditioning")
    return hooks if all(hasattr(hooks, n) for n in needed) else None


def available_modes() -> list[str]:
    return MODES if comfy_hooks() is not None else MODES[:3]


def choose_path(model, mode: str) -> str:
    """auto: the per-row wrapper (one batched forward, no weight patching) where it exists;
    ComfyUI's hooks only on request (they split cond/uncond into separate forwards and
    re-patch weights when switching); merge as the last resort."""
    if mode not in MODES:
        raise UnHypeError(f"UnHype: unknown mode {mode!r}; choose one of {MODES}")
    if mode == MODES[2]:
        return PATH_MERGE
    if mode == MODES[3]:
        if comfy_hooks() is None:
            raise UnHypeError("UnHype: this ComfyUI has no conditioning hooks (comfy/hooks.py); "
                              "use 'auto'")
        return PATH_HOOKS
    if has_wrapper_path(model):
        return PATH_PER_ROW
    if mode == MODES[1]:
        raise UnHypeError("UnHype: this ComfyUI has no model_function_wrapper; per-row "
                          "application is unavailable (use 'auto' or 'merge')")
    return PATH_MERGE


def apply_per_row(model, plan: ApplyPlan):
    patched = model.clone()
    base = patched.model
    resolve_modules(diffusion_model(patched), plan.paths, plan.dims)  # fail now, not mid-run
    inner = patched.model_options.get("model_function_wrapper")
    patched.set_model_unet_function_wrapper(
        UnHypeWrapper(plan, lambda: base.diffusion_model, inner))
    return patched


def _stored_targets(model, plan: ApplyPlan, keys: dict[str, str]):
    """(target name, its stored weight or row slice) per layer, and how many target layers are
    stored as packed integers (NF4, GGUF)."""
    state = model.model.state_dict()
    stored, quantised = {}, 0
    for name in plan.factors:
        key = keys[name]
        weight = state[key[0] if isinstance(key, tuple) else key]
        if not weight.dtype.is_floating_point:
            quantised += 1
            continue
        if isinstance(key, tuple):  # a row slice of a fused layer: (key, (dim, start, length))
            dim, start, length = key[1][:3]
            weight = weight.narrow(dim, start, length)
        stored[name] = weight
    return stored, quantised


def check_hooks_fit(model, plan: ApplyPlan, keys: dict[str, str]) -> None:
    """ComfyUI's hooks patch the stored tensor itself (ModelPatcher.patch_hook_weight_to_device,
    with no loader override): on packed NF4 / GGUF weights that is a shape error in the middle
    of sampling (seen with ComfyUI-GGUF). Refused here, before anything runs."""
    _, quantised = _stored_targets(model, plan, keys)
    if quantised:
        raise UnHypeError(f"UnHype: {quantised} target layers are stored quantised (NF4 / "
                          "GGUF); ComfyUI's hooks cannot patch packed weights (they fail "
                          "mid-sampling): use 'auto' (per-row, exact on them) or 'merge' (the "
                          "loader's own LoRA patching)")


def check_merge_fits(model, plan: ApplyPlan, keys: dict[str, str]) -> None:
    """Merging into packed NF4 / GGUF weights works only through a loader whose ModelPatcher
    patches them itself (ComfyUI-GGUF's attaches the patches and applies them at dequantisation:
    tested). ComfyUI's own weight patching fails on them: bitsandbytes' Params4bit refuses its
    ``.to(copy=...)`` (ComfyUI_bitsandbytes_NF4, the stand-in test), or a layer whose shape does
    not match is skipped with 'WEIGHT NOT MERGED', erasing nothing. Refused before anything
    runs unless the model's patcher overrides that patching."""
    import comfy.model_patcher

    _, quantised = _stored_targets(model, plan, keys)
    own = getattr(type(model), "patch_weight_to_device", None)
    stock = getattr(comfy.model_patcher.ModelPatcher, "patch_weight_to_device", None)
    if quantised and own is stock:
        raise UnHypeError(f"UnHype: {quantised} target layers are stored quantised (NF4 / "
                          "GGUF) and this model's loader does not patch them itself (ComfyUI's "
                          "own weight patching fails on packed weights): use 'auto' (per-row, "
                          "exact on them)")


def weight_rounding_note(model, plan: ApplyPlan, keys: dict[str, str],
                         row: int | None = None) -> str:
    """For the paths that write the update into the weights (merge, ComfyUI's hooks): how much
    of prompt row `row`'s update (default: the strongest not under the gate floor, the one merge
    writes) the weights' own dtype loses, when they are stored in under 32 bits and it is at
    least 1% (fp8 models: UNETLoader's fp8 weight dtypes). '' otherwise."""
    row = (merge_row(plan) or 0) if row is None else row
    stored, quantised = _stored_targets(model, plan, keys)
    low = {name: w for name, w in stored.items() if w.element_size() < 4}
    if quantised:
        return (f" {quantised} target layers are stored quantised (NF4 / GGUF): writing the "
                "update into them is left to the loader's own patching (ComfyUI-GGUF's: "
                "tested); 'auto' (per-row) adds it to their output at the compute precision "
                "(tested).")
    if not low:
        return ""
    # one layer's B A^T at a time: FLUX's full update would be gigabytes at once
    lost = merge_rounding_loss((w, merged_delta(plan, name, row)) for name, w in low.items())
    if lost < 0.01:
        return ""
    dtype = str(next(iter(low.values())).dtype).replace("torch.", "")
    which = "first prompt" if row == 0 else f"prompt row {row + 1}"
    return (f" The model's weights are stored in {dtype}: writing the update into them loses "
            f"about {100 * lost:.0f}% of it ({which}, {len(low)} layers); 'auto' "
            "(per-row) adds it at the compute precision instead.")


def lora_patches(plan: ApplyPlan, keys: dict[str, str], row: int = 0) -> dict:
    """ComfyUI weight patches carrying prompt row `row`'s LoRA as its low-rank factors, built
    by ComfyUI's own LoRA loader (comfy.lora.load_lora: tuples in older ComfyUI, weight adapters
    in current ones). ComfyUI forms a layer's B A^T only while it patches that layer; dense diffs
    would hold the whole update at once (full-size FLUX: gigabytes per prompt)."""
    import comfy.lora

    tensors, to_load = {}, {}
    for i, (name, (a, b)) in enumerate(plan.factors.items()):
        prefix = f"unhype_{i}"
        tensors[f"{prefix}.lora_up.weight"] = (plan.strength * b[row]).contiguous()
        tensors[f"{prefix}.lora_down.weight"] = a[row].transpose(0, 1).contiguous()
        to_load[prefix] = keys[name]
    patches = comfy.lora.load_lora(tensors, to_load)
    if len(patches) != len(to_load):
        raise UnHypeError(f"UnHype: ComfyUI's LoRA loader read {len(patches)} of {len(to_load)} "
                          "layers; refusing a partial erasure")
    return patches


def apply_merged(model, plan: ApplyPlan, keys: dict[str, str]):
    """(the model with one prompt row's LoRA merged, that row: `merge_row`, the strongest not
    under the gate floor; None and no patches when every row is under it)."""
    patched = model.clone()
    row = merge_row(plan)
    if row is None:
        return patched, None
    patches = lora_patches(plan, keys, row)
    added = patched.add_patches(patches, 1.0)
    if len(added) != len(patches):
        raise UnHypeError(f"UnHype: ComfyUI accepted {len(added)} of {len(patches)} weight "
                          "patches; refusing a partial erasure")
    return patched, row


def apply_hooks(model, plan: ApplyPlan, keys: dict[str, str], conditioning):
    """One ComfyUI WeightHook per conditioning entry, carrying that entry's LoRA
    (low-rank, `lora_patches`).

    ComfyUI registers the hooks at sampling time and patches the weights only while the hooked
    conditioning runs; the negative (no hooks) runs the base weights. An entry whose prompts
    are all under the gate floor gets no hook: ComfyUI batches it with the base model's rows
    instead of running it alone with its weights re-patched.
    """
    hooks = comfy_hooks()
    out, row = [], 0
    for i, entry in enumerate(conditioning):
        n = entry[0].shape[0]
        pooled = entry[1]["pooled_output"].reshape(-1, entry[1]["pooled_output"].shape[-1])
        if n > 1 and not bool((pooled == pooled[:1]).all()):
            raise UnHypeError(f"UnHype: conditioning entry {i} holds {n} different prompts; "
                              "ComfyUI's hooks give one LoRA per entry: use 'auto'")
        if plan.silent is not None and bool(plan.silent[row:row + n].all()):
            out.append(entry)
            row += n
            continue
        group = hooks.HookGroup()
        hook = hooks.WeightHook(strength_model=1.0, strength_clip=0.0)
        hook.weights = lora_patches(plan, keys, row)
        hook.need_weight_init = False
        group.add(hook)
        out += hooks.set_hooks_for_conditioning([entry], group)
        row += n
    return model.clone(), out
