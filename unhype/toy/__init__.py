"""UnHype's embedded toy world: a tiny text-to-image model trained here on CPU, with its judge.

Modules: `data` (shapes, colours, synonyms, captions, renderer), `clip` (toy CLIP towers and
tokenizer), `model` (the loadable model and its sampler), `train` (denoiser training), `judge`
(CNN and zero-shot CLIP classification), `build` / `report` / `grid` / `cli` (`unhype toy ...`).
"""

DEFAULT_STEPS = 12  # the toy sampler's steps (unhype.toy.model); here without torch, for help
