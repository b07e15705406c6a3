"""Which UnHype family a ComfyUI model is, from its model config class
(``comfy.supported_models``, ``type(model.model.model_config).__name__``).

Only the exact text-to-image classes of the supported families count, in the 2024-03 ComfyUI
and current ones alike. Neither a subclass walk nor the context width is used: ComfyUI derives
SD_X4Upscaler and LotusD (an upscaler, a depth estimator) from SD20 and FLUX.2 from Flux, and
SVD / SV3D (1024-d context) and Stable Zero123 (768-d) are image-conditioned video / 3D models
that would pass a width rule. SD 2.1 unCLIP is SD 2.1 with an image-embedding input beside the
same text cross-attention, so SD 2.x files apply to it; inpainting and instruct-pix2pix
variants of a family take its files too (its UNet with more input channels).
"""

from __future__ import annotations

FAMILY_BY_CONFIG = {
    "SD15": "sd1", "SD15_instructpix2pix": "sd1",
    "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2",
    "SDXL": "sdxl", "SDXL_instructpix2pix": "sdxl",
    "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux",
}
SUPPORTED = "SD 1.x, SD 2.x, SDXL and FLUX.1"
PRUNED_SDXL = ("SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B")


def config_name(model) -> str | None:
    """The model config class name of a ComfyUI MODEL (ModelPatcher), or None."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else None


def family_of(name: str | None) -> str | None:
    """The UnHype family of ComfyUI model config class `name`; None when UnHype has none."""
    return FAMILY_BY_CONFIG.get(name or "")


def family_problem(name: str | None, file_name: str, file_family: str) -> str | None:
    """Why a hypernetwork file of `file_family` does not fit a model of ComfyUI config class
    `name`; None when it fits."""
    family = family_of(name)
    if family == file_family:
        return None
    if name == "SDXLRefiner":
        return (f"UnHype: this model is the SDXL refiner (OpenCLIP-G only); UnHype erases in "
                f"the SDXL base pass: apply {file_name} to the base model's MODEL, and let the "
                "refiner refine what the erased base drew")
    if name in PRUNED_SDXL:
        return (f"UnHype: this model is a pruned / distilled SDXL (ComfyUI's {name}: SSD-1B, "
                f"Vega, KOALA), which lacks most of the SDXL layers {file_name} was trained "
                "on: not supported")
    if family is None:
        return (f"UnHype: {file_name} is for {file_family}, but this model is ComfyUI's "
                f"{name or 'unknown model type'}, which UnHype does not support (UnHype "
                f"supports {SUPPORTED} text-to-image models)")
    return (f"UnHype: {file_name} was trained for {file_family} but the model is {family}; "
            "load a hypernetwork for this model family")


def clip_problem(width: int | None, loaded, node: str) -> str | None:
    """Why a CLIP whose pooled vectors are `width`-d (None: it gives none) cannot embed prompts
    for hypernetwork `loaded` in node `node`; None when it can. A width other than the file's
    embedding is another model family's text encoder (SD1's CLIP-L and FLUX's are both 768-d:
    the width cannot tell those apart)."""
    meta = loaded.meta
    source = meta.embedding.get("source", "?")
    if width == meta.config.embed_dim:
        return None
    what = "gives no pooled output" if width is None else f"gives {width}-d pooled vectors"
    return (f"{node}: this CLIP {what}, but {loaded.path.name} reads {source} "
            f"({meta.config.embed_dim}-d): it is another model family's CLIP; connect the text "
            f"encoder of the {meta.family} model the file is for")
