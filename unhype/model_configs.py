"""Built-in diffusers config folders for the standard SD 1.5, SD 2.x and SDXL-base architectures.

A single-file checkpoint (the `.safetensors` A1111 and ComfyUI users have) holds weights only;
diffusers' `from_single_file(config=...)` reads every component's config, and the CLIP
tokenizer, from a diffusers folder, normally downloaded from the Hugging Face hub. These folders
make the same load work offline with nothing but the checkpoint:

* the UNet configs are the families' own (`unhype.families`, proven on the full-size
  architectures); the text encoders', VAE's and schedulers' are those of the reference
  repositories (stable-diffusion-v1-5, stable-diffusion-2-1(-base), stable-diffusion-xl-base-1.0);
* the CLIP tokenizer files are written from the BPE tokenizer the toy world ships
  (`unhype/toy/weights/tokenizer`: the same 49408-token vocabulary and 48894 merges).

What a file predicts picks between the configs of one family: SD 2.x 768-v or base, SDXL
epsilon or v (`unhype.checkpoint_prediction` reads it as ComfyUI and Forge do); the user may
name one instead.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

from unhype.errors import UnHypeError

VERSION = 1  # bump when a written file changes: the cache keys on it
TOY_TOKENIZER = Path(__file__).resolve().parent / "toy" / "weights" / "tokenizer" / "tokenizer.json"

# name -> (family, scheduler class, prediction type, image size, what it is for)
BUILTIN = {
    "sd15": ("sd1", "PNDMScheduler", "epsilon", 512, "SD 1.x (1.4, 1.5 and their fine-tunes)"),
    "sd2-v": ("sd2", "DDIMScheduler", "v_prediction", 768,
              "SD 2.x 768-v models (2.0-v, 2.1) that predict v"),
    "sd2-base": ("sd2", "PNDMScheduler", "epsilon", 512,
                 "SD 2.x 512 base models (2.0-base, 2.1-base) that predict epsilon"),
    "sdxl-base": ("sdxl", "EulerDiscreteScheduler", "epsilon", 1024,
                  "SDXL 1.0 base and its fine-tunes"),
    "sdxl-v": ("sdxl", "EulerDiscreteScheduler", "v_prediction", 1024,
               "SDXL fine-tunes that predict v (NoobAI-XL V-Pred and others with a v_pred key)"),
}
# (family, prediction) -> the built-in config a checkpoint of that kind loads with
FOR_PREDICTION = {("sd1", "epsilon"): "sd15", ("sd2", "v_prediction"): "sd2-v",
                  ("sd2", "epsilon"): "sd2-base", ("sdxl", "epsilon"): "sdxl-base",
                  ("sdxl", "v_prediction"): "sdxl-v"}

# transformers CLIPTextConfig of each text encoder (reference repositories' config.json)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
OPEN_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                   num_hidden_layers=23, projection_dim=512, hidden_act="gelu")  # SD2 drops 1
OPEN_CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                      num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")


def builtin_for(family: str, name: str | None = None, prediction: str = "epsilon") -> str:
    """The built-in config to use for a checkpoint of `family` that predicts `prediction`
    (`name` if the user gave one)."""
    if name is not None:
        if name not in BUILTIN:
            raise UnHypeError(f"unknown built-in config {name!r}; choose one of "
                              f"{', '.join(BUILTIN)} or give a diffusers config folder")
        if BUILTIN[name][0] != family:
            raise UnHypeError(f"built-in config {name!r} is for {BUILTIN[name][0]}, but the "
                              f"checkpoint is {family}")
        return name
    if (family, prediction) not in FOR_PREDICTION:
        raise UnHypeError(f"no built-in config for a {family} checkpoint that predicts "
                          f"{prediction}; give a diffusers folder of the same architecture")
    return FOR_PREDICTION[(family, prediction)]


def config_folder(name: str, cache: str | Path | None = None) -> Path:
    """The diffusers config folder of built-in config `name`, written once into the cache
    (``$UNHYPE_CACHE`` or ``~/.cache/unhype``; a temporary folder if that is not writable)."""
    if name not in BUILTIN:
        raise UnHypeError(f"unknown built-in config {name!r}; choose one of {', '.join(BUILTIN)}")
    root = Path(cache or os.environ.get("UNHYPE_CACHE") or Path.home() / ".cache" / "unhype")
    target = root / "model_configs" / f"{name}-v{VERSION}"
    if (target / "model_index.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError:
        return scratch_config_folder(name)
    try:
        write_config_folder(name, staging / name)
        try:
            os.replace(staging / name, target)
        except OSError:  # another process wrote it first
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_SCRATCH: dict[str, Path] = {}  # built-in configs written to /tmp by this process


def scratch_config_folder(name: str) -> Path:
    """Built-in config `name` in a temporary folder (the cache is not writable): written once
    per process and removed when it exits."""
    if name in _SCRATCH and (_SCRATCH[name] / "model_index.json").is_file():
        return _SCRATCH[name]
    staging = Path(tempfile.mkdtemp(prefix=f"unhype-{name}-"))
    atexit.register(shutil.rmtree, staging, True)
    _SCRATCH[name] = write_config_folder(name, staging / name)
    return _SCRATCH[name]


def write_config_folder(name: str, path: Path) -> Path:
    """Write the diffusers folder (configs and tokenizers, no weights) of `name` to `path`."""
    from unhype.families import get_family

    family, scheduler, prediction, size, _ = BUILTIN[name]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    xl = family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.27.0",
             "scheduler": ["diffusers", scheduler],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None],
                     requires_safety_checker=False)
    _write_json(path / "model_index.json", index)
    unet = {"_class_name": "UNet2DConditionModel", **get_family(family).config()}
    _write_json(path / "unet" / "config.json", unet)
    _write_json(path / "vae" / "config.json", _vae_config(size, xl))
    _write_json(path / "scheduler" / "scheduler_config.json",
                _scheduler_config(scheduler, prediction))
    encoders = [("", "CLIPTextModel", OPEN_CLIP_H if family == "sd2" else CLIP_L,
                 "!" if family == "sd2" else "<|endoftext|>")]
    if xl:
        encoders.append(("_2", "CLIPTextModelWithProjection", OPEN_CLIP_BIGG, "!"))
    for suffix, architecture, dims, pad in encoders:
        _write_json(path / f"text_encoder{suffix}" / "config.json", _clip_config(architecture,
                                                                                 dims))
        _write_tokenizer(path / f"tokenizer{suffix}", pad)
    return path


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _vae_config(size: int, xl: bool) -> dict:
    config = {"_class_name": "AutoencoderKL", "act_fn": "silu",
              "block_out_channels": [128, 256, 512, 512],
              "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
              "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
              "out_channels": 3, "sample_size": size,
              "up_block_types": ["UpDecoderBlock2D"] * 4,
              "scaling_factor": 0.13025 if xl else 0.18215}
    if xl:
        config["force_upcast"] = True
    return config


def _scheduler_config(cls: str, prediction: str) -> dict:
    config = {"_class_name": cls, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
              "prediction_type": prediction, "set_alpha_to_one": False, "skip_prk_steps": True,
              "steps_offset": 1, "clip_sample": False, "trained_betas": None}
    if cls == "EulerDiscreteScheduler":
        config.update(interpolation_type="linear", timestep_spacing="leading",
                      use_karras_sigmas=False, sample_max_value=1.0)
    return config


def _clip_config(architecture: str, dims: dict) -> dict:
    # bos 0 / eos 2 / pad 1 as in the reference repositories: transformers then pools at the
    # highest token id, the end-of-text token (49407), as ComfyUI and A1111 do
    return {"architectures": [architecture], "model_type": "clip_text_model",
            "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-05,
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
            "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1, "torch_dtype": "float32", **dims}


def _write_tokenizer(path: Path, pad: str) -> None:
    bpe = json.loads(TOY_TOKENIZER.read_text(encoding="utf-8"))["model"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False),
                                     encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                     encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad}
    _write_json(path / "special_tokens_map.json", special)
    _write_json(path / "tokenizer_config.json",
                {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                 "do_lower_case": True, "errors": "replace",
                 "add_prefix_space": False, **special})
