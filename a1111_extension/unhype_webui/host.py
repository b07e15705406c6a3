"""Everything UnHype reads from the running web UI (A1111 1.10 or Forge), in one place.

Only these functions touch ``modules.*`` / Forge's ``backend``; the rest of the adapter works
on plain tensors and modules. Forge is detected by ``modules_forge`` being importable, never by
version strings; its objects are reached through ``sd_model.forge_objects``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re

import torch

from unhype.errors import UnHypeError


def is_forge() -> bool:
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def diffusion_model(sd_model) -> torch.nn.Module:
    """The LDM/SGM UNet: Forge ``forge_objects.unet.model.diffusion_model`` (backend/nn/unet.py
    IntegratedUNet2DConditionModel), A1111 ``sd_model.model.diffusion_model`` (DiffusionWrapper
    of ldm/sgm's UNetModel)."""
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        return forge.unet.model.diffusion_model
    if is_forge():
        raise UnHypeError("UnHype: this Forge model has no forge_objects.unet; only Stable "
                          "Diffusion 1.x/2.x/XL and FLUX checkpoints are supported")
    try:
        return sd_model.model.diffusion_model
    except AttributeError:
        raise UnHypeError("UnHype: the loaded model has no LDM UNet (model.diffusion_model); "
                          "only Stable Diffusion 1.x/2.x/XL checkpoints are supported") from None


def autocast():
    """``devices.autocast()``, except inside A1111's ``manual_cast`` (fp8 weights with
    full-precision inference; always on mps / xpu): that context un-patches the layer classes
    when it exits even if it was nested, so entering it again while the sampling holds it would
    leave the rest of the sampling without the casts it needs."""
    try:
        from modules import devices
    except ImportError:
        return contextlib.nullcontext()
    if hasattr(torch.nn.Linear, "org_forward"):  # manual_cast is on (devices.patch_module_list)
        return contextlib.nullcontext()
    return devices.autocast()


@torch.no_grad()
def learned_conditioning(sd_model, texts: list[str]):
    """``sd_model.get_learned_conditioning(texts)`` as the host computes p.c (same function)."""
    with autocast():
        c = sd_model.get_learned_conditioning(list(texts))
    return c


def crossattn(cond) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


# families whose embedding is the start of the conditioning's "vector", and its width
POOLED_IN_VECTOR = {"sdxl": 1280, "flux": 768}


@torch.no_grad()
def pooled_embeddings(sd_model, family: str, texts: list[str], cond=None) -> torch.Tensor:
    """[N, D] fp32 embeddings the hypernetwork reads, from the host's own text encoders.

    sdxl: clip_g pooled + projection = the first 1280 values of the conditioning ``vector``
    (A1111 sgm GeneralConditioner / Forge sdxl.py both concatenate it first).
    flux (Forge only): the ``vector`` is CLIP-L's pooled output, unprojected (Forge
    diffusion_engine/flux.py: ``dict(crossattn=cond_t5, vector=pooled_l)``), as diffusers'
    FluxPipeline passes it.
    sd1/sd2: the text model's pooled output (EOS after the final layer norm, unprojected), of
    the tokens A1111 makes of the text: textual-inversion names become their vectors.
    """
    texts = list(texts)
    if family == "flux" and cond is None and \
            getattr(sd_model, "text_processing_engine_l", None) is not None:
        return _forge_flux_pooled(sd_model, texts)
    if family in POOLED_IN_VECTOR:
        width = POOLED_IN_VECTOR[family]
        cond = cond if cond is not None else \
            learned_conditioning(sd_model, [literal(t) for t in texts])
        if not isinstance(cond, dict) or "vector" not in cond:
            raise UnHypeError(f"UnHype: this {family.upper()} model's conditioning has no "
                              "'vector'")
        if cond["vector"].shape[-1] < width:
            raise UnHypeError(f"UnHype: this {family.upper()} model's pooled vector is "
                              f"{cond['vector'].shape[-1]}-d, expected at least {width}")
        return cond["vector"][:, :width].float().cpu()
    if getattr(sd_model, "forge_objects", None) is not None:
        return _forge_pooled(sd_model, texts)
    return _a1111_pooled(sd_model, texts)


def _load_forge_text_encoders(sd_model):
    # what Forge's get_learned_conditioning does first (its engines assume it)
    try:
        from backend import memory_management

        memory_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
    except ImportError:
        pass


def _forge_flux_pooled(sd_model, texts):
    # Forge's FLUX get_learned_conditioning (backend/diffusion_engine/flux.py L84-88) takes the
    # vector from its CLIP-L engine alone; texts read only for their vector (long prompts'
    # windows) skip the T5 engine, the costly half
    _load_forge_text_encoders(sd_model)
    with torch.inference_mode():
        _, pooled = sd_model.text_processing_engine_l([literal(t) for t in texts])
    if pooled.shape[-1] < POOLED_IN_VECTOR["flux"]:
        raise UnHypeError(f"UnHype: this FLUX model's CLIP-L pooled vector is "
                          f"{pooled.shape[-1]}-d, expected {POOLED_IN_VECTOR['flux']}")
    return pooled[:, :POOLED_IN_VECTOR["flux"]].float().cpu().clone()


def _forge_pooled(sd_model, texts):
    # Forge (backend/text_processing/classic_engine.py): engine(texts) returns (z, pooled) when
    # return_pooled is set; text_projection is False for SD1.5/SD2 engines -> unprojected.
    engine = getattr(sd_model, "text_processing_engine", None)
    if engine is None:
        raise UnHypeError("UnHype: this Forge model has no text_processing_engine (not SD1/SD2)")
    _load_forge_text_encoders(sd_model)
    old = engine.return_pooled
    engine.return_pooled = True
    try:
        with torch.inference_mode():
            _, pooled = engine([literal(t) for t in texts])
    finally:
        engine.return_pooled = old
    return pooled.float().cpu().clone()


def _a1111_pooled(sd_model, texts):
    # A1111 wraps ldm's FrozenCLIPEmbedder (SD1: .tokenizer, .transformer = transformers
    # CLIPTextModel) or FrozenOpenCLIPEmbedder (SD2: .model = open_clip CLIP) in sd_hijack's
    # FrozenCLIPEmbedderWithCustomWords / FrozenOpenCLIPEmbedderWithCustomWords (.wrapped).
    ccm = sd_model.cond_stage_model
    wrapped = getattr(ccm, "wrapped", ccm)
    with autocast():
        if hasattr(wrapped, "transformer") and hasattr(wrapped, "tokenizer"):
            device = next(wrapped.transformer.parameters()).device
            tokens = _webui_tokens(ccm, texts)
            if tokens is None:
                tokens = wrapped.tokenizer(texts, truncation=True, max_length=77,
                                           padding="max_length", return_tensors="pt")["input_ids"]
            with _fixes_cleared(ccm):
                out = wrapped.transformer(input_ids=tokens.to(device))
            return out.pooler_output.float().cpu()
        if hasattr(wrapped, "model") and hasattr(wrapped.model, "ln_final"):
            tokens = _webui_tokens(ccm, texts)
            with _fixes_cleared(ccm):
                return _open_clip_pooled(wrapped.model, texts, tokens)
    raise UnHypeError("UnHype: cannot find this model's CLIP text encoder for the embedding")


def literal(text: str) -> str:
    """`text` (plain_text's: no emphasis left, its brackets are the prompt's escaped ones)
    escaped for the web UI's parsers, which would read a bare bracket as emphasis again."""
    return re.sub(r"([()\[\]\\])", r"\\\1", text)


def _webui_tokens(ccm, texts):
    """The first prompt chunk of each text as A1111 tokenizes it (``tokenize_line``), with its
    textual-inversion fixes put where the hijacked token embedding reads them, so a TI name in
    the prompt is its vectors, as in the conditioning, not its name's words. None when the
    encoder is not A1111's custom-words wrapper."""
    hijack = getattr(ccm, "hijack", None)
    if not hasattr(ccm, "tokenize_line") or hijack is None:
        return None
    chunks = [ccm.tokenize_line(literal(text))[0][0] for text in texts]
    tokens = torch.tensor([chunk.tokens for chunk in chunks], dtype=torch.long)
    if ccm.id_end != ccm.id_pad:  # SD2: what follows the end token is padding (process_tokens)
        for row, chunk in enumerate(chunks):
            tokens[row, chunk.tokens.index(ccm.id_end) + 1:] = ccm.id_pad
    hijack.fixes = [chunk.fixes for chunk in chunks]
    return tokens


@contextlib.contextmanager
def _fixes_cleared(ccm):
    # the embedding layer clears the fixes it reads; if the encoder fails first, clear them
    # here so they cannot land on the host's next prompt
    try:
        yield
    finally:
        if getattr(ccm, "hijack", None) is not None:
            ccm.hijack.fixes = None


def _open_clip_pooled(model, texts, tokens=None):
    """SD 2.x's embedding from ldm's open_clip model: the EOS row of the penultimate layer's
    output after ln_final, as ldm's FrozenOpenCLIPEmbedder (layer "penultimate") encodes and
    as diffusers' 23-layer SD2 text encoder, which the trainer reads, pools it."""
    import open_clip

    if tokens is None:
        tokens = open_clip.tokenize(texts)
    tokens = tokens.to(model.positional_embedding.device)
    x = model.token_embedding(tokens) + model.positional_embedding
    batch_first = getattr(model.transformer, "batch_first", False)
    if not batch_first:
        x = x.permute(1, 0, 2)
    for block in model.transformer.resblocks[:-1]:  # the last block is not SD2's
        x = block(x, attn_mask=model.attn_mask)
    if not batch_first:
        x = x.permute(1, 0, 2)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)].float().cpu()


def prompt_schedules(prompts: list[str], schedule, dedupe: bool = True) -> list[list[str]]:
    """Every text each prompt's conditioning is computed from (prompt editing ``[a:b:n]``,
    alternation), with A1111's own parser, over `schedule` (steps, hires steps or None, old
    scheduling) as the web UI schedules that pass; the prompt itself if it has none."""
    steps, hires_steps, old = schedule
    try:
        from modules import prompt_parser

        schedules = prompt_parser.get_learned_conditioning_prompt_schedules(
            list(prompts), max(1, int(steps)), hires_steps, old)
    except ImportError:
        return [[p] for p in prompts]
    out = []
    for prompt, sched in zip(prompts, schedules):
        texts = []
        for _, text in sched:
            if not dedupe or text not in texts:
                texts.append(text)
        out.append(texts or [prompt])
    return out


def total_steps(sampler_name, steps: int) -> int:
    """The model calls a sampler makes in `steps` steps, over which the web UI schedules prompt
    editing (twice the steps for second-order samplers: sd_samplers_common.SamplerData)."""
    try:
        from modules import sd_samplers

        config = sd_samplers.find_sampler_config(sampler_name)
    except ImportError:
        return int(steps)
    return int(config.total_steps(steps)) if config is not None else int(steps)


def option(key: str, default=None):
    try:
        from modules import shared
    except ImportError:
        return default
    value = getattr(shared.opts, key, None) if hasattr(shared, "opts") else None
    return default if value in (None, "") else value


def models_path() -> str:
    try:
        from modules import paths

        return paths.models_path
    except (ImportError, AttributeError):
        return os.path.abspath("models")


def unhype_dir() -> str:
    return option("unhype_dir") or os.path.join(models_path(), "UnHype")


def lora_dir() -> str:
    custom = option("unhype_lora_dir")
    if custom:
        return custom
    try:
        from modules import shared

        if getattr(shared.cmd_opts, "lora_dir", None):
            return shared.cmd_opts.lora_dir
    except (ImportError, AttributeError):
        pass
    return os.path.join(models_path(), "Lora")


def current_model():
    from modules import shared

    return shared.sd_model


def default_tag_strength() -> float:
    try:
        return float(option("extra_networks_default_multiplier", 1.0))
    except (TypeError, ValueError):
        return 1.0
