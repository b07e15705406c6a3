"""The frozen base model as the trainer sees it: text conditioning, a denoiser call, DDIM + CFG.

A backend wraps a diffusers-style UNet2DConditionModel and a DDIM scheduler. Subclasses only say
how prompts become conditioning (`encode`), which vector the hypernetwork reads (`embed`) and how
latents become images (`decode`); sampling and the denoiser call are shared. Outputs stay in the
model's native prediction space (epsilon, v or x0 = "sample"): the ESD target is built there.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unhype.errors import UnHypeError


@dataclass
class Cond:
    """Conditioning for N prompts: cross-attention states and extra UNet inputs (SDXL)."""

    hidden: Tensor  # [N, L, C]
    added: dict | None = None  # {"text_embeds": [N, P], "time_ids": [N, 6]} for SDXL

    def index(self, idx) -> "Cond":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.hidden.device)
        added = None if self.added is None else {k: v[idx.to(v.device)] for k, v in self.added.items()}
        return Cond(self.hidden[idx], added)

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        added = None
        if conds[0].added is not None:
            added = {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
        return Cond(torch.cat([c.hidden for c in conds]), added)


def latent_preview(latents: Tensor) -> Tensor:
    """Images of a model without a VAE (tiny test models): the first three latent channels,
    min-max scaled to [0, 1]."""
    x = latents[:, :3].float()
    return ((x - x.amin()) / (x.amax() - x.amin() + 1e-8)).cpu()


class Backend:
    """Base model wrapper. Attributes set by subclasses: family, unet, scheduler, device, dtype."""

    family = None
    unet: nn.Module
    scheduler = None
    device = torch.device("cpu")
    dtype = torch.float32
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    default_guidance = 7.5
    description = ""

    # --- what subclasses provide -------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def embed(self, prompts: list[str]) -> Tensor:
        """The hypernetwork's input: [N, D] fp32 (the family's embedding source)."""
        raise NotImplementedError

    def checked_embedding(self, vec: Tensor) -> Tensor:
        """`vec` as fp32 if it has the family's embedding width, else a clear error."""
        if vec.shape[-1] != self.family.embedding.dim:
            raise UnHypeError(f"the text encoder gives {vec.shape[-1]}-d vectors; family "
                              f"{self.family.name} reads {self.family.embedding.source} "
                              f"({self.family.embedding.dim}-d). Wrong --model_family?")
        return vec.float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [N, 3, H, W] in [0, 1] (for sample grids)."""
        raise NotImplementedError

    def default_synonyms(self, target: str) -> list[str]:
        """Synonyms a backend knows for a target (the toy's vocabulary); [] otherwise."""
        return []

    def default_retain_prompts(self, concepts) -> list[str] | None:
        """Backends with a closed vocabulary (the toy) supply their own retain set."""
        return None

    # --- shared ------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def set_prediction_type(self, kind: str) -> None:
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise UnHypeError(f"unknown prediction type {kind!r}")
        self.scheduler = type(self.scheduler).from_config(self.scheduler.config,
                                                          prediction_type=kind)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.scheduler.config.get("rescale_betas_zero_snr", False))

    def set_zero_terminal_snr(self) -> None:
        """Rescale the noise schedule to zero terminal SNR (Lin et al. 2024), as the model was
        trained; sampling then starts at the last timestep ("trailing" spacing)."""
        self.scheduler = type(self.scheduler).from_config(
            self.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")

    def check_schedule(self) -> None:
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise UnHypeError("zero terminal SNR needs a v-prediction model (an epsilon model "
                              "cannot denoise pure noise: its x0 estimate divides by zero); add "
                              "--v_parameterization or drop --zero_terminal_snr")

    def freeze(self) -> None:
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def modules(self) -> list[nn.Module]:
        return [self.unet]

    def nonfinite_weights(self) -> list[str]:
        """Names of the frozen model's parameters holding NaN/Inf (read only when a loss went
        NaN, to tell a damaged checkpoint from a training that diverged)."""
        bad = []
        for module in self.modules():
            for name, param in module.named_parameters():
                try:
                    if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                        bad.append(f"{type(module).__name__}.{name}")
                except (RuntimeError, NotImplementedError):  # packed / fp8 storage
                    continue
        return bad

    # --- loading for the memory options: the denoiser waits on the CPU ----------------------
    staged = False
    shrunk: str | None = None  # trainer.memory.shrink's note once the denoiser is fp8 / NF4

    def stage(self, device) -> None:
        """Built on the CPU for `unhype.trainer.memory`: the text encoders go to `device` now (every
        prompt is encoded next), the denoiser and the VAE wait on the CPU until
        `place_denoiser`, after the memory options have stored the denoiser in fp8 and sent
        the text encoders away, so the device never holds the full-precision model (FLUX.1-dev:
        31 GiB in bf16 with its text encoders, 14 GiB after both options)."""
        self.device = torch.device(device)
        for module in self.text_modules():
            module.to(self.device)
        self.staged = True

    def place_denoiser(self) -> None:
        """Move what `stage` kept on the CPU to the device (nothing if it was not staged)."""
        if not self.staged:
            return
        text = {id(m) for m in self.text_modules()}
        for module in self.modules():
            if id(module) not in text:
                module.to(self.device)
        self.staged = False

    # --- text encoders off the device (--cache_text_encoder_outputs) ------------------------
    text_offloaded = False

    def text_modules(self) -> list[nn.Module]:
        """The modules that only turn prompts into conditioning (none for the toy models)."""
        return []

    def offload_text_encoders(self) -> None:
        """Keep the text encoders in CPU memory: the trainer encodes its prompts once, up
        front, so they are needed on the device only for the odd later call (sample grids, the
        gate reference at save time), which `text_on_device` brings them back for."""
        for module in self.text_modules():
            module.to("cpu")
        self.text_offloaded = True

    @contextlib.contextmanager
    def text_on_device(self, *modules: nn.Module):
        """`modules` (default: every text module) on the device for one encoding, then back to
        the CPU if the encoders are offloaded."""
        moved = (list(modules) or self.text_modules()) if self.text_offloaded else []
        for module in moved:
            module.to(self.device)
        try:
            yield
        finally:
            for module in moved:
                module.to("cpu")

    def predict(self, z: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The denoiser's native output for latents z [N, ...] at timesteps t [N]."""
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(z.shape[0])
        kwargs = {}
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = {k: v.to(self.device, self.dtype)
                                           for k, v in cond.added.items()}
        out = self.unet(z.to(self.dtype), t, encoder_hidden_states=cond.hidden.to(self.dtype),
                        **kwargs, return_dict=False)[0]
        return out.float()

    def make_scheduler(self, steps: int):
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def initial_noise(self, n: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn((n, *self.latent_shape), generator=generator)
        return (noise * self.scheduler.init_noise_sigma).to(self.device)

    def guided(self, z: Tensor, t, cond: Cond, uncond: Cond, guidance: float, lora=None,
               rows: Tensor | None = None) -> Tensor:
        """One CFG prediction: [uncond; cond] in one batch; `lora` only on the cond rows."""
        n = z.shape[0]
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(n)
        if guidance == 1.0:
            if lora is not None:
                lora.set_rows(rows)
            return self.predict(z, t, cond)
        if lora is not None:
            lora.set_rows(torch.cat([torch.full((n,), -1, dtype=torch.long), rows]))
        both = self.predict(torch.cat([z, z]), torch.cat([t, t]), Cond.cat([uncond, cond]))
        out_u, out_c = both.chunk(2)
        return out_u + guidance * (out_c - out_u)

    @torch.no_grad()
    def sample(self, cond: Cond, uncond: Cond, generator: torch.Generator, steps: int,
               guidance: float, stop: int | None = None, lora=None, rows=None,
               record=None) -> Tensor:
        """DDIM + CFG from pure noise; stop after `stop` of `steps` steps (None: to the end).

        `record(z_t, t, cond_output, uncond_output)` is called before each step with the current
        latents and both branches' outputs (the latent cache is built without extra passes).
        """
        n = cond.hidden.shape[0]
        scheduler = self.make_scheduler(steps)
        z = self.initial_noise(n, generator)
        timesteps = scheduler.timesteps[: steps if stop is None else stop]
        for t in timesteps:
            z_in = scheduler.scale_model_input(z, t)
            if record is not None and lora is None:
                tt = t.reshape(1).expand(n).to(self.device)
                both = self.predict(torch.cat([z_in, z_in]), torch.cat([tt, tt]),
                                    Cond.cat([uncond, cond]))
                out_u, out_c = both.chunk(2)
                record(z_in, tt, out_c, out_u)
                out = out_u + guidance * (out_c - out_u)
            else:
                out = self.guided(z_in, t, cond, uncond, guidance, lora, rows)
            z = scheduler.step(out, t, z, use_clipped_model_output=True, return_dict=False)[0]
        return z

    def partial_sample(self, cond: Cond, uncond: Cond, generator: torch.Generator, steps: int,
                       guidance: float) -> tuple[Tensor, Tensor]:
        """ESD's z_t: stop DDIM at a random step; returns (z_t scaled for the model, t [N])."""
        stop = int(torch.randint(0, steps, (1,), generator=generator))
        z = self.sample(cond, uncond, generator, steps, guidance, stop=stop)
        scheduler = self.make_scheduler(steps)
        t = scheduler.timesteps[stop]
        n = z.shape[0]
        return scheduler.scale_model_input(z, t), t.reshape(1).expand(n).to(self.device)

    def info(self) -> str:
        snr = ", zero terminal SNR" if self.zero_terminal_snr else ""
        return (f"{self.description} (family {self.family.name}, prediction "
                f"{self.prediction_type}{snr}, dtype {str(self.dtype).replace('torch.', '')})")
