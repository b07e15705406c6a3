"""What the UnHype tab does, without gradio: list files, probe prompts, bake a LoRA.

Probe and bake read embeddings with the loaded checkpoint's own text encoder (as generation
does), so the file's family must match the loaded model.
"""

from __future__ import annotations

import html
import os
import re

from unhype import infotext
from unhype.bake import NO_OP_NOTE, bake_lora, bake_readings, probe_embedding, prompt_claim, \
    save_lora, update_norm, weak_note
from unhype.dynamic_lora import check_strength
from unhype.errors import UnHypeError
from unhype.model_check import detect_family
from unhype.probe import ROW_HEADERS, ROW_NOTE, concept_texts, probe
from unhype.prompt_tags import plain_text
from unhype.prompt_windows import prompt_windows
from unhype.summary import summary_lines

from unhype_webui import files, host
from unhype_webui.session import Schedule, conditioning_texts, host_family_problem

FILE_HEADERS = ["name", "family", "erases", "variant", "rank", "layers", "hash", "size MB"]
PROBE_HEADERS = ROW_HEADERS
PROBE_STEPS = 150  # the web UI's most steps: every edit of a schedule happens within them


def file_rows(folder: str | None = None) -> list[list]:
    rows = []
    for name, path in files.list_files(folder).items():
        size = round(os.path.getsize(path) / 2**20, 1)
        try:
            d = files.describe(path)
            rows.append([name, d["family"], ", ".join(d["concepts"]) or "?", d["variant"],
                         d["rank"], d["targets"], infotext.short_hash(path), size])
        except UnHypeError as exc:
            rows.append([name, "invalid", str(exc), "", "", "", "", size])
    return rows


def _embedder(loaded, sd_model):
    problem = host_family_problem(loaded.meta.family,
                                  detect_family(host.diffusion_model(sd_model)), loaded.path.name)
    if problem:
        raise UnHypeError(problem)
    family = loaded.meta.family

    def embed(texts):
        return host.pooled_embeddings(sd_model, family, [plain_text(t) for t in texts])
    return embed


def _texts(**values) -> None:
    """The tab's text inputs are texts (None: empty); an API caller may send anything."""
    for what, value in values.items():
        if value is not None and not isinstance(value, str):
            raise UnHypeError(f"{what} must be a text, got {value!r}")


def details_md(name) -> str:
    """The Details tab: what the file erases and how it was made (unhype.summary, the same
    summary as ComfyUI's Inspect node), with its SHA-256 as the infotext records it."""
    try:
        _texts(hypernetwork=name)
        if not name:
            raise UnHypeError("choose a hypernetwork")
        _, path = files.resolve(name)
        lines = summary_lines(files.load(path)) + [f"sha256: {infotext.file_sha256(path)}"]
        return "\n".join(f"- {html.escape(line)}" for line in lines)
    except UnHypeError as exc:
        return f"**{html.escape(str(exc))}**"


def probe_texts(prompts: list[str]) -> list[str]:
    """The texts generation embeds for `prompts`: each AND part and each prompt-editing /
    alternation text of its schedule (session.conditioning_texts), once each."""
    texts = []
    for prompt in prompts:
        for text in conditioning_texts(prompt, Schedule(PROBE_STEPS)):
            if text.strip() and text not in texts:
                texts.append(text)
    return texts


def probe_ui(name, prompts_text, sd_model=None):
    try:
        _texts(hypernetwork=name, prompts=prompts_text)
        if not name:
            raise UnHypeError("choose a hypernetwork")
        prompts = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()]
        if not prompts:
            raise UnHypeError("write at least one prompt")
        _, path = files.resolve(name)
        loaded = files.load(path)
        concepts = concept_texts(loaded.meta)
        if not concepts:
            raise UnHypeError(f"{name} lists no concepts in its metadata; nothing to compare")
        # the gate floor and saturation included, as generation applies them
        results = probe(loaded, _embedder(loaded, sd_model or host.current_model()),
                        probe_texts(prompts), concepts, windows=True)
        fired = sum(1 for r in results if r.fired)
        return ([r.as_row() for r in results],
                f"{fired} of {len(results)} prompt(s) switch it on (a row per text generation "
                f"embeds: AND parts, prompt edits). {ROW_NOTE}")
    except UnHypeError as exc:
        return [], f"**{html.escape(str(exc))}**"


def bake_ui(name, prompt, strength, out_name, overwrite=False, sd_model=None,
            out_dir=None) -> str:
    try:
        _texts(hypernetwork=name, prompt=prompt, **{"output name": out_name})
        if not name:
            raise UnHypeError("choose a hypernetwork")
        if not (prompt or "").strip():
            raise UnHypeError("write the prompt to bake the LoRA for")
        strength = check_strength(strength)
        _, path = files.resolve(name)
        loaded = files.load(path)
        words = re.sub(r"[^\w]+", "_", plain_text(prompt))[:40]
        # no hidden file ("..") and within file-name limits
        stem = (re.sub(r"[^\w.-]+", "_", (out_name or "").strip()).lstrip(".") or
                f"unhype_{loaded.path.stem}_{words}")[:120]
        folder = out_dir or host.lora_dir()
        target = os.path.join(folder, stem + ".safetensors")
        if os.path.exists(target) and overwrite is not True:  # only a ticked box replaces
            raise UnHypeError(f"{target} exists; choose another output name or tick 'Replace "
                              "an existing file of that name'")
        embed = _embedder(loaded, sd_model or host.current_model())
        emb = bake_readings(loaded, embed([prompt] + prompt_windows(plain_text(prompt))))
        os.makedirs(folder, exist_ok=True)
        # FLUX runs only in Forge, and every Forge reads sd-scripts' fused BFL names (older
        # ones lack the lora_transformer_* rule)
        fmt = "kohya_bfl" if loaded.meta.family == "flux" else "kohya"
        probed = probe_embedding(loaded, emb, prompt, embed)  # recorded in the metadata
        tensors, metadata = bake_lora(loaded, emb, prompt, strength, stem, fmt=fmt,
                                      probed=probed)
        save_lora(target, tensors, metadata)
        weak = weak_note(probed)
        note = f" (**{NO_OP_NOTE}**)" if update_norm(tensors) == 0 else \
            f" (**{html.escape(weak)}**)" if weak else f" ({html.escape(prompt_claim(probed))})"
        return f"saved `{html.escape(target)}`; use it as `<lora:{html.escape(stem)}:1>`{note}"
    except UnHypeError as exc:
        return f"**{html.escape(str(exc))}**"
