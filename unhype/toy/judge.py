"""Judges of toy images: an independent CNN classifier and zero-shot CLIP classification.

`JudgeNet` is a small CNN trained on ground-truth rendered images (never on generated ones) with
one head for the shape and one for the colour. `zero_shot_classify` is the generic CLIP path the
evaluation uses with open_clip on real models; the toy CLIP provides the same three callables
(`unhype.toy.clip.ToyClipParts`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unhype.atomic import atomic_path, atomic_write_text
from unhype.toy import data


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32, n_shapes: int = len(data.SHAPES),
                 n_colours: int = len(data.COLOURS)):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                 nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w),
                                      nn.MaxPool2d(2), block(2 * w, 4 * w),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.shape_head = nn.Linear(4 * w, n_shapes)
        self.colour_head = nn.Linear(4 * w, n_colours)
        self.config = {"width": width, "n_shapes": n_shapes, "n_colours": n_colours}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (shape [N, S], colour [N, C]) for images [N, 3, H, W] in [0, 1]."""
        h = self.features(images * 2 - 1)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (shape index, colour index) per image."""
        self.eval()
        shapes, colours = [], []
        for i in range(0, len(images), batch):
            s, c = self(images[i:i + batch].float())
            shapes.append(s.argmax(1)), colours.append(c.argmax(1))
        return torch.cat(shapes), torch.cat(colours)


def _augment(images: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Noise and mild blur, so the judge tolerates a generator's imperfect pixels."""
    n = len(images)
    blur = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 16
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"),
                       blur.expand(3, 1, 3, 3).contiguous(), groups=3)
    amount = torch.rand(n, 1, 1, 1, generator=rng) * (torch.rand(n, 1, 1, 1, generator=rng) < 0.5)
    images = images + amount * (blurred - images)
    sigma = torch.rand(n, 1, 1, 1, generator=rng) * 0.08
    return (images + sigma * torch.randn(images.shape, generator=rng)).clamp(0, 1)


def train_judge(seed: int, steps: int = 1200, batch: int = 128, progress=None) -> JudgeNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    trng = torch.Generator().manual_seed(seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    net.train()
    for step in range(steps):
        images, s, c = data.render_batch(batch, rng)
        images = _augment(torch.from_numpy(images), trng)
        ls, lc = net(images)
        loss = F.cross_entropy(ls, torch.from_numpy(s)) + F.cross_entropy(lc, torch.from_numpy(c))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
    return net.eval()


def heldout_accuracy(net: JudgeNet, n: int = 2000, seed: int = 12345) -> tuple[float, float]:
    """(shape, colour) accuracy on freshly rendered images the judge never saw."""
    images, s, c = data.render_batch(n, np.random.default_rng(seed))
    ps, pc = net.classify(torch.from_numpy(images))
    return (float((ps.numpy() == s).mean()), float((pc.numpy() == c).mean()))


def save_judge(net: JudgeNet, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    atomic_write_text(out_dir / "config.json", json.dumps(
        {**net.config, "shapes": list(data.SHAPES), "colours": list(data.COLOURS)},
        indent=2) + "\n")


def load_judge(weights: Path | None = None) -> JudgeNet:
    from safetensors.torch import load_file

    from unhype.toy.model import weights_dir

    folder = Path(weights if weights is not None else weights_dir()) / "judge"
    config = json.loads((folder / "config.json").read_text())
    net = JudgeNet(config["width"], config["n_shapes"], config["n_colours"])
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def zero_shot_classify(images: torch.Tensor, class_prompts: Sequence[str | Sequence[str]],
                       image_encoder: Callable[[torch.Tensor], torch.Tensor],
                       text_encoder: Callable[[object], torch.Tensor],
                       tokenizer: Callable[[list[str]], object],
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP zero-shot classification: (predicted class index [N], probabilities [N, K]).

    `class_prompts[k]` is a prompt or a list of prompts (an ensemble, embeddings averaged) for
    class k. The callables are CLIP's: `tokenizer(list[str])`, `text_encoder(tokens) -> [M, E]`,
    `image_encoder(images) -> [N, E]` (e.g. open_clip's `model.encode_text` / `encode_image`
    with its preprocessing folded in, or `ToyClipParts`).
    """
    class_embeds = []
    for prompts in class_prompts:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        e = F.normalize(text_encoder(tokenizer(prompts)).float(), dim=-1).mean(0)
        class_embeds.append(F.normalize(e, dim=-1))
    text = torch.stack(class_embeds)
    img = F.normalize(image_encoder(images).float(), dim=-1)
    probs = (100.0 * img @ text.to(img.device).T).softmax(-1)
    return probs.argmax(-1), probs
