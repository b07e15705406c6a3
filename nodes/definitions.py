"""The UnHype ComfyUI nodes: Loader, Apply, Bake LoRA, Inspect, Text Encode, Also Read Text
(thin; logic in unhype/)."""

from __future__ import annotations

import logging
import os
import re

import folder_paths
import torch

from unhype.bake import (FORMATS as BAKE_FORMATS, NO_OP_NOTE, bake_lora, bake_readings,
                         probe_embedding, prompt_claim, save_lora, update_norm, weak_note)
from unhype.comfy_apply import (EMBEDDING_KEY, WINDOWS_KEY, build_plan, long_prompt_note,
                                pooled_rows, rows_under_floor, window_rows)
from unhype.comfy_families import clip_problem
from unhype.errors import UnHypeError
from unhype.probe import ROW_HEADERS, ROW_NOTE, concept_texts, probe
from unhype.prompt_windows import prompt_windows
from unhype.summary import summary_lines

from . import glue

log = logging.getLogger("unhype")
CATEGORY = "UnHype"
TYPE = "UNHYPE"


def _progress(total: int):
    try:
        import comfy.utils

        return comfy.utils.ProgressBar(total)
    except Exception:  # progress is cosmetic
        return None


def _step(bar):
    if bar is not None:
        bar.update(1)


class UnHypeLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hypernetwork": (folder_paths.get_filename_list(glue.FOLDER), {
            "tooltip": "An UnHype hypernetwork (.safetensors) from models/unhype (or the "
                       "'unhype' folders of extra_model_paths.yaml)."})}}

    RETURN_TYPES = (TYPE,)
    RETURN_NAMES = ("unhype",)
    OUTPUT_TOOLTIPS = ("The validated hypernetwork, for UnHype Apply / Bake / Inspect.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads and validates an UnHype concept-erasure hypernetwork (cached by file)."

    def load(self, hypernetwork):
        path = folder_paths.get_full_path(glue.FOLDER, hypernetwork)
        if path is None:
            raise UnHypeError(f"UnHype Loader: {hypernetwork!r} is not in "
                              f"{folder_paths.get_folder_paths(glue.FOLDER)}")
        return (glue.load_cached(path),)

    @classmethod
    def IS_CHANGED(cls, hypernetwork):
        path = folder_paths.get_full_path(glue.FOLDER, hypernetwork)
        try:
            st = os.stat(path)
            return f"{st.st_mtime_ns}-{st.st_size}"
        except (OSError, TypeError):
            return float("nan")


class UnHypeApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to erase concepts from."}),
            "conditioning": ("CONDITIONING", {
                "tooltip": "The POSITIVE conditioning (from CLIP Text Encode). Each entry gets "
                           "the LoRA generated from its own pooled CLIP embedding; connect the "
                           "CONDITIONING output to the sampler's positive input."}),
            "unhype": (TYPE, {"tooltip": "The hypernetwork from UnHype Loader."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "Multiplies the generated LoRA (1 = as trained; "
                                              "0 = off)."}),
            "mode": (glue.available_modes(), {"default": "auto", "tooltip":
                "auto: per-row on the positive only (as in the paper), every prompt in one "
                "batched forward. merge: bakes one prompt's LoRA (the strongest) into the "
                "weights, which then also changes the negative branch. comfy hooks: ComfyUI's "
                "own per-conditioning weight hooks (new ComfyUI only; wire this node's "
                "CONDITIONING output to the sampler)."}),
        }}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "STRING")
    RETURN_NAMES = ("model", "conditioning", "info")
    OUTPUT_TOOLTIPS = ("The model with UnHype applied (the input model is unchanged).",
                       "The same conditioning; wire it to the sampler's positive input.",
                       "How UnHype was applied (path, prompts, branches).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Generates a concept-erasing LoRA for each positive prompt from its CLIP "
                   "embedding and applies it to that prompt only; the negative runs the base "
                   "model.")

    def apply(self, model, conditioning, unhype, strength, mode="auto"):
        glue.check_model(model, unhype)
        plan = build_plan(unhype, conditioning, strength)
        glue.check_context(model, conditioning)
        keys = glue.resolve_keys(model, plan)
        path = glue.choose_path(model, mode)
        prompts = next(iter(plan.factors.values()))[0].shape[0]
        off = rows_under_floor(plan)
        long = long_prompt_note(conditioning, unhype.meta.family)
        if plan.strength == 0 or off == prompts:  # nothing to add: the inputs, untouched
            info = (f"UnHype: {unhype.path.name} off: " +
                    ("strength 0." if plan.strength == 0 else
                     f"all {prompts} prompt row(s) under the file's gate floor (the "
                     "hypernetwork does not recognise them); the model is unchanged." + long))
            if long and plan.strength != 0:
                log.warning(info)
            return {"ui": {"text": [info]}, "result": (model, conditioning, info)}
        if path == glue.PATH_HOOKS:
            glue.check_hooks_fit(model, plan, keys)
            patched, conditioning = glue.apply_hooks(model, plan, keys, conditioning)
            info = (f"UnHype: {unhype.path.name} on {len(keys)} layers via {path}; one LoRA per "
                    "conditioning entry; wire THIS conditioning output to the sampler's positive."
                    + glue.weight_rounding_note(model, plan, keys))
        elif path == glue.PATH_PER_ROW:
            patched = glue.apply_per_row(model, plan)
            info = (f"UnHype: {unhype.path.name} on {len(keys)} layers via {path}; "
                    f"{prompts} prompt row(s), each with its own LoRA; " +
                    ("every row of this conditioning gets it (guidance-distilled family)."
                     if plan.apply_to == "all" else "the negative runs the base weights."))
        else:
            glue.check_merge_fits(model, plan, keys)
            patched, row = glue.apply_merged(model, plan, keys)
            info = (f"UnHype: {unhype.path.name} MERGED into {len(keys)} weights: it applies to "
                    "BOTH the positive and the negative branch (not the paper's cond-only "
                    "semantics)" + (f"; only prompt row {row + 1} of {prompts} is used (the "
                                    "strongest update not under the gate floor)"
                                    if prompts > 1 and row is not None else "") + "."
                    + glue.weight_rounding_note(model, plan, keys, row))
        if off:  # the hypernetwork did not recognise these prompts: nothing is erased there
            info += (f" {off} of {prompts} prompt row(s) under the file's gate floor: they run "
                     "the base weights.")
        info += long
        if path == glue.PATH_MERGE or long:
            log.warning(info)
        return {"ui": {"text": [info]}, "result": (patched, conditioning, info)}


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return name[:80] or "unhype_lora"


class UnHypeBakeLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unhype": (TYPE, {"tooltip": "The hypernetwork from UnHype Loader."}),
            "conditioning": ("CONDITIONING", {
                "tooltip": "The prompt to bake for (its pooled CLIP embedding; first row)."}),
            "filename": ("STRING", {"default": "unhype_baked", "tooltip":
                "File name in models/loras (.safetensors is added; existing files are not "
                "overwritten unless 'overwrite' is on)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "Baked into the LoRA's up weights."}),
            "overwrite": ("BOOLEAN", {"default": False,
                                      "tooltip": "Replace an existing file of that name."}),
        }, "optional": {
            "prompt_note": ("STRING", {"default": "", "tooltip":
                "The prompt text, stored in the LoRA's metadata (informational)."}),
            "format": (list(BAKE_FORMATS), {"default": "kohya", "tooltip":
                "kohya: canonical names (FLUX: lora_transformer_*, ComfyUI and diffusers). "
                "kohya_bfl (FLUX only): sd-scripts' fused-layer names, for Forge too."}),
            "clip": ("CLIP", {"tooltip": "Optional: the text encoder, to name the concept(s) "
                              "this prompt switches on (in the LoRA's metadata and the note "
                              "shown here); without it only the update's share of the "
                              "file's reference."}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_path",)
    OUTPUT_TOOLTIPS = ("Where the kohya-format LoRA was written.",)
    FUNCTION = "bake"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Writes the LoRA the hypernetwork generates for one prompt into models/loras "
                   "(kohya format), for the stock LoRA loader and other UIs. A static LoRA "
                   "applies to every prompt and both CFG branches. It shows (and records in the "
                   "LoRA's metadata) the concept(s) the prompt switches on, with a CLIP "
                   "connected, and the update's share of the file's reference, and warns when "
                   "the LoRA is weak for the prompt (it fires no concept).")

    def bake(self, unhype, conditioning, filename, strength, overwrite, prompt_note="",
             format="kohya", clip=None):  # noqa: A002  (ComfyUI passes inputs by name)
        rows = pooled_rows(conditioning, unhype.meta.config.embed_dim,
                           unhype.meta.embedding.get("source", "?"), "UnHype Bake LoRA")
        windows, _ = window_rows(conditioning[:1], rows[:1])  # from UnHype Text Encode
        # the readings of the prompt and its windows whose updates Apply gives this row
        pooled = bake_readings(unhype, torch.cat([rows[0][:1].float()] + windows[:1]))
        folders = folder_paths.get_folder_paths("loras")
        if not folders:
            raise UnHypeError("UnHype Bake LoRA: ComfyUI has no 'loras' models folder")
        name = _safe_name(filename)
        name = name if name.endswith(".safetensors") else name + ".safetensors"
        path = os.path.join(folders[0], name)
        if os.path.exists(folders[0]) and not os.path.isdir(folders[0]):
            raise UnHypeError(f"UnHype Bake LoRA: the loras folder {folders[0]} is a file")
        if os.path.exists(path) and not overwrite:
            raise UnHypeError(f"UnHype Bake LoRA: {path} exists; pick another name or turn on "
                              "'overwrite'")
        bar = _progress(2)
        embed = None if clip is None else \
            (lambda texts: torch.cat([_encode_pooled(clip, t, unhype, "UnHype Bake LoRA")
                                      for t in texts]))
        # what the LoRA does for this row's prompt (the concepts need the CLIP)
        probed = probe_embedding(unhype, pooled, prompt_note, embed)
        tensors, metadata = bake_lora(unhype, pooled, prompt_note, strength,
                                      title=os.path.splitext(name)[0], fmt=format,
                                      probed=probed)
        _step(bar)
        os.makedirs(folders[0], exist_ok=True)
        save_lora(path, tensors, metadata)
        _step(bar)
        shown = f"{path} ({prompt_claim(probed)})"
        if update_norm(tensors) == 0:
            log.warning("UnHype Bake LoRA: %s: %s", path, NO_OP_NOTE)
            shown = f"{path} ({NO_OP_NOTE})"
        elif weak_note(probed):
            log.warning("UnHype Bake LoRA: %s: %s", path, weak_note(probed))
            shown = f"{path} ({weak_note(probed)})"
        return {"ui": {"text": [shown]}, "result": (path,)}


class UnHypeInspect:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unhype": (TYPE, {"tooltip": "The hypernetwork from UnHype Loader."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Text encoder used to embed the prompts below and the "
                                         "file's trained concepts (needed for firing strengths)."}),
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                "One prompt per line: how strongly does each one fire?"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The file's metadata and, per prompt, its LoRA strength.",)
    FUNCTION = "inspect"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Shows what an UnHype file erases and how it was made (concepts, synonyms, "
                   "gate floor, base model, later edits) and, for given prompts, the update "
                   "Apply gives each (after the gate floor): its norm, its share of the nearest "
                   "concept's reference, whether the floor zeroes it, the nearest concept by "
                   "direction and every concept the prompt fires.")

    def inspect(self, unhype, clip=None, prompts=""):
        lines = [describe_file(unhype)]
        texts = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if texts and clip is None:
            lines.append("(connect a CLIP to measure the prompts)")
        elif texts:
            concepts = concept_texts(unhype.meta)
            bar = _progress(sum(1 + len(prompt_windows(t)) for t in texts) + len(concepts))

            def embed(batch):
                out = []
                for text in batch:
                    out.append(_encode_pooled(clip, text, unhype, "UnHype Inspect"))
                    _step(bar)
                return torch.cat(out)

            # as Apply: the gate floor and saturation, long prompts through their windows
            # (what UnHype Text Encode stores)
            results = probe(unhype, embed, texts, concepts, windows=True)
            lines.append("")
            lines.append(" | ".join(ROW_HEADERS))
            lines += [" | ".join(str(v) for v in r.as_row()) for r in results]
            lines.append(ROW_NOTE)
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (report,)}


def describe_file(loaded) -> str:
    return "\n".join(summary_lines(loaded))


def _check_clip(clip, node: str) -> None:
    if clip is None:  # the words of ComfyUI's own CLIPTextEncode
        raise UnHypeError(f"{node}: clip input is invalid: None. If the clip is from a "
                          "checkpoint loader node your checkpoint does not contain a valid clip "
                          "or text encoder model.")


class UnHypeTextEncode:
    """CLIP Text Encode that also stores the pooled embeddings of a long prompt's word windows,
    so UnHype Apply erases a concept named after the first 75 tokens (unhype/prompt_windows.py):
    the conditioning is ComfyUI's own otherwise."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip":
                "The prompt, as in CLIP Text Encode."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("CLIP Text Encode's conditioning, plus the window embeddings UnHype "
                       "Apply reads for prompts of more than 75 tokens.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("CLIP Text Encode for prompts that UnHype Apply will see: a prompt longer "
                   "than 75 tokens is otherwise read by its first 75 only.")

    def encode(self, clip, text):
        _check_clip(clip, "UnHype Text Encode")
        tokens = clip.tokenize(text)
        if hasattr(clip, "encode_from_tokens_scheduled"):  # ComfyUI 2025 and later
            conditioning = clip.encode_from_tokens_scheduled(tokens)
        else:
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            conditioning = [[cond, {"pooled_output": pooled}]]
        if glue.is_sd2_clip(clip):  # ComfyUI's pooled_output is not what the file reads
            own = glue.sd2_embedding(clip, text)
            conditioning = [[c, {**extra, EMBEDDING_KEY: own}] for c, extra in conditioning]
        windows = prompt_windows(text)
        if windows:
            stored = torch.cat([_encode_pooled(clip, w) for w in windows])
            conditioning = [[c, {**extra, WINDOWS_KEY: stored}] for c, extra in conditioning]
        return (conditioning,)


class UnHypeAlsoReadText:
    """Adds a text's pooled embeddings to a conditioning, for a text the conditioning was
    encoded from but its pooled output does not cover: CLIP Text Encode Flux's t5xxl text
    (FLUX's pooled vector is the clip_l text's), CLIP Text Encode SDXL's text_l (SDXL's is
    text_g's). Apply then gives each row the strongest of its own and these texts' updates, and
    those of other concepts they name (unhype.prompt_windows.combined_rows)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip":
                "The conditioning the text went into (any text encode node's output)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the conditioning was encoded with."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip":
                "The text UnHype should also read, e.g. the t5xxl text of CLIP Text Encode "
                "Flux or the text_l of CLIP Text Encode SDXL."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The same conditioning, with the text's pooled embeddings (whole, and "
                       "its word windows when long) added for UnHype Apply.",)
    FUNCTION = "add"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Makes UnHype Apply also read a text whose pooled embedding the "
                   "conditioning lacks (FLUX's t5xxl text, SDXL's text_l): a concept named "
                   "only there is erased too.")

    def add(self, conditioning, clip, text):
        _check_clip(clip, "UnHype Also Read Text")
        if not (text or "").strip():
            return (conditioning,)
        stored = torch.cat([_encode_pooled(clip, t) for t in [text] + prompt_windows(text)])
        out = []
        for i, (cond, extra) in enumerate(conditioning):
            pooled = extra.get("pooled_output")
            if pooled is not None and pooled.shape[-1] != stored.shape[1]:
                raise UnHypeError(f"UnHype: conditioning entry {i} has {pooled.shape[-1]}-d "
                                  f"pooled embeddings, this CLIP gives {stored.shape[1]}-d: "
                                  "connect the CLIP the conditioning was encoded with")
            before = extra.get(WINDOWS_KEY)
            added = stored if before is None else torch.cat([before, stored])
            out.append([cond, {**extra, WINDOWS_KEY: added}])
        return (out,)


# token streams whose output the pooled vector never depends on: T5 (FLUX, SD3) feeds only the
# cross-attention, so a window's T5 stream is cut to one token (T5-XXL on 256 is the costly part)
UNPOOLED_STREAMS = ("t5xxl",)


def _encode_pooled(clip, text: str, loaded=None, node: str = "UnHype") -> torch.Tensor:
    """[1, D] embedding UnHype reads for `text` (SD 2.x: not ComfyUI's pooled_output); with
    hypernetwork `loaded`, refused when `clip` is another family's."""
    if glue.is_sd2_clip(clip):
        pooled = glue.sd2_embedding(clip, text)
    else:
        tokens = clip.tokenize(text)
        if isinstance(tokens, dict) and any(k not in UNPOOLED_STREAMS for k in tokens):
            tokens = {k: [v[0][:1]] if k in UNPOOLED_STREAMS and v and v[0] else v
                      for k, v in tokens.items()}
        _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    width = None if pooled is None else pooled.shape[-1]
    problem = clip_problem(width, loaded, node) if loaded is not None else \
        f"{node}: this CLIP gives no pooled output" if pooled is None else None
    if problem:
        raise UnHypeError(problem)
    return pooled.reshape(1, -1).float()


NODE_CLASS_MAPPINGS = {
    "UnHypeLoader": UnHypeLoader,
    "UnHypeApply": UnHypeApply,
    "UnHypeBakeLoRA": UnHypeBakeLoRA,
    "UnHypeInspect": UnHypeInspect,
    "UnHypeTextEncode": UnHypeTextEncode,
    "UnHypeAlsoReadText": UnHypeAlsoReadText,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UnHypeLoader": "UnHype Loader",
    "UnHypeApply": "UnHype Apply",
    "UnHypeBakeLoRA": "UnHype Bake LoRA",
    "UnHypeInspect": "UnHype Inspect",
    "UnHypeTextEncode": "UnHype Text Encode (long prompts)",
    "UnHypeAlsoReadText": "UnHype Also Read Text (t5xxl / text_l)",
}
