"""Before/after sample grids per concept: the base model and the model with the generated LoRA.

Rows: the concept's prompt, its synonyms and two retained prompts (or `--sample_prompts`);
columns: `sample_seeds` images from the base model, then the same seeds with the hypernetwork's
LoRA (s = T, conditional branch only, as the hosts apply it). PNGs under <output_dir>/samples/.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import torch

from unhype.trainer.concepts import fill, read_lines


def prompt_sets(run) -> list[tuple[str, list[str]]]:
    if run.cfg.sample_prompts:
        return [("custom", read_lines(Path(run.cfg.sample_prompts)))]
    retained = run.retain_prompts[:: max(1, len(run.retain_prompts) // 2)][:2]
    sets = []
    for c in run.concepts:
        tpl = c.templates[0]
        sets.append((c.target, [fill(tpl, c.target)] + [fill(tpl, s) for s in c.synonyms[:3]]
                     + retained))
    return sets


@torch.no_grad()
def generate(run, prompts: list[str], seeds: int, steps: int, with_lora: bool,
             seed: int) -> torch.Tensor:
    """[len(prompts) * seeds, 3, H, W] images; the same noise for before and after."""
    b = run.backend
    all_prompts = [p for p in prompts for _ in range(seeds)]
    cond = b.encode(all_prompts)
    uncond = run.uncond.index(torch.zeros(len(all_prompts), dtype=torch.long))
    gen = torch.Generator().manual_seed(seed)
    lora, rows = None, None
    if with_lora:
        factors = run.hypernet(b.embed(all_prompts).to(b.device))
        run.lora.set(factors, torch.arange(len(all_prompts)))
        lora, rows = run.lora, torch.arange(len(all_prompts))
    try:
        z = b.sample(cond, uncond, gen, steps, run.guidance, lora=lora, rows=rows)
    finally:
        run.lora.clear()
    return b.decode(z)


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 1) -> Path:
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def grid_stem(name: str) -> str:
    """A file name stem for a concept: the name itself when it is short and plain, else a
    plain prefix and a hash of the name (non-Latin or long names stay apart and fit)."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
        return name
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:40].rstrip("_")
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]
    return f"{slug}-{digest}" if slug else f"concept-{digest}"


class SampleGrids:
    def __init__(self, run):
        self.run = run
        self.sets = prompt_sets(run)
        self.cfg = run.cfg
        self.base: dict[str, torch.Tensor] = {}
        self.folder = run.out_dir / "samples"

    def before(self, progress: bool = False):
        from tqdm import tqdm

        k = self.cfg.sample_seeds
        with tqdm(total=sum(len(p) for _, p in self.sets) * k, unit="img", dynamic_ncols=True,
                  desc="unhype train: sample grids (base model)", file=sys.stderr,
                  disable=not progress) as bar:
            for name, prompts in self.sets:
                self.base[name] = generate(self.run, prompts, k, self.cfg.sample_steps, False,
                                           self.cfg.seed)
                bar.update(len(prompts) * k)

    def after(self, step: int) -> list[Path]:
        paths = []
        for name, prompts in self.sets:
            after = generate(self.run, prompts, self.cfg.sample_seeds, self.cfg.sample_steps,
                             True, self.cfg.seed)
            k = self.cfg.sample_seeds
            before = self.base[name].reshape(len(prompts), k, *after.shape[1:])
            after = after.reshape(len(prompts), k, *after.shape[1:])
            both = torch.cat([before, after], dim=1).flatten(0, 1)
            slug = grid_stem(name)
            scale = max(1, 128 // both.shape[-1])
            paths.append(save_grid(both, len(prompts),
                                   self.folder / f"{slug}-step{step:06d}.png", scale))
            (self.folder / f"{slug}-prompts.txt").write_text(
                "rows (left: base model, right: with the hypernetwork):\n" + "\n".join(prompts)
                + "\n")
        return paths
