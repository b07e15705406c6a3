"""The evaluation harness: generate seeded images for the MACE prompt sets with each method, classify
them, and score Acc_e / Acc_s / Acc_g / H_o (and H_c, CLIP score).

Generators hide the model: `ToyGenerator` (the toy's own sampler, `ToyModel.sample`) and
`BackendGenerator` (any trainer backend: SD1/SD2/SDXL diffusers models, DDIM + CFG). Both run
the UNet on `[uncond rows; cond rows]` and tell the method the row map before every call, so a
method's LoRA reaches the conditional rows only. The k-th batch of every prompt set is sampled
with seed `seed + k * batch_size` whatever the method (the three sets are generated as one list,
erased + others + synonyms): each method sees the same noise.

Under `accelerate launch` (`dist`, unhype.distributed.Dist) the batches are dealt round-robin to
the processes (batch k to process k mod N), each keeping its seed `seed + k * batch_size`, and the
images are gathered before scoring: every image, and so every number, is the one a single
process makes.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor, nn

from unhype.distributed import Dist
from unhype.errors import UnHypeError
from unhype.evaluation.methods import Method
from unhype.evaluation.metrics import accuracy, h_c, h_o, paired_change
from unhype.evaluation.prompts import (PromptSet, build_sets, generality_kinds,
                                      parse_generality)
from unhype.evaluation.rows import Slot


class _NegativeContext(nn.Module):
    """Wraps a UNet: the first n rows (the unconditional half) attend to `negative` instead."""

    def __init__(self, unet: nn.Module, negative: Tensor):
        super().__init__()
        self.unet, self.negative = unet, negative

    def forward(self, sample, t, encoder_hidden_states, **kwargs):
        n = self.negative.shape[0]
        ctx = encoder_hidden_states.clone()
        if ctx.shape[0] == 2 * n:
            ctx[:n] = self.negative.to(ctx)
        return self.unet(sample, t, encoder_hidden_states=ctx, **kwargs)


class ToyGenerator:
    """The toy model (unhype.toy.model.ToyModel) behind the harness interface."""

    family = "toy"

    def __init__(self, toy, steps: int | None = None, guidance: float | None = None):
        from unhype.toy import model as toy_model

        self.toy = toy
        self.steps = steps or toy_model.DEFAULT_STEPS
        self.guidance = guidance if guidance is not None else toy_model.DEFAULT_GUIDANCE

    @property
    def unet(self) -> nn.Module:
        return self.toy.unet

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = self.toy.encode_prompts(list(prompts))
        return hidden.float(), pooled.float()

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int, method: Method,
               hidden: Tensor | None = None, pooled: Tensor | None = None) -> Tensor:
        if hidden is None:
            hidden, pooled = self.encode(prompts)
        negative = method.begin(hidden, pooled)
        unet = _NegativeContext(self.unet, negative) if negative is not None else None
        try:
            return self.toy.sample(list(prompts), seed=seed, steps=self.steps,
                                   guidance=self.guidance, unet=unet, hidden_states=hidden,
                                   before_unet_call=lambda i, t, rows: method.rows(rows))
        finally:
            method.end()

    # --- for the embedding attack (differentiable single denoising step) ---------------------
    def to_latents(self, images: Tensor) -> Tensor:
        return self.toy.encode_images(images)

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.toy.scheduler.add_noise(z0, noise, t)

    def predict_x0(self, z_t: Tensor, t: Tensor, hidden: Tensor) -> Tensor:
        """The cond-row prediction (x0 for the toy), gradients on."""
        return self.unet(z_t, t, encoder_hidden_states=hidden).sample

    @property
    def num_train_timesteps(self) -> int:
        return self.toy.scheduler.config.num_train_timesteps


class _RowsShim:
    """What trainer backends call (`set_rows`) forwarded to a method."""

    def __init__(self, method: Method):
        self.method = method

    def set_rows(self, rows):
        self.method.rows(rows)


class BackendGenerator:
    """A trainer backend (trainer.backends.*: diffusers SD1/SD2/SDXL) behind the harness interface."""

    def __init__(self, backend, steps: int = 30, guidance: float | None = None):
        self.backend = backend
        self.family = backend.family.name
        self.steps = steps
        self.guidance = guidance if guidance is not None else backend.default_guidance

    @property
    def unet(self) -> nn.Module:
        return self.backend.unet

    def encode(self, prompts):
        return self.backend.encode(list(prompts)).hidden.float(), self.backend.embed(list(prompts))

    @torch.no_grad()
    def sample(self, prompts, seed, method, hidden=None, pooled=None):
        b = self.backend
        cond = b.encode(list(prompts))
        if hidden is not None:
            cond.hidden = hidden
        pooled = pooled if pooled is not None else b.embed(list(prompts))
        n = len(prompts)
        uncond = b.encode([""]).index(torch.zeros(n, dtype=torch.long))
        negative = method.begin(cond.hidden.float(), pooled)
        if negative is not None:
            uncond.hidden = negative.to(uncond.hidden)
        gen = torch.Generator().manual_seed(int(seed))
        try:
            z = b.sample(cond, uncond, gen, self.steps, self.guidance, lora=_RowsShim(method),
                         rows=torch.arange(n))
        finally:
            method.end()
        return b.decode(z)


def generate(generator, method: Method, prompts: list[str], seed: int, batch_size: int,
             bar=None, dist: Dist | None = None) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] for `prompts` with `method` (already attached).

    With `dist` over N processes each makes every N-th batch (same seeds) and all get all."""
    dist = dist or Dist()
    out = {}
    for start in _my_starts(len(prompts), batch_size, dist):
        chunk = prompts[start:start + batch_size]
        out[start] = generator.sample(chunk, seed + start, method).float().cpu()
        if bar is not None:
            bar.update(len(chunk))
    if dist.world == 1:
        return torch.cat(list(out.values())) if out else torch.empty(0)
    return _gather_batches(dist, out, len(prompts))


def _my_starts(n: int, batch_size: int, dist: Dist) -> list[int]:
    """First rows of the batches of n prompts this process makes (batch k: process k mod N)."""
    if batch_size < 1:
        raise UnHypeError(f"batch size must be >= 1, got {batch_size}")
    return list(range(0, n, batch_size))[dist.rank::dist.world]


def _gather_batches(dist: Dist, batches: dict[int, Tensor], n: int) -> Tensor:
    """Every process's batches (start row -> images) in prompt order, on every process.

    A sum of zero-filled buffers: each image comes from exactly one process, so the sum is
    that image bit for bit."""
    shape = torch.zeros(3, dtype=torch.long)
    if batches:
        shape[:] = torch.tensor(next(iter(batches.values())).shape[1:])
    shape = dist.max(shape)  # a process without a batch learns the image shape
    full = torch.zeros(n, *shape.tolist())
    for start, images in batches.items():
        full[start:start + len(images)] = images
    return dist.sum(full) if n else torch.empty(0)


def score(preds: dict[str, Tensor], sets: dict, kind: str = "objects") -> dict:
    """Acc_e / Acc_s / Acc_g and H_o (H_c for people) from class predictions per set."""
    acc, counts = {}, {}
    for key, name in (("erased", "acc_e"), ("others", "acc_s"), ("synonyms", "acc_g")):
        if sets[key]:
            acc[name] = accuracy(preds[key].tolist(), [c for _, c in sets[key]])
        else:
            acc[name] = None
        counts["n_" + name[-1]] = len(sets[key])  # images behind each accuracy
    out = {**acc, **counts}
    out["h_o"] = h_o(acc["acc_e"], acc["acc_s"], acc["acc_g"]) if acc["acc_g"] is not None else None
    out["h_c"] = h_c(acc["acc_e"], acc["acc_s"])
    if kind == "people":
        out["h_o"] = None
    return out


def accuracy_by_class(preds: dict[str, Tensor], sets: dict, class_names: list[str]) -> dict:
    """{"by_class": {name: {"acc_e", "acc_g"}}} for each erased class when there are several:
    a pooled Acc_e can pass while one concept is barely erased."""
    out = {}
    for key, name in (("erased", "acc_e"), ("synonyms", "acc_g")):
        items = sets[key]
        for c in dict.fromkeys(label for _, label in items):
            idx = [i for i, (_, label) in enumerate(items) if label == c]
            out.setdefault(class_names[c], {})[name] = accuracy(preds[key][idx].tolist(),
                                                               [c] * len(idx))
    return {"by_class": out} if len(out) > 1 else {}


def accuracy_by_kind(preds: Tensor, items: list[tuple[str, int]], kinds: list[str]) -> dict:
    """{"acc_g_<kind>": Acc_g over that kind's prompts} for a generality set of several kinds."""
    out = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        out[f"acc_g_{kind}"] = accuracy(preds[idx].tolist(), [items[i][1] for i in idx])
    return out


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during `evaluate`: `result` holds the rows that finished (evaluate's return value,
    rows in order), `missing` the names (or labels) of the methods that did not."""

    def __init__(self, result: dict, missing: list[str]):
        super().__init__(f"interrupted; missing rows: {', '.join(missing)}")
        self.result, self.missing = result, missing


def _name(method) -> str:
    """A Method's name, or a Slot's (unhype.evaluation.rows) label until it is built."""
    return method.label if isinstance(method, Slot) else method.name


def evaluate(generator, methods: list, ps: PromptSet, erased: list[str], classifier,
             per_class: int = 10, seed: int = 1234, batch_size: int = 32, clip_scorer=None,
             keep_images: int = 8, progress: bool = True, extras=(), dist: Dist | None = None,
             reference: Tensor | None = None, generality=("synonyms",), on_row=None) -> dict:
    """Run every method on the same prompt sets; returns {"sets": ..., "methods": {name: row}}.

    Each row: the scores, `clip_score` (mean over the other-class prompts, when `clip_scorer`
    has `clip_score`), seconds, and `images` (the first `keep_images` per set, for grids);
    `change_s` / `kept_s` (metrics.paired_change) against `reference`, the unmodified
    model's other-class images at these seeds: given, or made by a plain `Method()` (the base
    model) earlier in `methods`.
    `methods`: Methods, or `unhype.evaluation.rows.Slot`s: built (`slot.make()`) only when
    their turn comes, or taken as they are when `slot.row` holds a finished row (reused, no
    images). `on_row(method or slot, name, row, other-class images)` is called as each row is
    scored (to save it). Ctrl-C raises `EvalInterrupted` with the rows finished so far.
    `extras`: callables (images, prompts, sets) -> dict of extra numbers (NudeNet, FID).
    `dist`: the processes of `accelerate launch` share the generation (see `generate`); the
    gathered images are scored in every process, so every process returns the same numbers.
    `generality`: the kinds of prompt in the Acc_g set (prompts.build_sets; MACE: synonyms)."""
    dist = dist or Dist()
    generality = parse_generality(generality)
    sets = build_sets(ps, erased, per_class, generality)
    kinds = generality_kinds(ps, erased, per_class, generality)
    if reference is not None and len(reference) != len(sets["others"]):
        raise UnHypeError(f"the reference holds {len(reference)} other-class images, this "
                          f"evaluation makes {len(sets['others'])}: not the same prompt sets")
    n_prompts = sum(len(v) for v in sets.values())
    todo = [m for m in methods if not isinstance(m, Slot) or m.row is None]
    total = sum(min(batch_size, n_prompts - s)
                for s in _my_starts(n_prompts, batch_size, dist)) * len(todo)
    bar = None
    if progress and dist.is_main and todo:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="unhype eval", unit="img", file=sys.stderr,
                   dynamic_ncols=True)
    results, finished = {}, 0  # finished: how many of `methods` have their row

    def result() -> dict:
        return {"sets": {k: [p for p, _ in v] for k, v in sets.items()},
                "erased": [ps.class_names[i] for i in sorted({ps.index(w) for w in erased})],
                "classifier": getattr(classifier, "description", type(classifier).__name__),
                "per_class": per_class, "seed": seed, "processes": dist.world,
                "generality": list(generality), "methods": results}

    try:
        for method in methods:
            slot = None
            if isinstance(method, Slot):
                if method.row is not None:  # reused: scored by an earlier run
                    row = dict(method.row)
                    results[row.pop("name", method.label)] = row
                    finished += 1
                    continue
                slot, method = method, method.make()
            t0 = time.time()
            method.attach(generator.unet)
            # one list for all three sets: full batches, the same noise for every method
            prompts = [p for items in sets.values() for p, _ in items]
            try:
                all_images = generate(generator, method, prompts, seed, batch_size, bar, dist)
            finally:
                method.detach()
            images, start = {}, 0
            for key, items in sets.items():
                images[key] = all_images[start:start + len(items)]
                start += len(items)
            preds = {k: classifier.predict(v) if len(v) else torch.empty(0, dtype=torch.long)
                     for k, v in images.items()}
            row = score(preds, sets, ps.kind)
            row.update(accuracy_by_class(preds, sets, ps.class_names))
            if len(generality) > 1 and len(sets["synonyms"]):
                row.update(accuracy_by_kind(preds["synonyms"], sets["synonyms"], kinds))
            if reference is None and type(method) is Method and len(images["others"]):
                reference = images["others"]
            if reference is not None:
                row.update(paired_change(images["others"], reference))
            if clip_scorer is not None and hasattr(clip_scorer, "clip_score"):
                row["clip_score"] = float(clip_scorer.clip_score(
                    images["others"], [p for p, _ in sets["others"]]).mean())
            for extra in extras:
                row.update(extra(images, sets))
            row["seconds"] = round(time.time() - t0, 1)
            row["settings"] = method.settings()
            row["images"] = {k: v[:keep_images] for k, v in images.items()}
            row["prompts"] = {k: [p for p, _ in sets[k][:keep_images]] for k in sets}
            results[method.name] = row
            finished += 1
            if on_row is not None:
                on_row(slot or method, method.name, row, images["others"])
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        raise EvalInterrupted(result(), [_name(m) for m in methods[finished:]]) from None
    finally:
        if bar is not None:
            bar.close()
    return result()
