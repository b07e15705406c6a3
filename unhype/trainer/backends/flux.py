"""FLUX (rectified flow) through diffusers: a pipeline folder or a single-file transformer.

The transformer predicts the velocity v = noise - x0 of diffusers' FlowMatch convention
(z_sigma = (1 - sigma) x0 + sigma noise), so the ESD target v_a - eta (v_p - v_a) is built in
velocity space (`unhype.trainer.losses.esd_target` is linear in the prediction; the coefficients sum to
one, so it is the same target as in x0 or noise space). z_t comes from the frozen model sampled
with `FlowMatchEulerDiscreteScheduler` from pure noise, stopped at a random step.

Guidance: a guidance-distilled transformer (`guidance_embeds`, FLUX.1-dev) runs one pass with
the guidance value as an input (default 3.5), and the LoRA is on that pass; a transformer
without it (FLUX.1-schnell, the toy flow model) uses CFG with [uncond; cond] rows, LoRA on the
cond rows. Text: T5 hidden states + CLIP-L pooled vector via `FluxPipeline.encode_prompt`; the
hypernetwork reads the same CLIP-L pooled vector (family `flux`). Packing, image ids and the
Euler sampler are `unhype.flow_latents`, shared with the toy flow model.

`self.unet` is the transformer (the name the trainer loop uses for "the denoiser").
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from unhype.trainer.backends.base import Backend, Cond, latent_preview
from unhype.trainer.backends.preflight import check_flux_file, check_flux_folder
from unhype import flow_latents
from unhype.errors import UnHypeError
from unhype.families import get_family

DEV_GUIDANCE = 3.5
SCHNELL_CFG = 1.0
DEFAULT_RESOLUTION = 512  # training images; FLUX.1 samples at 1024, ESD-style training at 512


class FluxBackend(Backend):
    """A FluxTransformer2DModel and its text conditioning; subclasses change `_text`/`embed`."""

    description = "FLUX model"

    def __init__(self, transformer, scheduler, family: str = "flux", device="cpu",
                 dtype=torch.float32, latent_hw: tuple[int, int] = (64, 64),
                 guidance: float | None = None, description: str | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.family = get_family(family)
        self.device, self.dtype = torch.device(device), dtype
        self.unet = self.transformer = _to(transformer, self.device, dtype)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.distilled = bool(transformer.config.guidance_embeds)
        self.default_guidance = DEV_GUIDANCE if self.distilled else SCHNELL_CFG
        # the guidance input of the distilled model for every prediction (sampling and ESD)
        self.embedded_guidance = guidance if guidance is not None else self.default_guidance
        channels = transformer.config.in_channels // 4
        h, w = latent_hw
        if h % 2 or w % 2:
            raise UnHypeError(f"FLUX latents are packed in 2x2 patches: {h}x{w} must be even")
        self.latent_shape = (channels, h, w)
        self.description = description or self.description

    # --- packing -----------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, H/2 * W/2, 4C]."""
        return flow_latents.pack(latents)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        _, h, w = self.latent_shape
        return flow_latents.unpack(packed, h, w)

    def image_ids(self) -> torch.Tensor:
        _, h, w = self.latent_shape
        return flow_latents.image_ids(h, w, self.device, self.dtype)

    # --- what subclasses provide -------------------------------------------------------------
    def _text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence states [N, L, joint_attention_dim], pooled [N, pooled_projection_dim])."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        hidden, pooled = self._text(list(prompts))
        return Cond(hidden.float(), {"pooled_projections": pooled.float()})

    # --- the denoiser ------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return "flow_velocity"

    def set_prediction_type(self, kind: str) -> None:
        raise UnHypeError("FLUX predicts the rectified-flow velocity; --v_parameterization "
                          "does not apply")

    @property
    def zero_terminal_snr(self) -> bool:
        return False

    def set_zero_terminal_snr(self) -> None:
        raise UnHypeError("FLUX is a rectified flow; --zero_terminal_snr does not apply")

    def predict(self, z: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        """Velocity for packed latents z [N, S, 4C] at scheduler timesteps t (0..1000) [N]."""
        n = z.shape[0]
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32).reshape(-1).expand(n)
        guidance = None
        if self.distilled:
            guidance = torch.full((n,), float(self.embedded_guidance), device=self.device)
        hidden = cond.hidden.to(self.device, self.dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=self.device, dtype=self.dtype)
        out = self.transformer(
            hidden_states=z.to(self.dtype), timestep=(t / 1000).to(self.dtype),
            guidance=guidance, pooled_projections=cond.added["pooled_projections"].to(
                self.device, self.dtype),
            encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=self.image_ids(),
            return_dict=False)[0]
        return out.float()

    def make_scheduler(self, steps: int):
        """FlowMatchEuler with FluxPipeline's sigmas (1 .. 1/steps) and resolution shift."""
        _, h, w = self.latent_shape
        return flow_latents.make_scheduler(self.scheduler.config, steps, h, w, self.device)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return flow_latents.initial_noise(n, self.latent_shape, generator, self.device)

    def guided(self, z, t, cond: Cond, uncond: Cond, guidance: float, lora=None, rows=None):
        """Distilled: one pass with the guidance input (LoRA on every row). Otherwise CFG."""
        if self.distilled:
            if lora is not None:
                lora.set_rows(rows)
            saved = self.embedded_guidance
            self.embedded_guidance = guidance
            try:
                return self.predict(z, t, cond)
            finally:
                self.embedded_guidance = saved
        return super().guided(z, t, cond, uncond, guidance, lora, rows)

    @torch.no_grad()
    def sample(self, cond: Cond, uncond: Cond, generator: torch.Generator, steps: int,
               guidance: float, stop: int | None = None, lora=None, rows=None,
               record=None) -> torch.Tensor:
        """Euler on the flow from pure noise; stop after `stop` of `steps` steps.

        `record(z_t, t, cond_output, uncond_output)` as in the base class; for a distilled model
        the "uncond" output is the prediction for the empty prompt at the same guidance input
        (one extra pass, made only when recording: an empty anchor reuses it)."""
        n = cond.hidden.shape[0]
        if record is not None and self.distilled:
            self._check_guidance(guidance)

        def velocity(i, t, z):
            tt = t.reshape(1).expand(n).to(self.device)
            if record is None or lora is not None:
                return self.guided(z, tt, cond, uncond, guidance, lora, rows)
            if self.distilled:
                out_c = self.predict(z, tt, cond)
                out_u = self.predict(z, tt, uncond)
                out = out_c
            else:
                both = self.predict(torch.cat([z, z]), torch.cat([tt, tt]),
                                    Cond.cat([uncond, cond]))
                out_u, out_c = both.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            record(z, tt, out_c, out_u)
            return out

        scheduler = self.make_scheduler(steps)
        return flow_latents.euler(self.initial_noise(n, generator), scheduler, velocity, stop)

    def _check_guidance(self, guidance: float):
        if float(guidance) != float(self.embedded_guidance):
            raise UnHypeError(f"guidance {guidance} differs from the backend's guidance input "
                              f"{self.embedded_guidance}; pass it when loading the backend")

    def partial_sample(self, cond: Cond, uncond: Cond, generator: torch.Generator, steps: int,
                       guidance: float):
        """ESD's z_t: stop the flow sampler at a random step; (packed z_t, t [N])."""
        stop = int(torch.randint(0, steps, (1,), generator=generator))
        z = self.sample(cond, uncond, generator, steps, guidance, stop=stop)
        t = self.make_scheduler(steps).timesteps[stop]
        return z, t.reshape(1).expand(z.shape[0]).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latent_preview(self.unpack(latents.float()))

    def info(self) -> str:
        mode = (f"distilled guidance input {self.embedded_guidance:g}" if self.distilled
                else "CFG")
        return (f"{self.description} (family {self.family.name}, rectified-flow velocity, "
                f"{mode}, latent {'x'.join(map(str, self.latent_shape))}, dtype "
                f"{str(self.dtype).replace('torch.', '')})")


class DiffusersFlux(FluxBackend):
    """FLUX.1 from diffusers components: transformer, CLIP-L + T5 text encoders, optional VAE."""

    def __init__(self, transformer, scheduler, tokenizer, text_encoder, tokenizer_2,
                 text_encoder_2, vae=None, device="cpu", dtype=torch.float32,
                 resolution: int | None = None, guidance: float | None = None,
                 max_sequence_length: int = 512, description: str = "diffusers FLUX"):
        from diffusers import FluxPipeline

        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        size = resolution or DEFAULT_RESOLUTION
        if size % (vae_scale * 2):
            raise UnHypeError(f"--resolution {size}: FLUX needs a multiple of {vae_scale * 2}")
        super().__init__(transformer, scheduler, "flux", device, dtype,
                         (size // vae_scale, size // vae_scale), guidance, description)
        self.image_size = size
        self.vae = _to(vae, self.device, dtype) if vae is not None else None
        self.max_sequence_length = min(max_sequence_length, tokenizer_2.model_max_length)
        # the pipeline object only lends its encode_prompt (no denoising through it)
        self.pipe = FluxPipeline(scheduler=self.scheduler, vae=None,
                                 text_encoder=_to(text_encoder, self.device, dtype),
                                 tokenizer=tokenizer,
                                 text_encoder_2=_to(text_encoder_2, self.device, dtype),
                                 tokenizer_2=tokenizer_2, transformer=self.transformer)
        self.freeze()

    def modules(self):
        return [self.transformer, self.pipe.text_encoder, self.pipe.text_encoder_2] + (
            [self.vae] if self.vae is not None else [])

    def text_modules(self):
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    @torch.no_grad()
    def _text(self, prompts):
        with _quiet(), self.text_on_device():
            hidden, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, max_sequence_length=self.max_sequence_length)
        return hidden, pooled

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        with _quiet(), self.text_on_device(self.pipe.text_encoder):  # CLIP-L only, not T5
            vec = self.pipe._get_clip_prompt_embeds(list(prompts), device=self.device)
        return self.checked_embedding(vec)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return super().decode(latents)
        z = self.unpack(latents.float())
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(z.to(self.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()


@contextlib.contextmanager
def _quiet():
    """Silence the per-prompt truncation warnings of diffusers/transformers while encoding
    (retained-prompt sets are long; a prompt over the token limit is truncated, as in FLUX)."""
    loggers = [logging.getLogger(n) for n in ("diffusers.pipelines.flux.pipeline_flux",
                                              "transformers.tokenization_utils_base")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _to(module, device, dtype):
    """Move; cast only when needed (loaders already give `dtype`; diffusers warns on casts)."""
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module


# --- loading ------------------------------------------------------------------------------------
def _dtype(mixed_precision: str):
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def is_flux_folder(path: Path) -> bool:
    """A diffusers folder of the FLUX line (FLUX.1 or a relative `load_flux` refuses by name)."""
    index = path / "model_index.json"
    if index.is_file():
        try:
            return "Flux" in json.loads(index.read_text()).get("_class_name", "")
        except ValueError:
            return False
    return (path / "transformer" / "config.json").is_file()


def is_flux_file(path: Path) -> bool:
    """A single-file transformer, by its tensor names: FLUX.1 (BFL or diffusers layout), or one
    sharing its blocks (Chroma, FLUX.2, HunyuanVideo, SD3) that `load_flux` refuses by name."""
    from unhype.model_check import checkpoint_architecture

    return checkpoint_architecture(path) is not None


CONFIG_HELP = ("a local diffusers FLUX folder of the same model (model_index.json, "
               "transformer/config.json, scheduler/, text_encoder/ + tokenizer/ (CLIP-L) and "
               "text_encoder_2/ + tokenizer_2/ (T5) with their weights; the transformer "
               "weights are not needed), e.g. a copy of black-forest-labs/FLUX.1-dev")


def load_flux(path: str, model_config: str | None, device: str, mixed_precision: str = "no",
              resolution: int | None = None, guidance: float | None = None) -> DiffusersFlux:
    """A diffusers FLUX folder, or a single-file transformer + `model_config` folder."""
    src = Path(path)
    dtype = _dtype(mixed_precision)
    if src.is_dir():
        if not (src / "transformer" / "config.json").is_file():
            raise UnHypeError(f"{src}: not a diffusers FLUX folder (transformer/config.json "
                              "missing)")
        check_flux_folder(src)
        transformer = _load(lambda: _transformer_cls().from_pretrained(
            src, subfolder="transformer", torch_dtype=dtype), src)
        return _assemble(transformer, src, device, dtype, resolution, guidance,
                         f"diffusers FLUX folder {src.name}")
    if not src.is_file():
        raise UnHypeError(f"--pretrained_model_name_or_path {path}: no such file or folder "
                          "(give a diffusers FLUX folder or a single-file transformer "
                          ".safetensors with --model_config)")
    if src.suffix.lower() != ".safetensors":
        raise UnHypeError(f"{src}: only .safetensors checkpoints are loaded (no .ckpt/.pt "
                          "pickles); convert it first")
    check_flux_file(src)
    if not model_config:
        raise UnHypeError(f"{src} is a single-file FLUX transformer; loading it offline needs "
                          f"--model_config <{CONFIG_HELP}>; the text encoders come from there")
    cfg_dir = Path(model_config)
    if not (cfg_dir / "transformer" / "config.json").is_file():
        raise UnHypeError(f"--model_config {cfg_dir}: not a diffusers FLUX folder "
                          f"(transformer/config.json missing); it must be {CONFIG_HELP}")
    check_flux_folder(cfg_dir, "--model_config ")
    transformer = _load(lambda: _transformer_cls().from_single_file(
        str(src), config=str(cfg_dir), subfolder="transformer", local_files_only=True,
        torch_dtype=dtype), src, f" with --model_config {cfg_dir}")
    return _assemble(transformer, cfg_dir, device, dtype, resolution, guidance,
                     f"single-file FLUX {src.name}")


def _transformer_cls():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def _load(fn, src, how=""):
    try:
        return fn()
    except UnHypeError:
        raise
    except Exception as exc:  # diffusers raises OSError/ValueError/KeyError/RuntimeError here
        raise UnHypeError(f"{src}: diffusers could not load the FLUX transformer{how} "
                          f"({type(exc).__name__}: {exc})") from None


def _assemble(transformer, folder: Path, device, dtype, resolution, guidance, description):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    for sub in ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if not (folder / sub).is_dir():
            raise UnHypeError(f"{folder}: {sub}/ missing; a FLUX folder needs scheduler/, "
                              "text_encoder/ + tokenizer/ (CLIP-L) and text_encoder_2/ + "
                              "tokenizer_2/ (T5)")
    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
        tokenizer_2 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
        text_encoder_2 = T5EncoderModel.from_pretrained(folder / "text_encoder_2",
                                                        torch_dtype=dtype)
        vae = None
        if (folder / "vae" / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UnHypeError(f"{folder}: incomplete diffusers FLUX folder ({exc})") from None
    return DiffusersFlux(transformer, scheduler, tokenizer, text_encoder, tokenizer_2,
                         text_encoder_2, vae, device, dtype, resolution, guidance,
                         description=description)


def is_flux_model(path: str, model_config: str | None = None) -> bool:
    """Whether `path` (folder or single file, with its config folder) holds a FLUX model."""
    src = Path(path)
    if src.is_dir():
        return is_flux_folder(src)
    if model_config and Path(model_config).is_dir() and is_flux_folder(Path(model_config)):
        return True
    return src.is_file() and src.suffix.lower() == ".safetensors" and is_flux_file(src)
