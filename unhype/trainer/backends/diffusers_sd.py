"""Stable Diffusion 1.x / 2.x / XL through diffusers: a pipeline folder or a single-file checkpoint.

SD1/SD2: cross-attention reads the text encoder's last hidden state; the hypernetwork reads its
pooled output (EOS token after the final layer norm, unprojected). SD2 768-v models predict v
(the scheduler config says so; `--v_parameterization` forces it). SDXL: both encoders' penultimate
hidden states concatenated, the bigG encoder's projected pooled vector as `text_embeds` (which is
also what the hypernetwork reads) and the size/crop `time_ids`.

Single-file checkpoints (A1111/ComfyUI `.safetensors`) load with diffusers `from_single_file`,
offline, against a diffusers config folder: `--model_config <folder>`, or a built-in one for the
standard architectures (unhype.model_configs: SD 1.5, SD 2.x v / base, SDXL epsilon / v). What
the file predicts, and a zero-terminal-SNR schedule, are read from it as ComfyUI and Forge read
them (unhype.checkpoint_prediction).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from unhype.trainer.backends.base import Backend, Cond, latent_preview
from unhype.trainer.backends.preflight import (CHANNELS_REFUSAL, FLUX_ONLY, check_sd_folder,
                                              pipeline_class)
from unhype.errors import UnHypeError
from unhype.families import get_family


def detect_family(unet_config: dict) -> str:
    cross = unet_config.get("cross_attention_dim")
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    return {768: "sd1", 1024: "sd2"}.get(cross, "sd1" if cross and cross < 1024 else "sd2")


REFINER_REFUSAL = ("{what}; UnHype trains on the SDXL base model, and its files erase there "
                   "(the refiner only refines what the base drew)")


def folder_family(path: Path) -> str:
    config = path / "unet" / "config.json"
    if not config.is_file():
        pipeline = pipeline_class(path)
        if pipeline:
            raise UnHypeError(f"{path}: a {pipeline} folder (no unet/); {FLUX_ONLY}: not "
                              "supported")
        raise UnHypeError(f"{path}: not a diffusers pipeline folder (unet/config.json missing)")
    unet = json.loads(config.read_text())
    check_sd_folder(path, unet)
    family = detect_family(unet)
    if family == "sdxl" and (unet.get("cross_attention_dim") == 1280 or
                             not (path / "text_encoder").is_dir()):
        raise UnHypeError(f"{path}: " + REFINER_REFUSAL.format(
            what="an SDXL refiner (OpenCLIP-G only, 1280-d context)"))
    return family


class DiffusersSD(Backend):
    """SD1 / SD2 / SDXL from diffusers components (tokenizers, text encoders, unet, scheduler)."""

    def __init__(self, family: str, unet, scheduler, tokenizers, text_encoders, vae=None,
                 device="cpu", dtype=torch.float32, resolution: int | None = None,
                 description: str = "diffusers model"):
        from diffusers import DDIMScheduler

        self.family = get_family(family)
        self.device, self.dtype = torch.device(device), dtype
        self.unet = unet.to(self.device, dtype)
        self.tokenizers, self.text_encoders = list(tokenizers), [
            te.to(self.device, dtype) for te in text_encoders]
        self.vae = vae.to(self.device, dtype) if vae is not None else None
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.description = description
        self.sdxl = self.family.name == "sdxl"
        if self.sdxl and len(self.text_encoders) != 2:
            raise UnHypeError("an SDXL model needs two text encoders (text_encoder, "
                              "text_encoder_2)")
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        size = resolution or unet.config.sample_size * scale
        self.image_size = size
        self.latent_shape = (unet.config.in_channels, size // scale, size // scale)
        self.freeze()

    def modules(self):
        return [self.unet, *self.text_encoders] + ([self.vae] if self.vae is not None else [])

    def text_modules(self):
        return list(self.text_encoders)

    def _tokens(self, tokenizer, prompts):
        return tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def _run(self, prompts):
        with self.text_on_device():
            return [enc(self._tokens(tok, prompts), output_hidden_states=True)
                    for tok, enc in zip(self.tokenizers, self.text_encoders)]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        outs = self._run(prompts)
        if not self.sdxl:
            return Cond(outs[0].last_hidden_state.float())
        hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1).float()
        n = len(prompts)
        size = self.image_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        return Cond(hidden, {"text_embeds": outs[1].text_embeds.float(),
                             "time_ids": time_ids.expand(n, 6).to(self.device)})

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        outs = self._run(prompts)
        return self.checked_embedding(outs[1].text_embeds if self.sdxl else outs[0].pooler_output)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latent_preview(latents)
        scale = getattr(self.vae.config, "scaling_factor", 0.18215)
        images = self.vae.decode(latents.to(self.dtype) / scale, return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def _dtype(mixed_precision: str):
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_diffusers(path: str, family: str | None, model_config: str | None, device: str,
                   mixed_precision: str = "no", resolution: int | None = None) -> DiffusersSD:
    """Load a diffusers pipeline folder or a single-file checkpoint (`single_file_config`)."""
    src = Path(path)
    dtype = _dtype(mixed_precision)
    if src.is_dir():
        detected = folder_family(src)
        if family and family != detected:
            raise UnHypeError(f"{src} holds an {detected} model (unet/config.json), but "
                              f"--model_family {family} was given")
        return _from_folder(src, detected, device, dtype, resolution)
    if not src.is_file():
        raise UnHypeError(f"--pretrained_model_name_or_path {path}: no such file or folder "
                          "(give a diffusers pipeline folder or a single-file .safetensors; "
                          "downloading from the Hugging Face hub is not supported here)")
    if src.suffix.lower() not in (".safetensors",):
        raise UnHypeError(f"{src}: only .safetensors checkpoints are loaded (no .ckpt/.pt "
                          "pickles); convert it first")
    cfg_dir, prediction = single_file_config(src, family, model_config)
    detected = folder_family(cfg_dir)
    if family and family != detected:
        raise UnHypeError(f"--model_config {cfg_dir} describes an {detected} model, but "
                          f"--model_family {family} was given")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if detected == "sdxl" else StableDiffusionPipeline
    try:
        pipe = cls.from_single_file(str(src), config=str(cfg_dir), local_files_only=True,
                                    torch_dtype=dtype)
    except Exception as exc:
        raise UnHypeError(f"{src}: diffusers could not load it with the config {cfg_dir} "
                          f"({type(exc).__name__}: {exc})") from None
    backend = _from_pipe(pipe, detected, device, dtype, resolution, f"single file {src.name}")
    if prediction is not None:
        if prediction.kind != backend.prediction_type:
            print(f"unhype: {src.name} {prediction.describe()}: overrides the {cfg_dir.name} "
                  f"scheduler's {backend.prediction_type}", file=sys.stderr)
            backend.set_prediction_type(prediction.kind)
        if prediction.zero_snr:
            backend.set_zero_terminal_snr()
    return backend


def not_a_checkpoint(src: Path) -> str | None:
    """What a .safetensors file is when it is plainly no base-model checkpoint (an UnHype
    hypernetwork, a LoRA, no tensors), else None; a file that is not safetensors at all, or is
    truncated or corrupt, gets read_header's error."""
    from unhype.fileformat import FORMAT_NAME, read_header

    metadata, infos = read_header(src)
    if metadata.get("format") == FORMAT_NAME:
        return "an UnHype hypernetwork (what `unhype train` writes)"
    if any(k.startswith("ss_") for k in metadata) or \
            any(".lora_down." in k or ".lora_A." in k for k in infos):
        return "a LoRA"
    if not infos:
        return "a safetensors file without tensors"
    return None


def single_file_config(src: Path, family: str | None, model_config: str | None):
    """(the diffusers config folder to load single-file checkpoint `src` with, what the file
    predicts or None). The folder is `model_config` when that is a folder, else a built-in one
    (unhype.model_configs: sd15, sd2-v, sd2-base, sdxl-base, sdxl-v; `model_config` may name
    it) for the checkpoint's family, read from its header, and for what it predicts
    (unhype.checkpoint_prediction). The prediction returned overrides the folder's scheduler;
    a user's folder is overridden only by what the file states (a v_pred / ztsnr key), not by
    the SD 2.x weight rule."""
    from unhype.checkpoint_prediction import checkpoint_prediction
    from unhype.model_check import (REFINER, checkpoint_family, checkpoint_header,
                                    checkpoint_input_channels, unsupported_checkpoint)
    from unhype.model_configs import BUILTIN, builtin_for, config_folder

    what = not_a_checkpoint(src)
    if what:
        raise UnHypeError(f"{src}: this is {what}, not a base model; "
                          "--pretrained_model_name_or_path takes the model itself (a diffusers "
                          "folder or a single-file checkpoint)")
    named = model_config if model_config in BUILTIN and not Path(model_config).is_dir() else None
    if model_config and not named:
        cfg_dir = Path(model_config)
        if not (cfg_dir / "model_index.json").is_file():
            raise UnHypeError(f"--model_config {cfg_dir}: not a diffusers config folder "
                              f"(model_index.json missing) nor a built-in config "
                              f"({', '.join(BUILTIN)})")
        found = checkpoint_family(src)
        prediction = checkpoint_prediction(src, found) if found else None
        return cfg_dir, (prediction if prediction is not None and prediction.stated else None)
    header = checkpoint_header(src)
    found = checkpoint_family(src, header)
    channels = checkpoint_input_channels(src, header)
    if channels not in (None, 4):
        raise UnHypeError(f"{src}: " + CHANNELS_REFUSAL.format(channels=channels))
    unsupported = unsupported_checkpoint(src, header)
    if unsupported and unsupported.kind == REFINER:
        raise UnHypeError(f"{src}: {REFINER_REFUSAL.format(what=unsupported.text)}")
    if unsupported:
        raise UnHypeError(f"{src}: {unsupported.text}; UnHype trains SD 1.x / 2.x / XL and "
                          "FLUX.1: not supported")
    if found not in ("sd1", "sd2", "sdxl"):
        raise UnHypeError(f"{src}: no SD 1.x / 2.x / XL UNet found in this checkpoint's keys "
                          f"({found or 'none recognised'}); give --model_config <a diffusers "
                          "folder of the same architecture>")
    if family and family != found:
        raise UnHypeError(f"{src} holds an {found} UNet, but --model_family {family} was given")
    prediction = checkpoint_prediction(src, found)
    name = builtin_for(found, named, prediction.kind)
    if BUILTIN[name][2] != prediction.kind:  # the user named a config that disagrees
        print(f"unhype: {src.name} {prediction.describe()}, but --model_config {name} predicts "
              f"{BUILTIN[name][2]}: following --model_config", file=sys.stderr)
        prediction = replace(prediction, kind=BUILTIN[name][2])
    print(f"unhype: {src.name}: {found} checkpoint, {prediction.describe()}; loaded with the "
          f"built-in {name} config ({BUILTIN[name][4]}); --model_config <folder> to use another",
          file=sys.stderr)
    return config_folder(name), prediction


def _from_folder(src: Path, family: str, device, dtype, resolution):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler")
        tokenizers = [CLIPTokenizer.from_pretrained(src / "tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(src / "text_encoder", torch_dtype=dtype)]
        if family == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(src / "tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(
                src / "text_encoder_2", torch_dtype=dtype))
        vae = None
        if (src / "vae" / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype)
    except UnHypeError:
        raise
    except (OSError, ValueError) as exc:
        raise UnHypeError(f"{src}: incomplete diffusers folder ({exc})") from None
    return DiffusersSD(family, unet, scheduler, tokenizers, encoders, vae, device, dtype,
                       resolution, f"diffusers folder {src.name}")


def _from_pipe(pipe, family, device, dtype, resolution, description):
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return DiffusersSD(family, pipe.unet, pipe.scheduler, tokenizers, encoders, pipe.vae,
                       device, dtype, resolution, description)
