"""Build a baseline by name for the harness: `build(name, generator, backend, erased, ps)`."""

from __future__ import annotations

from unhype.errors import UnHypeError

BASELINES = ("negative_prompt", "uce", "esd_x", "esd_u", "spm")
UCE_TEMPLATES = ("{}", "a {}", "a picture of a {}", "a photo of a {}")
UCE_PRESERVE_SCALE = 10.0


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
        settings = esd_mod.StaticSettings(steps=steps, seed=seed)
        return esd_mod.esd(backend, erased, name[-1], settings, progress)
    if name == "spm":
        settings = esd_mod.StaticSettings(steps=steps, seed=seed, rank=1, anchor_weight=1.0)
        return esd_mod.spm(backend, erased, settings, progress)
    raise UnHypeError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
