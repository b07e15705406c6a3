"""What a single-file SD checkpoint predicts (epsilon or v) and whether its schedule has zero
terminal SNR, read the way ComfyUI and Forge read it when they load the same file.

* ``v_pred`` key: the file predicts v (ComfyUI writes it when it saves a v-prediction model;
  NoobAI-XL V-Pred and other v-prediction SDXL fine-tunes ship it); ``ztsnr`` key: its noise
  schedule was rescaled to zero terminal SNR (ComfyUI ``supported_models.SDXL.model_type``,
  Forge ``backend/loader.py``).
* SD 2.x files carry no marker; both hosts guess from one weight: 768-v models have a spread
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` (standard deviation above 0.09), base
  models a narrow one (ComfyUI ``supported_models.SD20.model_type``).
* EDM files (Playground v2.5: ``edm_mean`` / ``edm_std``; CosXL: ``edm_vpred.sigma_max``) sample
  on a continuous sigma schedule the trainer's DDIM steps do not reproduce: refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from unhype.errors import UnHypeError

SD2_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_PROBE_KEY = f"model.diffusion_model.{SD2_PROBE}"
SD2_V_STD = 0.09  # ComfyUI's threshold
EDM_REFUSAL = ("an EDM model ({kind}: continuous sigma schedule); the trainer samples with DDIM "
               "on the 1000-step schedule and would learn from wrong images: not supported")


@dataclass(frozen=True)
class Prediction:
    kind: str          # "epsilon" or "v_prediction"
    zero_snr: bool     # the schedule is rescaled to zero terminal SNR
    reason: str        # why, for the log line
    stated: bool       # the file says so (a v_pred / ztsnr key), not a guess from its weights

    def describe(self) -> str:
        snr = ", zero terminal SNR" if self.zero_snr else ""
        return f"predicts {'v' if self.kind == 'v_prediction' else 'epsilon'}{snr} ({self.reason})"


def checkpoint_prediction(path, family: str) -> Prediction:
    """The prediction of single-file checkpoint `path` (a .safetensors of family `family`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if "edm_vpred.sigma_max" in keys or {"edm_mean", "edm_std"} <= keys:
                kind = "CosXL" if "edm_vpred.sigma_max" in keys else "Playground v2.5"
                raise UnHypeError(f"{path}: " + EDM_REFUSAL.format(kind=kind))
            zero_snr = "ztsnr" in keys
            if "v_pred" in keys:
                return Prediction("v_prediction", zero_snr, "its v_pred key", True)
            if family == "sd2" and SD2_PROBE_KEY in keys:
                std = float(f.get_tensor(SD2_PROBE_KEY).float().std(unbiased=False))
                kind = "v_prediction" if std > SD2_V_STD else "epsilon"
                sign = ">" if kind == "v_prediction" else "<="
                return Prediction(kind, zero_snr, f"SD 2.x rule of ComfyUI and Forge: std of "
                                  f"{SD2_PROBE} {std:.3f} {sign} "
                                  f"{SD2_V_STD}", zero_snr)
    except UnHypeError:
        raise
    except Exception as exc:
        raise UnHypeError(f"{path}: not a readable .safetensors checkpoint ({exc})") from None
    return Prediction("epsilon", zero_snr, "no v_pred key", zero_snr)
