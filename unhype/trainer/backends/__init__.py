"""Backends: the frozen base model behind one interface (`unhype.trainer.backends.base.Backend`)."""

from __future__ import annotations

import sys

from unhype.errors import UnHypeError

TRAINABLE_FAMILIES = ("sd1", "sd2", "sdxl", "toy", "flux", "toy_flux")
TOY_FAMILIES = ("toy", "toy_flux")  # tiny, always fp32: the precision and memory options skip them
# trainer.memory's options: with any of them the models are built on the CPU (Backend.stage)
MEMORY_OPTIONS = ("fp8_base", "nf4_base", "cache_text_encoder_outputs")


def load_backend(cfg):
    """The backend for a validated TrainConfig (model path, family, precision, device)."""
    family = cfg.model_family if cfg.model_family != "auto" else None
    if family is not None and family not in TRAINABLE_FAMILIES:
        raise UnHypeError(f"--model_family {family}: the trainer supports "
                          f"{', '.join(TRAINABLE_FAMILIES)}")
    path = cfg.pretrained_model_name_or_path
    if not path:
        raise UnHypeError("no model given: pass --pretrained_model_name_or_path (a diffusers "
                          "folder, a single-file .safetensors, or 'toy')")
    if cfg.mixed_precision != "no" and (path in TOY_FAMILIES or family in TOY_FAMILIES):
        print(f"unhype: --mixed_precision {cfg.mixed_precision}: the toy models always run "
              "in float32 (they are tiny); the option applies to SD and FLUX models",
              file=sys.stderr)
    if path == "toy" or family == "toy":
        from unhype.trainer.backends.toy import ToyBackend

        return ToyBackend(cfg.device, path if path != "toy" else None)
    if path == "toy_flux" or family == "toy_flux":
        from unhype.trainer.backends.toy_flux import ToyFluxBackend

        return ToyFluxBackend(cfg.device, path if path != "toy_flux" else None,
                              cfg.guidance_scale)
    from unhype.trainer.backends import flux

    # with a memory option the models are built on the CPU and the denoiser reaches the device
    # only once trainer.memory has made it small (Backend.stage / place_denoiser)
    staged = any(cfg.values.get(name) for name in MEMORY_OPTIONS)
    device = "cpu" if staged else cfg.device
    if family == "flux" or flux.is_flux_model(path, cfg.model_config):
        if cfg.v_parameterization:
            raise UnHypeError("--v_parameterization: FLUX predicts the flow velocity")
        if cfg.zero_terminal_snr:
            raise UnHypeError("--zero_terminal_snr: FLUX is a rectified flow, not a DDPM "
                              "schedule")
        backend = flux.load_flux(path, cfg.model_config, device, cfg.mixed_precision,
                                 cfg.resolution, cfg.guidance_scale)
    else:
        from unhype.trainer.backends.diffusers_sd import load_diffusers

        backend = load_diffusers(path, family, cfg.model_config, device, cfg.mixed_precision,
                                 cfg.resolution)
        if cfg.v_parameterization:
            backend.set_prediction_type("v_prediction")
        if cfg.zero_terminal_snr:
            backend.set_zero_terminal_snr()
        backend.check_schedule()
    if staged:
        backend.stage(cfg.device)
    return backend
