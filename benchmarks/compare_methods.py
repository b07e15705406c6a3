"""UnHype against its peers on the toy world, in one harness, and `docs/results.md` written from it.

Settings (MACE protocol, METHOD.md): single-concept erasure of each of `--targets` (averaged) and
multi-concept erasure of `--multi` classes by one model. Methods: the base model, the negative
prompt, UCE (closed form), ESD-x and ESD-u (static LoRAs, ESD loss), SPM-style (gated rank-1,
ESD loss + anchoring) and UnHype (`--variants`, trained in-process by the trainer with the toy
demo config). Every trained method gets the same concepts, templates, z_t cache, seed and number
of steps. Images are classified by the toy judge CNN (`--classifier toy` for the toy CLIP).

    python benchmarks/compare_methods.py                 # defaults: see --help (<= ~30 min)
    python benchmarks/compare_methods.py --variants all --per-class 20 --steps 600

Results of each (setting, method) are cached under --out, with the settings they were made with
(a row made with others is made again), so an interrupted run resumes. ESD-x/u and SPM are kept
in <--out>/<setting>/trained/ as soon as their training ends (unhype.evaluation.trained, as
`unhype eval` keeps them): a rerun, at another strength ('spm@2') or with other evaluation
settings (--per-class, --eval-seed, ...), loads them instead of training again; --force retrains.
UnHype files are kept the same way in <--out>/<setting>/unhype-<variant>/ (with the settings they
were trained with, trained-with.json), so a copy of a folder run with another --generality
evaluates the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file, save_file  # noqa: E402

from unhype.atomic import atomic_path, atomic_write_text  # noqa: E402  (after the path insert)
from unhype.errors import UnHypeError  # noqa: E402
from unhype.evaluation.prompts import GENERALITY_KINDS, parse_generality  # noqa: E402
from unhype.families import SD_PRESETS  # noqa: E402

ALL_VARIANTS = ("per_layer/fields", "per_layer/direct", "shared/fields", "shared/direct")
BASELINES = ("negative_prompt", "uce", "esd_x", "esd_u", "spm")


def say(*a):
    print(*a, file=sys.stderr, flush=True)


class Spec(NamedTuple):
    variant: str
    mode: str
    adv: float = 0.0  # --adversarial_eps
    schedule: str = "constant"  # --lr_scheduler
    rank: int = 1  # --network_dim
    fraction: float = 1.0  # --adversarial_fraction
    eta: float = 1.0  # --eta (ESD guidance of the removal target)
    consistency: float = 0.0  # > 0: --adversarial_loss consistency at this --consistency_weight
    saturate: bool = False  # --gate_saturate (inference only: the same weights)
    preset: str = "xattn_kv"  # --target_preset (the toy's default: the paper's layers)
    composites: int = 0  # --composite_prompts
    steps: int = 0  # --max_train_steps of this variant; 0: the run's --steps


def split_strength(spec: str) -> tuple[str, float]:
    """'spm@2', 'per_layer/direct+r4@2' -> (the method, 2.0): an inference strength after '@'
    (the LoRA multiplier; 1 without). The trained weights are the same at every strength."""
    head, _, strength = spec.partition("@")
    try:
        return head, float(strength) if strength else 1.0
    except ValueError:
        raise ValueError(f"{spec!r}: the strength after '@' is not a number") from None


def with_strength(name: str, strength: float) -> str:
    return name if strength == 1 else f"{name}, strength {strength:g}"


def at_strength(method, strength: float, spec: str):
    """A copy of a built baseline at LoRA strength `strength` (the same trained weights)."""
    out = copy.copy(method)
    if strength != 1:
        if not hasattr(out, "strength"):
            raise SystemExit(f"--baselines {spec}: {out.name} has no LoRA strength")
        out.strength, out.name = strength, with_strength(out.name, strength)
    return out


def parse_variant(spec: str) -> Spec:
    """'per_layer/fields', 'per_layer/direct+adv0.5', 'per_layer/direct+r4+adv0.5+mix0.5+cosine'
    -> Spec (r: rank, adv: adversarial eps, mix: adversarial fraction, eta: ESD eta, cons[W]:
    the consistency adversarial loss at weight W (1), sat: the saturated gate floor, compN:
    --composite_prompts N, sN: N training steps instead of the run's --steps (a recipe that needs
    more, such as toy_robust_attn's 800), else: lr schedule, a layer preset name such as
    attn_all: --target_preset); an
    '@strength' suffix is not part of the trained variant (split_strength)."""
    head, *extras = split_strength(spec)[0].split("+")
    variant, mode = head.split("/")
    out = Spec(variant, mode)
    for e in extras:
        if e.startswith("adv"):
            out = out._replace(adv=float(e[3:]))
        elif e.startswith("mix"):
            out = out._replace(fraction=float(e[3:]))
        elif e.startswith("eta"):
            out = out._replace(eta=float(e[3:]))
        elif e == "sat":
            out = out._replace(saturate=True)
        elif e in SD_PRESETS:
            out = out._replace(preset=e)
        elif e.startswith("comp") and e[4:].isdigit():
            out = out._replace(composites=int(e[4:]))
        elif e.startswith("cons"):
            out = out._replace(consistency=float(e[4:] or 1))
        elif e[:1] == "r" and e[1:].isdigit():
            out = out._replace(rank=int(e[1:]))
        elif e[:1] == "s" and e[1:].isdigit():
            out = out._replace(steps=int(e[1:]))
        else:
            out = out._replace(schedule=e)
    return out


def variant_key(spec: str) -> str:
    """'per_layer/direct+adv0.5' -> 'per_layer-direct-adv0.5', '...@2' -> '...-x2': the spec in
    file and folder names."""
    return spec.replace("/", "-").replace("+", "-").replace("@", "-x")


def trained_steps(spec: str, steps: int) -> int:
    """The training steps of variant `spec` in a run of `steps` (its '+sN', else the run's)."""
    return parse_variant(spec).steps or steps


def spec_of_file(meta) -> Spec:
    """The Spec a trained hypernetwork file (its metadata) was trained with, steps aside (0:
    `trained_with` holds a kept file's steps; compare with
    `parse_variant(...)._replace(steps=0)`)."""
    t = meta.training
    return Spec(meta.config.variant, t.get("mode"), t.get("adversarial_eps") or 0.0,
                t.get("lr_scheduler", "constant"), meta.config.rank,
                t.get("adversarial_fraction", 1.0), t.get("eta", 1.0),
                t.get("consistency_weight", 1.0)
                if t.get("adversarial_loss") == "consistency" else 0.0,
                t.get("gate_saturate", False) is True, t.get("target_preset") or "xattn_kv",
                t.get("composite_prompts") or 0)


def describe(v: Spec) -> str:
    return f"UnHype {v.variant}/{v.mode}" + (f" rank {v.rank}" if v.rank != 1 else "") + \
        (f" + adversarial gate {v.adv:g}" if v.adv else "") + \
        (f" on {v.fraction:.0%} of prompts" if v.adv and v.fraction < 1 else "") + \
        (f" (consistency loss, weight {v.consistency:g})" if v.adv and v.consistency else "") + \
        (f", eta {v.eta:g}" if v.eta != 1 else "") + \
        (f", {v.schedule} lr" if v.schedule != "constant" else "") + \
        (f", layers {v.preset}" if v.preset != "xattn_kv" else "") + \
        (", saturated gate" if v.saturate else "") + \
        (f", {v.composites} composite prompts per concept" if v.composites else "") + \
        (f", {v.steps} steps" if v.steps else "")


def unhype_name(spec: str) -> str:
    return with_strength(describe(parse_variant(spec)), split_strength(spec)[1])


def train_unhype(backend, concepts, spec, steps, seed, out_dir):
    """The trainer's own loop on the toy demo config; returns an UnHypeMethod with the gate floor
    the saved file gets (unhype/gate_floor.py)."""
    from unhype.trainer.config import resolve
    from unhype.trainer.loop import gate_reference, index_cache, prepare, train
    from unhype.baselines.esd import latent_cache
    from unhype.evaluation.methods import UnHypeMethod

    v = parse_variant(spec)
    over = {"learning_rate": 1e-3, "retain_learning_rate": 1e-3} if v.mode == "direct" else {}
    cfg = resolve({"config_file": str(ROOT / "unhype/trainer/configs/toy_demo.toml"),
                   "pretrained_model_name_or_path": "toy", "concepts": ",".join(concepts),
                   "variant": v.variant, "mode": v.mode,
                   "max_train_steps": trained_steps(spec, steps), "seed": seed,
                   "output_dir": str(out_dir), "output_name": "hypernet", "eval": False,
                   "save_every_n_steps": 0, "cpu_threads": 0, "sample_seeds": 1,
                   "adversarial_eps": v.adv, "adversarial_fraction": v.fraction,
                   "lr_scheduler": v.schedule, "network_dim": v.rank, "eta": v.eta,
                   "adversarial_loss": "consistency" if v.consistency else "removal",
                   "consistency_weight": v.consistency or 1.0, "gate_saturate": v.saturate,
                   "target_preset": v.preset, "composite_prompts": v.composites,
                   **over})
    run = prepare(cfg, quiet=True, backend=backend)
    run.cache = latent_cache(run)
    index_cache(run)
    code = train(run, progress=False)
    run.lora.remove()
    if code:
        raise RuntimeError(f"unhype train exited with {code}")
    targets = backend.family.targets(cfg.target_preset, model=backend.unet)
    run.hypernet.eval()
    return UnHypeMethod(run.hypernet, {t.name: t.path for t in targets},
                        {t.name: (t.in_dim, t.out_dim) for t in targets},
                        split_strength(spec)[1], name=unhype_name(spec),
                        gate_reference=gate_reference(run), floor=cfg.gate_floor,
                        saturate=cfg.gate_saturate)


def trained_file(args, spec, concepts):
    """An UnHype file already trained for this setting (--unhype-dir, toy_erasure_table layout:
    <dir>/<variant>-<mode>[-adv<eps>]-<target or multi>/hypernet.safetensors) whose concepts and
    adversarial eps match."""
    from unhype.evaluation.methods import UnHypeMethod
    from unhype.fileformat import load_hypernet, read_meta

    if not args.unhype_dir:
        return None
    name = concepts[0] if len(concepts) == 1 else "multi"
    trained = variant_key(split_strength(spec)[0])
    path = Path(args.unhype_dir) / f"{trained}-{name}" / "hypernet.safetensors"
    if not path.is_file():
        return None
    meta = read_meta(path)
    if [c["target"] for c in meta.concepts] != list(concepts) or \
            spec_of_file(meta) != parse_variant(spec)._replace(steps=0):
        return None
    loaded = load_hypernet(path)
    steps = loaded.meta.training.get("steps_done")
    say(f"  using {path} ({steps} steps)")
    return UnHypeMethod.from_loaded(loaded, split_strength(spec)[1], name=unhype_name(spec))


TRAINED_WITH = "trained-with.json"  # beside a file train_unhype wrote: what it was trained with


def trained_with(args, spec: str, concepts) -> dict:
    return {"spec": spec, "concepts": list(concepts), "steps": trained_steps(spec, args.steps),
            "seed": args.seed,
            "toy_weights": None if args.toy_weights is None else str(args.toy_weights)}


def kept_file(args, tag: str, spec: str, concepts):
    """The file this harness trained for `spec` in an earlier run on this --out
    (<out>/<setting>/unhype-<spec>/hypernet.safetensors: written once training ended, so a row
    interrupted during its images, another strength, or rows evaluated another way, e.g. a
    copy of the folder run with another --generality, do not train it again) when its concepts,
    variant, steps and seed are this run's; --force trains again."""
    from unhype.evaluation.methods import UnHypeMethod
    from unhype.fileformat import load_hypernet, read_meta

    path = args.out / tag / f"unhype-{variant_key(spec)}" / "hypernet.safetensors"
    if args.force or not path.is_file():
        return None
    sidecar = path.with_name(TRAINED_WITH)
    made = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    meta = read_meta(path)
    if made != trained_with(args, spec, concepts) or \
            spec_of_file(meta) != parse_variant(spec)._replace(steps=0):
        say(f"  {tag}: training {spec} again: {path} was trained with other settings")
        return None
    say(f"  {tag}: {spec}: loaded {path} (trained by an earlier run; --force retrains)")
    method = UnHypeMethod.from_loaded(load_hypernet(path), 1.0, name=unhype_name(spec))
    method.info = {"train_seconds": 0.0}
    return method


def kept_or_trained(args, backend, tag: str, spec: str, concepts):
    """The file kept for `spec` in <out>/<setting>/ (`kept_file`), else trained now and kept
    there with the record of what it was trained with."""
    method = kept_file(args, tag, spec, concepts)
    if method is None:
        folder = args.out / tag / f"unhype-{variant_key(spec)}"
        method = train_unhype(backend, concepts, spec, args.steps, args.seed, folder)
        atomic_write_text(folder / TRAINED_WITH, json.dumps(trained_with(args, spec, concepts)))
    return method


def with_counts(row: dict, per_class: int, n_erased: int, n_classes: int) -> dict:
    """The row with the image counts behind its accuracies (rows cached before the harness
    recorded them: derived from the prompt-set layout, prompts.build_sets), and its H_o
    interval."""
    from unhype.evaluation.metrics import h_o_interval

    out = {"n_e": per_class * n_erased, "n_s": per_class * (n_classes - n_erased),
           "n_g": per_class * n_erased, **row}
    if out.get("acc_g") is not None:
        out["h_o_ci"] = h_o_interval([out])
    return out


def eval_args(args) -> argparse.Namespace:
    """`unhype eval`'s options for this toy run: with them `training_key` gives a baseline the
    key `unhype eval --model toy` gives the same training (steps, seed, concepts, weights)."""
    from unhype.cli import build_parser

    weights = ["--toy_weights", str(args.toy_weights)] if args.toy_weights else []
    return build_parser().parse_args(["eval", "--model", "toy", "--baseline_steps",
                                      str(args.steps), *weights])


def baseline(args, name, gen, backend, concepts, ps, store):
    """Baseline `name` for `concepts`. A trained one (ESD-x/u, SPM) is loaded from `store` (an
    `evaluation.trained.TrainedStore`) when an earlier run trained it with the same settings,
    else trained and stored at once; --force trains it again."""
    from unhype.baselines.registry import TRAINED, build
    from unhype.evaluation.trained import load_or_train, training_key

    def train():
        return build(name, gen, backend, concepts, ps, args.steps, args.seed)

    if name not in TRAINED:  # UCE (closed form), negative prompt: nothing to keep
        return train()
    key = training_key(eval_args(args), "toy", name, concepts, args.seed)
    return load_or_train(store, name, key, train, backend.unet, args.force,
                         lambda message: say(f"  {message}"))


def row_settings(args) -> dict:
    """What a cached row was made with besides its setting and method."""
    return {"steps": args.steps, "seed": args.seed, "per_class": args.per_class,
            "batch_size": args.batch_size, "eval_seed": args.eval_seed,
            "classifier": args.classifier, "generality": list(args.generality),
            "toy_weights": None if args.toy_weights is None else str(args.toy_weights)}


def cached_row(args, cache: Path, tag: str) -> dict | None:
    """The row cached in `cache`, unless it was made with other settings (rows cached before
    they were recorded are taken as they are; --cached-only takes every row)."""
    from unhype.evaluation.rows import differing

    if not cache.is_file():
        return None
    row = json.loads(cache.read_text())
    changed = [] if args.cached_only or "settings" not in row else \
        differing(row["settings"], row_settings(args))
    if changed:
        say(f"  {tag}: recomputing {cache.stem}: its settings changed ({', '.join(changed)})")
        return None
    return row


def method_rows(args, backend, gen, ps, clf, concepts, tag):
    """{method name: scores} for one setting, each (setting, method) cached on disk."""
    from unhype.evaluation.harness import evaluate
    from unhype.evaluation.methods import Method
    from unhype.evaluation.trained import TrainedStore

    rows, built = {}, {}  # methods trained or loaded in this setting, reused at other strengths
    store = TrainedStore(args.out / tag)
    plan = [("base", None)] + [(b, None) for b in args.baselines] + \
        [("unhype", v) for v in args.variants]
    # the base model's other-class images: every method's change_s / kept_s is against them
    ref_file = args.out / tag / "base_others.safetensors"
    reference = load_file(str(ref_file))["others"] if ref_file.is_file() else None
    for kind, variant in plan:
        key = variant_key(kind) if variant is None else f"unhype-{variant_key(variant)}"
        cache = args.out / tag / f"{key}.json"
        stale = kind == "base" and reference is None and not args.cached_only
        row = None if args.force or stale else cached_row(args, cache, tag)
        if row is not None:
            rows[row["name"]] = with_counts(row, args.per_class, len(concepts), len(ps.classes))
            continue
        if args.cached_only:
            say(f"  {tag}: no cached row for {key} (--cached-only): shown as n/a")
            continue
        t0 = time.time()
        if kind == "base":
            method = Method()
        elif kind == "unhype":
            trained, strength = split_strength(variant)
            if trained not in built:  # at strength 1; other strengths share its weights
                built[trained] = trained_file(args, trained, concepts) or \
                    kept_or_trained(args, backend, tag, trained, concepts)
            method = at_strength(built[trained], strength, variant)
        else:
            name, strength = split_strength(kind)
            if name not in built:
                built[name] = baseline(args, name, gen, backend, concepts, ps, store)
            method = at_strength(built[name], strength, kind)
        # a stored baseline: the seconds its training took, not those of loading it
        train_s = (getattr(method, "info", None) or {}).get("train_seconds", time.time() - t0)
        is_base = kind == "base"
        res = evaluate(gen, [method], ps, concepts, clf, args.per_class, args.eval_seed,
                       args.batch_size, progress=False, keep_images=10 ** 9 if is_base else 0,
                       reference=None if is_base else reference, generality=args.generality)
        if is_base:
            reference = res["methods"][method.name]["images"]["others"].contiguous()
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ref_file) as tmp:
                save_file({"others": reference}, str(tmp))
        row = {k: v for k, v in res["methods"][method.name].items()
               if k not in ("images", "prompts")}
        row.update(name=method.name, train_seconds=round(train_s, 1), settings=row_settings(args))
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(row, indent=1))
        rows[method.name] = with_counts(row, args.per_class, len(concepts), len(ps.classes))
        say(f"  {tag:34s} {method.name:26s} H_o {fmt(row['h_o'])}  "
            f"(train {train_s:.0f} s, eval {row['seconds']:.0f} s)")
    return rows


def fmt(v):
    return "n/a" if v is None else f"{100 * v:.1f}"


def fmt_change(row: dict) -> list[str]:
    """The two paired-change cells (metrics.paired_change); n/a for rows cached before them."""
    if row.get("change_s") is None:
        return ["n/a", "n/a"]
    return [fmt(row["kept_s"]), f"{row['change_s']:.2f}"]


CHANGE_HEAD = ["others within 1 level of base", "others: mean change (0-255)"]


def fmt_ci(row: dict) -> str:
    ci = row.get("h_o_ci")
    return "n/a" if not ci else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"


def mean_rows(per_target: list[dict]) -> dict:
    from unhype.evaluation.metrics import h_o_interval

    out = {}
    for name in per_target[0]:
        rows = [r[name] for r in per_target if name in r]
        out[name] = {k: sum(r[k] for r in rows) / len(rows)
                     for k in ("acc_e", "acc_s", "acc_g", "h_o", "change_s", "kept_s")
                     + tuple(f"acc_g_{kind}" for kind in GENERALITY_KINDS)
                     if all(r.get(k) is not None for r in rows)}
        if all(r.get("acc_g") is not None for r in rows):
            out[name]["h_o_ci"] = h_o_interval(rows)
        out[name]["n"] = len(rows)
        out[name]["train_seconds"] = sum(r.get("train_seconds", 0) for r in rows)
        out[name]["seconds"] = sum(r.get("seconds", 0) for r in rows)
    return out


def ceiling(rows: dict, per_target: list[dict] | None = None) -> float | None:
    """The H_o ceiling of a setting (metrics.h_o_ceiling) from its base-model row(s); over
    several targets, the mean of each target's ceiling."""
    from unhype.evaluation.metrics import h_o_ceiling

    bases = [r["base model"] for r in per_target or [rows] if "base model" in r]
    if not bases or any(b.get("acc_s") is None for b in bases):
        return None
    return sum(h_o_ceiling(b["acc_s"]) for b in bases) / len(bases)


def table(single: dict, multi: dict | None) -> str:
    base_s = single["base model"]["acc_s"]
    unhype = [n for n in single if n.startswith("UnHype")]
    best = max(unhype, key=lambda n: single[n]["h_o"]) if unhype else None
    head = ["method", "1 concept: Acc_e", "Acc_s (% of base)", "Acc_g", "H_o", "H_o 95% interval"]
    if best:
        head.append(f"H_o / {best}")
    head += CHANGE_HEAD
    if multi:
        head += ["multi: Acc_e", "Acc_s (% of base)", "Acc_g", "H_o", "H_o 95% interval"]
        if best:
            head.append("H_o / UnHype")
        head += CHANGE_HEAD
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = max(r.get("n", 1) for r in single.values())
    for name, r in single.items():
        label = name if r.get("n", total) == total else f"{name} ({r['n']} of {total} targets)"
        cells = [label, fmt(r["acc_e"]), f"{fmt(r['acc_s'])} ({r['acc_s'] / base_s:.0%})",
                 fmt(r["acc_g"]), fmt(r["h_o"]), fmt_ci(r)]
        if best:
            cells.append(f"{r['h_o'] / single[best]['h_o']:.2f}" if single[best]["h_o"] else "n/a")
        cells += fmt_change(r)
        if multi:
            m = multi.get(name)
            if m:
                mb = multi["base model"]["acc_s"]
                cells += [fmt(m["acc_e"]), f"{fmt(m['acc_s'])} ({m['acc_s'] / mb:.0%})",
                          fmt(m["acc_g"]), fmt(m["h_o"]), fmt_ci(m)]
                if best:
                    ref = multi.get(best, {}).get("h_o")
                    cells.append(f"{m['h_o'] / ref:.2f}" if ref else "n/a")
                cells += fmt_change(m)
            else:
                cells += ["n/a"] * (8 if best else 7)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_line(rows: dict, name: str, setting: str, bar: float, top: float | None = None) -> str:
    """'<UnHype row>: <setting> H_o x (>= bar), above every baseline; intervals ...', and which
    baselines sit at the ceiling `top` (h_o_ceiling), where nothing that leaves other images
    alone can be above them."""
    others = [o for o in rows if not o.startswith("UnHype") and o != "base model"]
    r = rows[name]
    if not others:  # a run of UnHype rows only: nothing to be above
        return (f"{name}: {setting} H_o {fmt(r['h_o'])} ({'>=' if r['h_o'] >= bar else '<'} "
                f"{100 * bar:.0f}); no baseline rows in this run")
    beats = all(r["h_o"] > rows[o]["h_o"] for o in others)
    # told apart: one interval lies wholly above the other
    ci = {o: rows[o]["h_o_ci"] for o in others if rows[o].get("h_o_ci")} if r.get("h_o_ci") \
        else {}
    tied = [o for o, (lo, hi) in ci.items() if r["h_o_ci"][0] <= hi and lo <= r["h_o_ci"][1]]
    below = [o for o, (lo, _) in ci.items() if lo > r["h_o_ci"][1]]
    told = [f"95% intervals overlap with: {' / '.join(tied)}"] if tied else []
    told += [f"its 95% interval lies wholly below that of: {' / '.join(below)}"] if below else []
    capped = [o for o in others if top is not None and rows[o]["h_o"] >= top - 1e-9]
    told += [f"{' / '.join(capped)} at the ceiling H_o {fmt(top)} (full erasure, other classes "
             f"as the base model draws them), which no method leaving other images alone can be "
             f"above; this row is {100 * (top - r['h_o']):.1f} below it"] if capped else []
    return (f"{name}: {setting} H_o {fmt(r['h_o'])} ({'>=' if r['h_o'] >= bar else '<'} "
            f"{100 * bar:.0f}), {'above' if beats else 'NOT above'} every baseline; "
            + ("; ".join(told) or ("its 95% interval lies above every baseline's" if ci
                                   else "no intervals (image counts unknown)")))


def goals(single, multi, per_target=None) -> list[str]:
    out = []
    top_single, top_multi = ceiling(single, per_target), multi and ceiling(multi)
    for n in [n for n in single if n.startswith("UnHype")]:
        out.append(goal_line(single, n, "single-concept", 0.95, top_single))
        if multi and n in multi:
            out.append(goal_line(multi, n, "multi-concept", 0.90, top_multi))
    return out


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!docs/results.md"],  # the file this run rewrites
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="circle,square,triangle",
                    help="single-concept targets (averaged)")
    ap.add_argument("--multi", default="circle,triangle,cross,star,crescent",
                    help="classes erased together by one model ('' to skip)")
    ap.add_argument("--variants", default="per_layer/fields",
                    help=f"UnHype variant/mode list or 'all' ({', '.join(ALL_VARIANTS)}); "
                    "'+adv0.5' after one trains it with adversarial gate training at eps 0.5, "
                    "'+cosine' (or another --lr_scheduler name) with that learning-rate schedule; "
                    "'@2' at the end scores it at inference strength 2 (the same trained file)")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help="comma-separated; 'spm@2': a LoRA baseline at inference strength 2")
    ap.add_argument("--steps", type=int, default=300, help="training steps of every trained method")
    ap.add_argument("--per-class", dest="per_class", type=int, default=10,
                    help="images per class and set")
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    ap.add_argument("--generality", default="synonyms",
                    help="kinds of prompt in the Acc_g set: synonyms (MACE), or a harder set "
                    "such as synonyms,paraphrases,misspellings (unhype eval --generality)")
    ap.add_argument("--classifier", default="judge", help="judge (toy CNN) or toy (toy CLIP)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--single-also", dest="single_also", action="append", default=[],
                    help="also tabulate the cached single-concept rows of another --out folder "
                         "(e.g. a run with more steps; same --targets)")
    ap.add_argument("--multi-also", dest="multi_also", action="append", default=[],
                    help="also tabulate the cached multi-concept rows of another --out folder "
                         "(e.g. a run with more steps)")
    ap.add_argument("--over-seeds", dest="over_seeds", action="append", default=[],
                    help="DIR,DIR,...: --only single runs of one setting with different --seed "
                    "(the same targets and evaluation): a section with each method's H_o per "
                    "training seed, mean, range and seeds above every baseline")
    ap.add_argument("--include", action="append", default=[],
                    help="append a markdown table another benchmark wrote (robustness.py's "
                         "robustness.md, bench_speed.py's output)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 2, or 1 when the CPUs are already busy)")
    ap.add_argument("--eval-seed", dest="eval_seed", type=int, default=1234)
    ap.add_argument("--toy-weights", dest="toy_weights", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/compare")
    ap.add_argument("--docs", type=lambda v: Path(v) if v else None,
                    default=ROOT / "docs/results.md",
                    help="markdown written from this run ('' to skip)")
    ap.add_argument("--unhype-dir", dest="unhype_dir", default=None,
                    help="use hypernetworks already trained there (benchmarks/toy_erasure_table.py "
                    "layout) where concepts match, instead of training them")
    ap.add_argument("--only", choices=("single", "multi"), default=None,
                    help="compute one setting's rows into the cache and stop (to split a run "
                    "over processes); a run without it then prints and writes everything")
    ap.add_argument("--title", default="Results: UnHype and baselines on the toy world",
                    help="the page's heading")
    ap.add_argument("--note", default="", help="a line for docs/results.md (e.g. which weights)")
    ap.add_argument("--cached-only", dest="cached_only", action="store_true",
                    help="assemble the table from cached rows only (missing ones: n/a)")
    ap.add_argument("--force", action="store_true", help="ignore cached (setting, method) rows "
                    "and train every baseline again (not loaded from <setting>/trained/)")
    args = ap.parse_args(argv)
    args.variants = list(ALL_VARIANTS) if args.variants == "all" else \
        [v.strip() for v in args.variants.split(",") if v.strip()]
    missing = [p for p in args.include + args.multi_also + args.single_also
               + [d for group in args.over_seeds for d in group.split(",")]
               if not Path(p).exists()]
    if missing:  # before hours of work, not after
        ap.error(f"--include / --single-also / --multi-also / --over-seeds: not found: "
                 f"{', '.join(missing)}")
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    try:
        args.generality = list(parse_generality(args.generality))
    except UnHypeError as exc:
        ap.error(str(exc))
    # rows of two protocols must not meet in one table; folders older than --generality: synonyms
    cached = run_settings(args.out).get("generality", ["synonyms"]) \
        if any(args.out.glob("*/*.json")) else args.generality
    if cached != args.generality and not args.force:
        ap.error(f"--out {args.out} holds rows measured with --generality {','.join(cached)}; "
                 "give another --out (or --force to recompute every row)")
    if not args.cached_only:
        record_settings(args)  # before any row, so a second process on this --out sees them
    try:
        for spec in args.baselines + args.variants:
            split_strength(spec)
    except ValueError as exc:
        ap.error(str(exc))
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    multi = [t.strip() for t in args.multi.split(",") if t.strip()]

    import torch

    from unhype.trainer.backends.toy import ToyBackend
    from unhype.evaluation.harness import ToyGenerator
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.toy.model import set_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or set_threads()
    t_start = time.time()
    backend = ToyBackend("cpu", args.toy_weights)
    gen = ToyGenerator(backend.toy)
    ps = load_prompt_set("toy")
    args.n_classes = len(ps.classes)
    clf = load_classifier(args.classifier, ps.class_names, ps.class_prompts(),
                          toy_weights=args.toy_weights)
    say(f"compare_methods: {len(targets)} single targets, multi {multi}, variants "
        f"{args.variants}, {args.steps} steps, {args.per_class} images/class, torch threads "
        f"{threads}, classifier {clf.description}")
    if args.only == "multi":  # fill the cache only; a later full run assembles the table
        method_rows(args, backend, gen, ps, clf, multi, f"multi-{len(multi)}")
        return
    per_target = [method_rows(args, backend, gen, ps, clf, [t], f"single-{t}") for t in targets]
    if args.only == "single":
        return
    single = mean_rows(per_target)
    multi_rows = method_rows(args, backend, gen, ps, clf, multi, f"multi-{len(multi)}") \
        if multi else None
    text = table(single, multi_rows)
    minutes = (time.time() - t_start) / 60
    print(text)
    for g in goals(single, multi_rows, per_target):
        print("- " + g)
    summary = {"single_mean": single, "single": dict(zip(targets, per_target)),
               "multi": multi_rows, "multi_concepts": multi, "settings": {
                   k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "commit": commit(), "minutes": round(minutes, 1), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.docs is not None:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.docs, docs_text(text, single, per_target, targets, multi,
                                               multi_rows, args, minutes, clf.description))
        say(f"compare_methods: wrote {args.docs}")


def docs_text(text, single, per_target, targets, multi, multi_rows, args, minutes, clf):
    lines = [
        f"# {args.title}",
        "",
        "Written by `python benchmarks/compare_methods.py` (never by hand); rerun it to update.",
        "",
        f"- commit: `{commit()}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        + ("assembled from the cached rows of earlier runs (--cached-only)" if args.cached_only
           else f"rows made in {row_minutes(per_target, multi_rows):.0f} min of training and "
           f"evaluation on CPU (cached rows included; this invocation {minutes:.0f} min)"),
        f"- protocol (MACE, METHOD.md): Acc_e = erased classes prompted by name, Acc_s = the "
        f"other classes, Acc_g = the erased classes prompted by {generality_words(args.generality)}; "
        f"H_o = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)); classifier: {clf}; "
        f"{args.per_class} images per class and set, eval seed {args.eval_seed}",
        "- others within 1 level of base / mean change: each other-class image against the base "
        "model's image of the same prompt and seed (`unhype.evaluation.metrics.paired_change`): "
        "the share in which no pixel, saved as 8-bit, moves by more than one level, and the mean "
        "absolute difference in 8-bit levels; n/a: a row cached before this was measured",
        "- H_o 95% interval: each accuracy drawn from its Jeffreys posterior given the image "
        "counts, H_o per draw, averaged over targets (`unhype.evaluation.metrics.h_o_interval`);"
        " two methods whose intervals overlap are not told apart by this many images",
        f"- single concept: mean over {', '.join(targets)}; multi-concept: "
        + (f"{', '.join(multi)} erased by one model" if multi else
           "in the sections below (other runs)"),
        f"- every trained method: {args.steps} steps, seed {args.seed}, the trainer's concepts "
        f"(toy templates x colours), latent cache and ESD-with-anchor target (anchor '', "
        f"eta 1); UnHype uses unhype/trainer/configs/toy_demo.toml otherwise",
        f"- settings: `{json.dumps(shown_settings(args), sort_keys=True)}`",
        *([f"- note: {args.note}"] if args.note else []),
        "", text, "", "Goals (issue 7):", ""]
    lines += ["- " + g for g in goals(single, multi_rows, per_target)]
    lines += ["", "## Per target", "", "| target | method | Acc_e | Acc_s | Acc_g | H_o | "
              "H_o 95% interval | " + " | ".join(CHANGE_HEAD) + " | train s | eval s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, rows in zip(targets, per_target):
        for name, r in rows.items():
            lines.append(f"| {t} | {name} | {fmt(r['acc_e'])} | {fmt(r['acc_s'])} | "
                         f"{fmt(r['acc_g'])} | {fmt(r['h_o'])} | {fmt_ci(r)} | "
                         f"{' | '.join(fmt_change(r))} | "
                         f"{r.get('train_seconds', 0):.0f} | {r.get('seconds', 0):.0f} |")
    for extra in args.single_also:
        lines += single_section(Path(extra), targets, args.per_class, args.n_classes)
    for extra in args.multi_also:
        lines += multi_section(Path(extra), args.per_class, args.n_classes)
    for group in args.over_seeds:
        lines += seeds_section([Path(p) for p in group.split(",")], targets, args.per_class,
                               args.n_classes)
    for path in args.include:  # tables another benchmark printed (robustness, speed)
        where = f"{Path(path).parent.name}/{Path(path).name}"  # two robustness.md files differ
        lines += ["", f"## From `{where}`", "", Path(path).read_text().strip()]
    lines.append("")
    return "\n".join(lines)


def row_minutes(per_target: list[dict], multi_rows: dict | None) -> float:
    """The training and evaluation minutes behind the main table's rows (a run that finds its
    rows cached takes seconds; the rows took these)."""
    rows = [r for rows in per_target for r in rows.values()] + list((multi_rows or {}).values())
    # a row at another strength reports its weights' training, which its strength-1 row counts
    return sum(r.get("seconds", 0) + (0 if ", strength " in r.get("name", "")
                                      else r.get("train_seconds", 0)) for r in rows) / 60


def shown_settings(args) -> dict:
    """The run's options for the page's settings line (the note has a line of its own)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("note", "title")}


def record_settings(args) -> None:
    """What an `--only` run leaves for a later `--single-also` / `--multi-also` (run_settings)."""
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "settings.json", json.dumps(
        {"steps": args.steps, "per_class": args.per_class, "generality": args.generality,
         "eval_seed": args.eval_seed, "seed": args.seed}))


def generality_words(kinds) -> str:
    """What the Acc_g set holds, for the tables' captions."""
    words = {"synonyms": "synonyms (never trained on)", "paraphrases": "the name in paraphrased "
             "wordings (unhype.evaluation.prompts.PARAPHRASE_TEMPLATES)",
             "misspellings": "misspellings of the name",
             "composites": "the name beside a class not erased"}
    return ", ".join(words[k] for k in kinds) + (" in turn" if len(kinds) > 1 else "")


def run_settings(out_dir: Path) -> dict:
    """The settings another run recorded (`--only` runs: settings.json; full runs: summary)."""
    if (out_dir / "settings.json").is_file():
        return json.loads((out_dir / "settings.json").read_text())
    if (out_dir / "summary.json").is_file():
        return json.loads((out_dir / "summary.json").read_text())["settings"]
    return {}


def section_targets(out_dir: Path, targets: list[str]) -> list[str]:
    """The targets another run's single-concept rows are averaged over: every `single-<t>`
    folder it has (a run over more targets than this one's gets its own mean), in the order of
    this run's `targets`, then the toy world's class order."""
    from unhype.toy.data import SHAPES

    have = {p.name.removeprefix("single-") for p in out_dir.glob("single-*") if p.is_dir()}
    order = list(targets) + [s for s in SHAPES if s not in targets]
    return [t for t in order if t in have] + sorted(have - set(order))


def section_rows(out_dir: Path, own: list[str], per_class: int, n_classes: int) -> list[dict]:
    """Another run's cached single-concept rows for the targets `own`, one {method: row} per
    target, keeping only the methods with a row for every target ([] without a base row)."""
    per_target = []
    for t in own:
        rows = [with_counts(json.loads(p.read_text()), per_class, 1, n_classes)
                for p in sorted((out_dir / f"single-{t}").glob("*.json"))]
        per_target.append({r["name"]: r for r in rows})
    names = [n for n in per_target[0] if all(n in rows for rows in per_target)]
    if "base model" not in names:
        return []
    return [{n: rows[n] for n in names} for rows in per_target]


def single_section(out_dir: Path, targets: list[str], per_class: int, n_classes: int) -> list[str]:
    """The cached single-concept rows of another run, averaged over its own targets
    (`section_targets`; methods without a row for every one of them are left out)."""
    settings = run_settings(out_dir)
    per_class = settings.get("per_class", per_class)
    own = section_targets(out_dir, targets)
    if not own:
        return ["", f"## Single concept ({out_dir.name}): no rows"]
    over = "" if own == list(targets) else f", {len(own)} targets"
    complete = section_rows(out_dir, own, per_class, n_classes)
    if not complete:
        return ["", f"## Single concept ({out_dir.name}): no complete rows"]
    single = mean_rows(complete)
    generality = settings.get("generality", ["synonyms"])
    harder = generality != ["synonyms"]
    lines = ["", f"## Single concept, {settings.get('steps', '?')} steps for every trained method"
             + (", harder generality set" if harder else "") + over + f" ({out_dir.name})", "",
             table(single, None), "",
             f"Mean over {', '.join(own)}; {per_class} images per class and set; eval seed "
             f"{settings.get('eval_seed', '?')}, training seed {settings.get('seed', '?')}; methods "
             f"without a row for every target left out."
             + (f" Acc_g: the erased class prompted by {generality_words(generality)}."
                if harder else "")]
    top = ceiling(single, complete)
    lines += ["- " + goal_line(single, n, "single-concept", 0.95, top) for n in single
              if n.startswith("UnHype")]
    if harder:
        lines += kind_table(single, generality, ", mean over the targets")
    return lines


def seeds_section(out_dirs: list[Path], targets: list[str], per_class: int,
                  n_classes: int) -> list[str]:
    """One setting trained with several seeds (one `--only single` run per training seed, the
    same targets): each method's single-concept H_o per seed, its mean and range over the seeds,
    and in how many seeds it is above every baseline. Methods without a row for every target in
    every run are left out."""
    runs = []
    for out_dir in out_dirs:
        settings = run_settings(out_dir)
        own = section_targets(out_dir, targets)
        complete = own and section_rows(out_dir, own, settings.get("per_class", per_class),
                                        n_classes)
        if not complete:
            return ["", f"## Over training seeds: {out_dir.name} has no complete rows"]
        runs.append((settings, own, mean_rows(complete)))
    if any(own != runs[0][1] for _, own, _ in runs):
        raise SystemExit("--over-seeds: the runs' targets differ: "
                         + "; ".join(f"{d.name}: {', '.join(own)}"
                                     for d, (_, own, _) in zip(out_dirs, runs)))
    keys = [(s.get("eval_seed"), s.get("generality", ["synonyms"]), s.get("per_class"))
            for s, _, _ in runs]
    if any(k != keys[0] for k in keys):
        raise SystemExit("--over-seeds: the runs were evaluated differently (eval seed, "
                         "generality set or images per class); only the training seed may differ")
    seeds = [s.get("seed", "?") for s, _, _ in runs]
    names = [n for n in runs[0][2] if all(n in means for _, _, means in runs)]
    baselines = [n for n in names if not n.startswith("UnHype") and n != "base model"]
    lines = ["", f"## Single concept over training seeds {', '.join(map(str, seeds))} "
             f"({', '.join(d.name for d in out_dirs)})", "",
             "| method | " + " | ".join(f"H_o, seed {s}" for s in seeds)
             + " | mean | range | seeds above every baseline |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for n in names:
        h = [means[n]["h_o"] for _, _, means in runs]
        wins = sum(all(means[n]["h_o"] > means[b]["h_o"] for b in baselines)
                   for _, _, means in runs)
        above = f"{wins} of {len(runs)}" if n.startswith("UnHype") and baselines else ""
        lines.append(f"| {n} | " + " | ".join(fmt(v) for v in h)
                     + f" | {fmt(sum(h) / len(h))} | {fmt(min(h))}-{fmt(max(h))} | {above} |")
    lines += ["", f"Each cell: the mean over {', '.join(runs[0][1])}; {keys[0][2] or per_class} "
              f"images per class and set, eval seed {keys[0][0]}, Acc_g: the erased class "
              f"prompted by {generality_words(keys[0][1])}. 'Above every baseline': strictly "
              "above each baseline's H_o of the same seed."]
    return lines


def multi_section(out_dir: Path, per_class: int, n_classes: int) -> list[str]:
    """The cached multi-concept rows of another run (`--only multi --out DIR --steps N`); its
    `multi-<k>` folder says how many classes were erased."""
    settings = run_settings(out_dir)
    per_class = settings.get("per_class", per_class)
    folders = sorted(out_dir.glob("multi-*"))
    if not folders:
        return ["", f"## Multi-concept ({out_dir.name}): no rows"]
    n_erased = int(folders[0].name.split("-")[1])
    rows = [with_counts(json.loads(p.read_text()), per_class, n_erased, n_classes)
            for p in sorted(folders[0].glob("*.json"))]
    generality = settings.get("generality", ["synonyms"])
    harder = generality != ["synonyms"]
    lines = ["", f"## Multi-concept, {settings.get('steps', '?')} steps for every trained method"
             + (", harder generality set" if harder else "") + f" ({out_dir.name})", "",
             "| method | Acc_e | Acc_s | Acc_g | H_o | H_o 95% interval | "
             + " | ".join(CHANGE_HEAD) + " | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["h_o"]):
        lines.append(f"| {r['name']} | {fmt(r['acc_e'])} | {fmt(r['acc_s'])} | "
                     f"{fmt(r['acc_g'])} | {fmt(r['h_o'])} | {fmt_ci(r)} | "
                     f"{' | '.join(fmt_change(r))} | {r.get('train_seconds', 0):.0f} |")
    by_name = {r["name"]: r for r in rows}
    lines += ["", f"{per_class} images per class and set." + (
        f" Acc_g: the erased classes prompted by {generality_words(generality)} (eval seed "
        f"{settings.get('eval_seed', '?')})." if harder else "")] + \
        ["- " + goal_line(by_name, n, "multi-concept", 0.90, ceiling(by_name)) for n in by_name
         if n.startswith("UnHype")]
    if harder:
        lines += kind_table(by_name, generality)
    return lines


def kind_table(rows: dict, generality: list[str], over: str = "") -> list[str]:
    """Acc_g per kind of prompt, one line per method (`over`: ', mean over the targets')."""
    return ["", f"Acc_g per kind of prompt{over} (n/a: a row measured before the harness split "
            "it by kind):", "", "| method | " + " | ".join(generality) + " |",
            "|---|" + "---|" * len(generality)] + \
        [f"| {n} | " + " | ".join(fmt(r.get(f"acc_g_{k}")) for k in generality) + " |"
         for n, r in rows.items()]


if __name__ == "__main__":
    main()
