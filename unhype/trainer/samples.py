"""Before/after sample grids per concept: the base model and the model with the generated LoRA.

Rows: the concept's prompt, its synonyms and two retained prompts (or `--sample_prompts`);
columns: `sample_seeds` images from the base model, then the same seeds with the hypernetwork's
LoRA (s = T, conditional branch only, as the hosts apply it). PNGs under <output_dir>/samples/.

A `--sample_prompts` line may end in kohya's per-prompt options: `--n` negative prompt, `--d`
seed, `--s` steps, `--l` (or `--g`) guidance scale are used; the others (`--w`, `--h`, `--ss`,
...) are cut off the prompt and named once as ignored.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unhype.errors import UnHypeError
from unhype.trainer.concepts import fill, read_lines


@dataclass(frozen=True)
class SamplePrompt:
    """One grid row; None: the run's setting (--seed, --sample_steps, --guidance_scale)."""
    text: str
    negative: str = ""
    seed: int | None = None
    steps: int | None = None
    scale: float | None = None


_OPTION = re.compile(r"([A-Za-z]+)\s+(.*\S)\s*$", re.S)


def parse_prompt(line: str, ignored: set | None = None) -> SamplePrompt:
    """A sample prompts line with kohya's options (` --n blurry --d 42`) cut off; options
    this sampler has no use for go into `ignored`."""
    text, *options = line.split(" --")
    found = {}
    for option in options:
        m = _OPTION.match(option.strip())
        key = m.group(1).lower() if m else option.strip().split(" ")[0].lower()
        try:
            if key == "n" and m:
                found["negative"] = m.group(2)
            elif key == "d" and m:
                found["seed"] = int(m.group(2))
            elif key == "s" and m:
                found["steps"] = max(1, min(1000, int(m.group(2))))
            elif key in ("l", "g") and m:
                found.setdefault("scale", float(m.group(2)))
            elif ignored is not None:
                ignored.add(f"--{key}")
        except ValueError:
            raise UnHypeError(f"sample prompt {line!r}: --{key} needs a number, got "
                              f"{m.group(2)!r}") from None
    return SamplePrompt(text.strip(), **found)


def read_sample_prompts(path: Path, ignored: set | None = None) -> list[SamplePrompt]:
    return [parse_prompt(line, ignored) for line in read_lines(path)]


def prompt_sets(run) -> list[tuple[str, list[SamplePrompt]]]:
    if run.cfg.sample_prompts:
        ignored: set = set()
        prompts = read_sample_prompts(Path(run.cfg.sample_prompts), ignored)
        if ignored:
            print(f"unhype train: --sample_prompts: ignored per-prompt option(s) "
                  f"{', '.join(sorted(ignored))} (the grids use --n, --d, --s, --l/--g; size "
                  "and sampler are the run's)", file=sys.stderr, flush=True)
        return [("custom", prompts)]
    retained = run.retain_prompts[:: max(1, len(run.retain_prompts) // 2)][:2]
    sets = []
    for c in run.concepts:
        tpl = c.templates[0]
        texts = [fill(tpl, c.target)] + [fill(tpl, s) for s in c.synonyms[:3]] + retained
        sets.append((c.target, [SamplePrompt(t) for t in texts]))
    return sets


@torch.no_grad()
def generate(run, prompts: list[SamplePrompt], seeds: int, steps: int, with_lora: bool,
             seed: int) -> torch.Tensor:
    """[len(prompts) * seeds, 3, H, W] images; the same noise for before and after. Prompts
    with the same options are sampled in one batch (all of them, without options)."""
    groups: dict = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.negative, p.seed, p.steps, p.scale), []).append(i)
    out = [None] * len(prompts)
    for (negative, own_seed, own_steps, scale), members in groups.items():
        images = _generate(run, [prompts[i].text for i in members], negative, seeds,
                           own_steps or steps, with_lora, seed if own_seed is None else own_seed,
                           run.guidance if scale is None else scale)
        for k, i in enumerate(members):
            out[i] = images[k * seeds:(k + 1) * seeds]
    return torch.cat(out)


def _generate(run, texts, negative, seeds, steps, with_lora, seed, guidance) -> torch.Tensor:
    b = run.backend
    all_prompts = [p for p in texts for _ in range(seeds)]
    cond = b.encode(all_prompts)
    if negative:
        uncond = b.encode([negative] * len(all_prompts))
    else:
        uncond = run.uncond.index(torch.zeros(len(all_prompts), dtype=torch.long))
    gen = torch.Generator().manual_seed(seed)
    lora, rows = None, None
    if with_lora:
        factors = run.hypernet(b.embed(all_prompts).to(b.device))
        run.lora.set(factors, torch.arange(len(all_prompts)))
        lora, rows = run.lora, torch.arange(len(all_prompts))
    try:
        z = b.sample(cond, uncond, gen, steps, guidance, lora=lora, rows=rows)
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
                "rows (left: base model, right: with the hypernetwork):\n"
                + "\n".join(p.text for p in prompts) + "\n")
        return paths
