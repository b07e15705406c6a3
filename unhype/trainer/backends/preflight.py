"""Refuse a model the trainer cannot train on, from its config files and safetensors header,
before any weight is loaded: models that share a supported family's classes but not what the
trainer does with them (inpainting / control inputs, an EDM schedule, FLUX.2, Kontext).

The trainer erases from the images a text-to-image model draws: SD 1.x / 2.x / XL UNets with
4 latent input channels on a DDPM beta schedule (its DDIM sampler), and FLUX.1 dev / schnell
transformers whose input is the packed latent alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from unhype.checkpoint_prediction import EDM_REFUSAL
from unhype.errors import UnHypeError

CHANNELS_REFUSAL = ("its UNet takes {channels} input channels (an inpainting or instruct "
                    "model); the trainer erases with text-to-image models: train on the base "
                    "model, whose file the hosts also apply to this one")
FLUX_CHANNELS_REFUSAL = ("its transformer reads {inp} input channels for {out} output ones: an "
                         "inpainting / control FLUX (FLUX.1 Fill, Canny, Depth), which needs "
                         "an image besides the prompt; train on FLUX.1 dev / schnell")
FLUX_ONLY = "UnHype trains SD 1.x / 2.x / XL and FLUX.1 (dev / schnell)"


def _json(path: Path) -> dict:
    """A config file's table ({} when missing, unreadable or not a table)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pipeline_class(path: Path) -> str:
    """A diffusers folder's pipeline class (model_index.json's _class_name; '' without one)."""
    return str(_json(path / "model_index.json").get("_class_name", ""))


def check_sd_folder(path: Path, unet: dict) -> None:
    """A diffusers SD folder (or --model_config folder) with its unet/config.json `unet`: 4
    latent input channels and a scheduler on a DDPM beta schedule."""
    channels = unet.get("in_channels", 4)
    if channels != 4:
        raise UnHypeError(f"{path}: " + CHANNELS_REFUSAL.format(channels=channels))
    scheduler = _json(path / "scheduler" / "scheduler_config.json")
    if not scheduler:
        return  # a missing scheduler is diffusers' "incomplete folder" error, at load
    cls = scheduler.get("_class_name", "")
    betas = all(scheduler.get(k) is not None for k in ("beta_schedule", "beta_start",
                                                        "beta_end"))
    if cls.startswith("EDM") or not (betas or scheduler.get("trained_betas") is not None):
        kind = "Playground v2.5" if cls.startswith("EDM") else f"{cls or 'its scheduler'} " \
            "without beta_schedule / beta_start / beta_end"
        raise UnHypeError(f"{path}: " + EDM_REFUSAL.format(kind=kind))


def check_flux_folder(path: Path, what: str = "") -> None:
    """A diffusers FLUX folder (the model, or --model_config for a single file): a FLUX.1
    text-to-image pipeline and transformer."""
    where = f"{what}{path}"
    cls = pipeline_class(path)
    version = re.match(r"Flux(\d)", cls)
    if version:
        raise UnHypeError(f"{where}: a FLUX.{version.group(1)} pipeline ({cls}); {FLUX_ONLY}: "
                          f"FLUX.{version.group(1)} is another architecture (transformer, text "
                          "encoder), not supported")
    if "Kontext" in cls:
        raise UnHypeError(f"{where}: FLUX.1 Kontext ({cls}), an image-editing model; the "
                          "trainer erases with text-to-image models: train on FLUX.1 dev / "
                          "schnell")
    if cls.startswith(("FluxFill", "FluxControlPipeline", "FluxControlImg2Img",
                       "FluxControlInpaint")):
        raise UnHypeError(f"{where}: {cls}, an inpainting / control FLUX that needs an image "
                          "besides the prompt; train on FLUX.1 dev / schnell")
    if cls and not cls.startswith("Flux"):
        raise UnHypeError(f"{where}: a {cls} folder, not FLUX.1; {FLUX_ONLY}")
    config = _json(path / "transformer" / "config.json")
    if not config:
        return  # the caller names a missing transformer/config.json
    transformer = config.get("_class_name", "FluxTransformer2DModel")
    if transformer != "FluxTransformer2DModel":
        name = {"Flux2": "FLUX.2", "Chroma": "Chroma"}.get(
            re.sub(r"Transformer.*", "", transformer), transformer)
        raise UnHypeError(f"{where}: its transformer is {transformer} ({name}), not FLUX.1's "
                          f"FluxTransformer2DModel; {FLUX_ONLY}")
    check_flux_channels(where, config.get("in_channels"), config.get("out_channels"))


def check_flux_channels(where, inp: int | None, out: int | None) -> None:
    """FLUX.1 text-to-image reads and writes the same packed channels; Fill (x6) and Canny /
    Depth (x2) read the latent of a condition image too."""
    if inp is not None and out is not None and inp != out:
        raise UnHypeError(f"{where}: " + FLUX_CHANNELS_REFUSAL.format(inp=inp, out=out))


def check_flux_file(path: Path) -> None:
    """A single-file transformer: FLUX.1 (BFL or diffusers names), text-to-image. One header
    read."""
    from unhype.model_check import (checkpoint_architecture, checkpoint_header,
                                    unsupported_checkpoint)

    header = checkpoint_header(path)
    architecture = checkpoint_architecture(path, header)
    if architecture is None:
        raise UnHypeError(f"{path}: no FLUX.1 transformer tensors in this file (BFL names "
                          "double_blocks.* with vector_in, or diffusers names)")
    if architecture != "flux":
        raise UnHypeError(f"{path}: {unsupported_checkpoint(path, header).text}; {FLUX_ONLY}: "
                          "not supported")
    pairs = (("img_in.weight", "final_layer.linear.weight"),  # BFL names
             ("x_embedder.weight", "proj_out.weight"))  # diffusers names
    shapes = {k.removeprefix("model.diffusion_model."): v for k, v in header.shapes.items()}
    for first, last in pairs:
        if first in shapes and last in shapes:
            if len(shapes[first]) > 1 and shapes[last]:  # else the load names the odd file
                check_flux_channels(path, shapes[first][1], shapes[last][0])
            return
