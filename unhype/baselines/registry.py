"""Build a baseline by name for the harness: `build(name, generator, backend, erased, ps)`."""

from __future__ import annotations

from unhype.errors import UnHypeError

BASELINES = ("negative_prompt", "uce", "esd_x", "esd_u", "spm")
# the baselines that train (minutes on the toy, hours on SD): {name: the layers they train}
TRAINED = {"esd_x": "xattn", "esd_u": "non_xattn", "spm": "all"}
UCE_TEMPLATES = ("{}", "a {}", "a picture of a {}", "a photo of a {}")
UCE_PRESERVE_SCALE = 10.0


def training_settings(name: str, steps: int = 300, seed: int = 0):
    """The `esd.StaticSettings` a trained baseline (one of TRAINED) is trained with."""
    from unhype.baselines.esd import StaticSettings

    if name == "spm":
        return StaticSettings(steps=steps, seed=seed, rank=1, anchor_weight=1.0)
    if name in TRAINED:
        return StaticSettings(steps=steps, seed=seed)
    raise UnHypeError(f"{name} is not a trained baseline; trained: {', '.join(TRAINED)}")


def build(name: str, generator, backend, erased: list[str], ps, steps: int = 300, seed: int = 0,
          progress: bool = False):
    """`erased`: class names of the prompt set `ps`; `backend`: a trainer backend (ESD/SPM train
    on it), `generator`: the harness generator over the same model."""
    from unhype.baselines import esd as esd_mod

    if name == "negative_prompt":
        from unhype.baselines.negative_prompt import NegativePromptMethod

        return NegativePromptMethod(generator, erased)
    if name == "uce":
        from unhype.baselines.uce import uce

        idx = {ps.index(w) for w in erased}
        preserve = [w for i, words in enumerate(ps.classes.values()) if i not in idx for w in words]
        # preserve_scale 10: on the toy's 64-d text space, UCE's default (max(0.1, 1/#prompts))
        # changed retained prompts' keys/values more than the erased ones' (measured proxy)
        return uce(generator, erased, preserve, UCE_TEMPLATES, preserve_scale=UCE_PRESERVE_SCALE)
    if name in ("esd_x", "esd_u"):
        return esd_mod.esd(backend, erased, name[-1], training_settings(name, steps, seed),
                           progress)
    if name == "spm":
        return esd_mod.spm(backend, erased, training_settings(name, steps, seed), progress)
    raise UnHypeError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
