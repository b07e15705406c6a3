"""Classifiers of generated images: zero-shot CLIP (open_clip or the toy CLIP) and the toy judge.

Every classifier has `class_names` and `predict(images [N, 3, H, W] in [0, 1]) -> [N]` class
indices. `ZeroShotCLIP` also gives the CLIP score (100 * max(cos(image, prompt), 0), as in the
literature). open_clip weights come from a local `.safetensors` state dict (offline; never a
pickle) or, with network access, an open_clip pretrained tag; `--clip toy` uses the toy CLIP
through exactly the same code (`unhype.toy.judge.zero_shot_classify`'s three callables).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from unhype.errors import UnHypeError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ZeroShotCLIP:
    def __init__(self, image_encoder: Callable, text_encoder: Callable, tokenizer: Callable,
                 class_names: Sequence[str], class_prompts: Sequence[Sequence[str]],
                 description: str = "CLIP"):
        self.image_encoder, self.text_encoder, self.tokenizer = image_encoder, text_encoder, tokenizer
        self.class_names = list(class_names)
        self.class_prompts = [list(p) for p in class_prompts]
        self.description = description
        self._class_embeds = None

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.text_encoder(self.tokenizer(list(prompts))).float(), dim=-1)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def class_embeds(self) -> torch.Tensor:
        if self._class_embeds is None:
            self._class_embeds = torch.stack(
                [F.normalize(self.text_embeds(p).mean(0), dim=-1) for p in self.class_prompts])
        return self._class_embeds

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        img = self.image_embeds(images)
        return (100.0 * img @ self.class_embeds().to(img.device).T).softmax(-1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.probs(images).argmax(-1).cpu()

    @torch.no_grad()
    def clip_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[N] 100 * max(cos(image_i, prompt_i), 0)."""
        img = self.image_embeds(images)
        txt = self.text_embeds(prompts).to(img.device)
        return (100.0 * (img * txt).sum(-1)).clamp(min=0).cpu()


class JudgeClassifier:
    """The toy's CNN judge (trained on rendered ground truth), mapped onto a prompt set's classes."""

    description = "toy judge CNN"

    def __init__(self, class_names: Sequence[str], weights=None):
        from unhype.toy import data
        from unhype.toy.judge import load_judge

        self.class_names = list(class_names)
        unknown = [c for c in self.class_names if c not in data.SHAPES]
        if unknown:
            raise UnHypeError(f"the toy judge knows only toy shapes; not: {unknown}")
        self.net = load_judge(weights)
        self._map = torch.tensor([self.class_names.index(s) if s in self.class_names else -1
                                  for s in data.SHAPES])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self._map[self.net.classify(images.float().cpu())[0]]

    @torch.no_grad()
    def confidence(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """[N] the judge's top shape probability: ~1 for a clean shape (base images: 0.998),
        low for a texture or a broken picture."""
        self.net.eval()
        out = [self.net(images[i:i + batch].float().cpu())[0].softmax(1).max(1).values
               for i in range(0, len(images), batch)]
        return torch.cat(out) if out else torch.empty(0)


def _resize_normalise(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[0, 1] images -> CLIP input: bicubic resize of the short side, centre crop, normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", align_corners=False,
                      antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def load_open_clip(model: str, weights: str | None = None, device: str = "cpu"):
    """(image_encoder, text_encoder, tokenizer) callables of an open_clip model.

    `model`: an open_clip model name ("ViT-B-32") or a model-config .json file; `weights`: a local
    .safetensors state dict, an open_clip pretrained tag ("openai", needs network), or None
    (random weights: tests only)."""
    import open_clip

    name = model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise UnHypeError(f"--clip {model}: no such open_clip config file")
        open_clip.add_model_config(path)
        name = path.stem
    if open_clip.get_model_config(name) is None:
        raise UnHypeError(f"--clip {model}: not an open_clip model name "
                          f"(e.g. ViT-B-32, ViT-L-14) or config .json")
    pretrained = None
    state = None
    if weights:
        wpath = Path(weights)
        if wpath.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise UnHypeError(f"--clip_weights {weights}: only .safetensors are loaded (no pickle)")
        if wpath.suffix == ".safetensors":
            if not wpath.is_file():
                raise UnHypeError(f"--clip_weights {weights}: no such file")
            from safetensors.torch import load_file

            state = load_file(str(wpath))
        else:
            pretrained = weights  # an open_clip tag; open_clip downloads it (network needed)
    with _quiet_random_init_warning(state is not None):
        clip = open_clip.create_model(name, pretrained=pretrained, device=device)
    if state is not None:
        try:
            missing, unexpected = clip.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # torch's "size mismatch for ..." list
            first = str(exc).split("\n\t")[1:2] or [str(exc)]
            raise UnHypeError(f"--clip_weights {weights}: not weights of {name} "
                              f"({first[0].strip()})") from None
        if missing:
            raise UnHypeError(f"--clip_weights {weights}: not weights of {name} "
                              f"({len(missing)} missing keys, e.g. {missing[:3]})")
    clip = clip.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean, std = pp.get("mean", OPENAI_MEAN), pp.get("std", OPENAI_STD)

    def image_encoder(images):
        return clip.encode_image(_resize_normalise(images.to(device), size, mean, std))

    def text_encoder(tokens):
        return clip.encode_text(tokens.to(device))

    return image_encoder, text_encoder, tokenizer


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" when it builds a
    model whose weights we load from a local file right after: a false alarm, filtered."""
    class Drop(logging.Filter):
        def filter(self, record):
            return "initialized randomly" not in record.getMessage()

    root, drop = logging.getLogger(), Drop()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_classifier(spec: str, class_names, class_prompts, weights: str | None = None,
                    device: str = "cpu", toy_weights=None):
    """`spec`: 'toy' (toy CLIP), 'judge' (toy CNN judge) or an open_clip model name / config."""
    if spec == "judge":
        return JudgeClassifier(class_names, toy_weights)
    if spec == "toy":
        from unhype.toy.clip import ToyClipParts
        from unhype.toy.model import weights_dir

        folder = Path(toy_weights or weights_dir())
        if not (folder / "image_encoder").is_dir():
            raise UnHypeError(f"the toy CLIP has no image tower in {folder} (image_encoder/ "
                              "missing); use --classifier judge")
        parts = ToyClipParts(folder, device)
        return ZeroShotCLIP(parts.image_encoder, parts.text_encoder, parts.tokenizer,
                            class_names, class_prompts, "toy CLIP (zero-shot)")
    enc_i, enc_t, tok = load_open_clip(spec, weights, device)
    return ZeroShotCLIP(enc_i, enc_t, tok, class_names, class_prompts,
                        f"open_clip {spec} ({weights or 'random weights'}, zero-shot)")
