"""Erasure measured on the toy world with its judge (MACE protocol, METHOD.md).

Images are sampled with the toy's own sampler (DDIM + CFG), the hypernetwork's LoRA on the
conditional rows only, and classified by the toy's judge CNN (trained on rendered ground truth,
never on generated images). Acc_e: erased shapes prompted by name; Acc_s: the other shapes;
Acc_g: erased shapes prompted by their synonyms (never trained on). Accuracies are class means.
H_o from `unhype.evaluation.metrics`, and how far the other-shape images moved from the base
model's (`paired_change`). The base model's predictions and other-shape images are cached on
disk (keyed by prompts, seed, the model family and every weight file its backend reads) since
every run compares against them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unhype.errors import UnHypeError
from unhype.evaluation.metrics import paired_change


def erased_shapes(concepts) -> list[str]:
    from unhype.toy import data

    found = []
    for c in concepts:
        word = c["target"] if isinstance(c, dict) else c.target
        match = [s for s, words in data.SYNONYMS.items() if word.lower() in words]
        if not match:
            raise UnHypeError(f"toy evaluation: {word!r} is not a toy shape or synonym "
                              f"({', '.join(data.SHAPES)})")
        found.append(match[0])
    return found


def prompt_sets(erased: list[str], per_class: int, seed: int = 1234):
    """{'erased'|'others'|'synonyms': (prompts, shape index array)}."""
    from unhype.toy import data

    rng = np.random.default_rng(seed)
    sets = {"erased": ([], []), "others": ([], []), "synonyms": ([], [])}

    def add(kind, shape, word, k):
        colour = data.COLOURS[(k + data.SHAPES.index(shape)) % len(data.COLOURS)]
        tpl = data.FULL_TEMPLATES[rng.integers(len(data.FULL_TEMPLATES))]
        sets[kind][0].append(data.fill(tpl, word, colour))
        sets[kind][1].append(data.SHAPES.index(shape))
    for shape in data.SHAPES:
        kind = "erased" if shape in erased else "others"
        for k in range(per_class):
            add(kind, shape, shape, k)
        if shape in erased:
            synonyms = data.SYNONYMS[shape][1:]
            for k in range(per_class):
                add("synonyms", shape, synonyms[k % len(synonyms)], k)
    return {k: (p, np.array(s)) for k, (p, s) in sets.items()}


def _class_mean(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([(pred[truth == c] == c).mean() for c in np.unique(truth)]))


def sample_images(backend, prompts, seed, hypernet=None, lora=None, batch=128) -> torch.Tensor:
    """One image per prompt [N, 3, H, W] in [0, 1] (the same noise with or without LoRA)."""
    toy = backend.toy
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        callback = None
        if hypernet is not None:
            with torch.no_grad():
                lora.set(hypernet(backend.embed(chunk)), torch.arange(len(chunk)))
            # -1 rows (unconditional) run the base weights
            callback = lambda step, t, rows: lora.set_rows(rows)  # noqa: E731
        try:
            out.append(toy.sample(chunk, seed=seed + i, before_unet_call=callback).float().cpu())
        finally:
            if lora is not None:
                lora.clear()
    return torch.cat(out)


def judge(backend, images: torch.Tensor) -> np.ndarray:
    """The toy judge's shape prediction per image."""
    from unhype.toy.judge import load_judge

    key = str(backend.weights)
    model = _judge_cache.get(key) or _judge_cache.setdefault(key, load_judge(backend.weights))
    return np.concatenate([model.classify(images[i:i + 128])[0].cpu().numpy()
                           for i in range(0, len(images), 128)])


def sample_judged(backend, prompts, seed, hypernet=None, lora=None, batch=128) -> np.ndarray:
    """Judge's shape prediction for one image per prompt (same noise with or without LoRA)."""
    return judge(backend, sample_images(backend, prompts, seed, hypernet, lora, batch))


_judge_cache: dict = {}


# folders (under the toy weights) each family samples and judges with; configs, tokenizer and
# scheduler count too: they change the images as much as the weights do
FAMILY_WEIGHTS = {"toy": ("unet", "scheduler", "tokenizer", "text_encoder", "judge"),
                  "toy_flux": ("flow", "tokenizer", "text_encoder", "judge")}


def _weights_key(family: str, weights) -> str:
    """Family + every file (name, size, mtime) of the folders it reads; an unknown family
    reads the whole weights folder."""
    root = Path(weights)
    folders = [root / sub for sub in FAMILY_WEIGHTS.get(family, ("",))]
    parts = [family, str(weights)]
    for folder in folders:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            st = f.stat()
            parts.append(f"{f.relative_to(root).as_posix()}:{st.st_size}:{int(st.st_mtime)}")
    return ";".join(parts)


def base_cache_key(backend, sets, seed) -> str:
    """Cache key of the base model's predictions for these prompt sets."""
    prompts = {k: v[0] for k, v in sets.items()}
    blob = json.dumps([_weights_key(backend.family.name, backend.weights), seed, prompts])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def base_outputs(backend, sets, seed) -> tuple[dict, torch.Tensor]:
    """The base model's predictions per set and its other-class images, cached on disk (JSON
    and safetensors under one key: `base_cache_key`)."""
    from safetensors.torch import load_file, save_file

    from unhype.atomic import atomic_path, atomic_write_text

    key = base_cache_key(backend, sets, seed)
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unhype"
    path = folder / f"toy-base-eval-{key}.json"
    images_path = folder / f"toy-base-others-{key}.safetensors"
    if path.is_file() and images_path.is_file():
        preds = {k: np.array(v) for k, v in json.loads(path.read_text()).items()}
        return preds, load_file(str(images_path))["others"]
    images = {k: sample_images(backend, p, seed) for k, (p, _) in sets.items() if p}
    preds = {k: judge(backend, v) for k, v in images.items()}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(images_path) as tmp:
        save_file({"others": images["others"].contiguous()}, str(tmp))
    atomic_write_text(path, json.dumps({k: v.tolist() for k, v in preds.items()}))
    return preds, images["others"]


def scores(preds: dict, sets: dict) -> dict:
    """Class-mean accuracies of every set (`acc_e`, `acc_s`, `acc_g`, pooled over the erased
    concepts as before), H_o, and `per_concept`: {shape: {"acc_e", "acc_g"}} of each erased
    concept alone (a pooled Acc_e of 8% can be one concept at 25% and two at 0%)."""
    from unhype.evaluation.metrics import h_o
    from unhype.toy import data

    acc = {k: _class_mean(preds[k], sets[k][1]) for k in sets if len(sets[k][0])}
    out = {"acc_e": acc["erased"], "acc_s": acc["others"], "acc_g": acc["synonyms"]}
    out["h_o"] = h_o(out["acc_e"], out["acc_s"], out["acc_g"])
    per = {}
    for kind, key in (("erased", "acc_e"), ("synonyms", "acc_g")):
        pred, truth = preds[kind], sets[kind][1]
        for c in np.unique(truth):
            per.setdefault(data.SHAPES[int(c)], {})[key] = float((pred[truth == c] == c).mean())
    out["per_concept"] = per
    return out


def weakest(after: dict, key: str) -> tuple[str | None, float]:
    """(concept, value) of the erased concept with the highest `key` ("acc_e" or "acc_g");
    the pooled value when there is no per-concept breakdown."""
    per = {c: v[key] for c, v in after.get("per_concept", {}).items() if key in v}
    if not per:
        return None, after[key]
    name = max(per, key=per.get)
    return name, per[name]


def evaluate(backend, hypernet, lora, concepts, per_class: int = 24, seed: int = 777) -> dict:
    erased = erased_shapes(concepts)
    sets = prompt_sets(erased, per_class)
    t0 = time.time()
    base_preds, base_others = base_outputs(backend, sets, seed)
    base = scores(base_preds, sets)
    images = {k: sample_images(backend, p, seed, hypernet, lora) for k, (p, _) in sets.items()}
    after = scores({k: judge(backend, v) for k, v in images.items()}, sets)
    after.update(paired_change(images["others"], base_others))
    passes = bars(base, after)
    return {"erased": erased, "per_class": per_class, "base": base, "unhype": after,
            "passes": passes, "bars_on": bars_on(after),
            "seconds": round(time.time() - t0, 1)}


def bars(base: dict, after: dict) -> dict:
    """The toy erasure bars; adds `acc_s_rel` (Acc_s as a share of the base's) to `after`.
    The erased and synonym bars hold for the WORST erased concept (`bars_on` names it), not
    the pooled mean: one concept left at 25% among three at 0% misses them."""
    after["acc_s_rel"] = after["acc_s"] / base["acc_s"] if base["acc_s"] else 0.0
    _, worst_e = weakest(after, "acc_e")
    _, worst_g = weakest(after, "acc_g")
    return {"erased<=10%": worst_e <= 0.10,
            "others>=90% of base": after["acc_s_rel"] >= 0.90,
            "synonyms<=20%": worst_g <= 0.20}


def bars_on(after: dict) -> dict:
    """{bar: {"concept", "value"}}: which erased concept each per-concept bar was judged on."""
    out = {}
    for bar, key in (("erased<=10%", "acc_e"), ("synonyms<=20%", "acc_g")):
        name, value = weakest(after, key)
        out[bar] = {"concept": name, "value": value}
    return out


def format_metrics(m: dict) -> str:
    b, u = m["base"], m["unhype"]
    rows = [f"toy erasure of {', '.join(m['erased'])} ({m['per_class']} images per class)",
            "| model | Acc_e (erased) | Acc_s (others) | Acc_g (synonyms) | H_o |",
            "|---|---|---|---|---|",
            f"| base | {b['acc_e']:.1%} | {b['acc_s']:.1%} | {b['acc_g']:.1%} | {b['h_o']:.1%} |",
            f"| UnHype | {u['acc_e']:.1%} | {u['acc_s']:.1%} ({u['acc_s_rel']:.0%} of base) | "
            f"{u['acc_g']:.1%} | {u['h_o']:.1%} |"]
    per = u.get("per_concept", {})
    if len(per) > 1:
        for name, v in per.items():
            base = b.get("per_concept", {}).get(name, {})
            rows.append(f"| UnHype, {name} | {v['acc_e']:.1%} (base {base.get('acc_e', 0):.0%})"
                        f" | | {v['acc_g']:.1%} (base {base.get('acc_g', 0):.0%}) | |")
    rows.append(f"other-shape images against the base model's (same prompt and seed): "
                f"{u['kept_s']:.0%} within 1 of 255 levels everywhere, mean change "
                f"{u['change_s']:.2f} levels")
    on = m.get("bars_on", {})

    def bar(k, v):
        where = on.get(k)
        note = f" (worst: {where['concept']} {where['value']:.1%})" \
            if where and where.get("concept") and len(per) > 1 else ""
        return f"{k} {'ok' if v else 'MISSED'}{note}"
    rows.append("targets: " + ", ".join(bar(k, v) for k, v in m["passes"].items()))
    if len(per) > 1:
        def weakest_text(key, label):
            name, value = weakest(u, key)
            if len({v[key] for v in per.values()}) == 1:  # a tie names no concept
                return f"none, every concept at {label} {value:.1%}"
            return f"{name} ({label} {value:.1%}, pooled {u[key]:.1%})"
        rows.append(f"weakest concept: {weakest_text('acc_e', 'Acc_e')}; synonyms: "
                    f"{weakest_text('acc_g', 'Acc_g')}")
    return "\n".join(rows)


def evaluate_run(run) -> dict:
    """After `unhype train --eval` on the toy: metrics.json + a printed table."""
    if run.backend.family.name != "toy":
        raise UnHypeError("--eval measures erasure on the toy model only; for SD use "
                          "`unhype eval` with open_clip")
    from unhype.fileformat import load_hypernet

    loaded = load_hypernet(run.result_path)  # as the hosts apply the file: floor, saturation

    def hypernet(emb):
        return loaded.generate(emb)

    metrics = evaluate(run.backend, hypernet, run.lora, run.concepts, run.cfg.eval_images)
    path = run.out_dir / "metrics.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(path)
    print(format_metrics(metrics))
    print(f"unhype train: metrics written to {path}", file=sys.stderr)
    return metrics


def evaluate_file(path, per_class: int = 24, device: str = "cpu") -> dict:
    """Metrics of a saved toy hypernetwork file."""
    from unhype.trainer.backends.toy import ToyBackend
    from unhype.dynamic_lora import DynamicLoRA
    from unhype.fileformat import check_targets_in_model, load_hypernet

    loaded = load_hypernet(path, device)
    backend = ToyBackend(device)
    lora = DynamicLoRA(check_targets_in_model(loaded, backend.unet))
    try:
        return evaluate(backend, loaded.generate, lora, loaded.meta.concepts, per_class)
    finally:
        lora.remove()
