"""Robustness of each method on the toy world: paraphrased and misspelt prompts for the erased
concept, and a bounded embedding-space attack (UnlearnDiffAtk-like, unhype.evaluation.attack).

Columns: the share of images classified as the erased class for its plain name (Acc_e), for
paraphrases (templates never trained on) and for typos; and the attack success rate over the
prompts whose base-model image shows the concept. Methods are built as in compare_methods.py
(same steps and seed). With several targets (`--target circle,square,triangle`) each is erased
by its own model (with `--together`, one model erases them all and is attacked on each in
turn: the multi-concept setting), every (target, method) row is saved as it finishes (a rerun
resumes; `--force` recomputes), and a table over the targets pools the attacks with a 95%
interval. With `--trained-from` a compare_methods.py output folder lends its trained baselines
and UnHype files, so the attack is measured on the very weights of its H_o table.
The tables are printed and written to --out/robustness.{md,json}.

    python benchmarks/robustness.py [--target circle[,square,...]] [--together] [--steps 300]
        [--eps 0.5] [--attack-steps 20] [--unhype-file 'runs/x/{target}/hypernet.safetensors']
        [--trained-from runs/compare] [--h-o-from runs/compare/summary.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="circle", help="erased class; comma-separated: one "
                    "model per target, and a table over them")
    ap.add_argument("--together", action="store_true",
                    help="one model erases every --target (multi-concept), attacked on each")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", default="per_layer/fields",
                    help="UnHype variants trained in-process, as compare_methods.py's "
                    "(default per_layer/fields, none when --unhype-file is given); '@2' "
                    "at the end: the same file at inference strength 2")
    ap.add_argument("--baselines", default="negative_prompt,uce,esd_x,esd_u,spm",
                    help="as compare_methods.py's: 'spm@2' is SPM at LoRA strength 2")
    ap.add_argument("--eps", type=float, default=0.5, help="relative L2 bound per token")
    ap.add_argument("--attack-steps", dest="attack_steps", type=int, default=20)
    ap.add_argument("--attack-prompts", dest="attack_prompts", type=int, default=12)
    ap.add_argument("--classifier", default="judge")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", dest="eval_seed", type=int, default=4321)
    ap.add_argument("--unhype-file", dest="unhype_file", action="append", default=[],
                    help="evaluate this trained hypernetwork ('{target}' in the path is "
                    "replaced by each target) instead of training one (repeatable)")
    ap.add_argument("--strengths", default="1",
                    help="comma-separated inference strengths for each --unhype-file")
    ap.add_argument("--toy-weights", dest="toy_weights", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 2, or 1 when the CPUs are already busy)")
    ap.add_argument("--trained-from", dest="trained_from", type=Path, default=None,
                    help="a compare_methods.py --out folder: baselines (ESD-x/u, SPM) and "
                    "--variants are loaded from its setting folders (single-<target>, or "
                    "multi-<n> with --together) when trained there with these steps, seed and "
                    "concepts; the others are trained and kept there for the next run")
    ap.add_argument("--h-o-from", dest="h_o_from", type=Path, action="append", default=[],
                    help="a compare_methods.py summary.json (repeatable): the table over "
                    "targets gets each method's H_o from it (matched by name; single-concept, "
                    "or multi-concept with --together)")
    ap.add_argument("--force", action="store_true", help="recompute saved rows")
    ap.add_argument("--cached-only", dest="cached_only", action="store_true",
                    help="tables from saved rows only (methods without one are left out)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/robustness")
    args = ap.parse_args(argv)
    if args.unhype_file and args.variants == ap.get_default("variants"):
        args.variants = ""

    t0 = time.time()
    backend, gen, ps, clf = toy_world(args.threads, args.toy_weights, args.classifier)
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    rows, built = {}, {}  # built: methods by (concepts, kind), shared by targets --together
    for target in targets:
        rows[target] = run_target(args, target, backend, gen, ps, clf, built)
    sections = [target_table(args, ps.class_names[ps.index(t)], clf.description, rows[t])
                for t in targets]
    if len(targets) > 1:
        sections.insert(0, pooled_table(args, targets, clf.description, rows,
                                        h_o_of(args.h_o_from, args.together)))
    text = "\n\n".join(sections)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.json").write_text(json.dumps(
        {"rows": rows[targets[0]] if len(targets) == 1 else rows,
         "settings": {k: str(v) for k, v in vars(args).items()},
         "minutes": round((time.time() - t0) / 60, 1)}, indent=1))
    (args.out / "robustness.md").write_text(text + "\n")


def toy_world(threads: int | None, toy_weights, classifier: str = "judge"):
    """(backend, generator, prompt set, classifier) of the toy world, with `threads` torch
    threads (None: 2, or 1 when the CPUs are already busy)."""
    import torch

    from unhype.evaluation.harness import ToyGenerator
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.toy.model import set_threads
    from unhype.trainer.backends.toy import ToyBackend

    if threads:
        torch.set_num_threads(threads)
    else:
        set_threads()
    backend = ToyBackend("cpu", toy_weights)
    ps = load_prompt_set("toy")
    clf = load_classifier(classifier, ps.class_names, ps.class_prompts(), toy_weights=toy_weights)
    return backend, ToyGenerator(backend.toy), ps, clf


def h_o_of(summaries, together: bool) -> dict:
    """{method name: H_o} from compare_methods.py summary.json files (a later file's row wins):
    the single-concept means, or the multi-concept rows for a --together table."""
    h_o = {}
    for path in summaries:
        summary = json.loads(Path(path).read_text())
        h_o.update({name: r["h_o"] for name, r in
                    (summary.get("multi" if together else "single_mean") or {}).items()})
    return h_o


def erased_concepts(args, target, ps) -> tuple[list[str], str]:
    """The concepts the models attacked on `target` erase, and their compare_methods.py setting
    folder: the target alone (single-<target>), or every target with --together (multi-<n>)."""
    names = [t.strip() for t in args.target.split(",") if t.strip()] if args.together \
        else [target]
    for t in names:
        ps.index(t)  # an unknown class fails here, with the classes it knows
    return names, f"multi-{len(names)}" if args.together else f"single-{target}"


def compare_args(args):
    """compare_methods.py's options for loading from --trained-from: its store and kept files
    are keyed by these (robustness --force recomputes rows, not trainings)."""
    return argparse.Namespace(out=args.trained_from, steps=args.steps, seed=args.seed,
                              toy_weights=args.toy_weights, force=False)


def method_specs(args, target, gen, backend, ps, built=None):
    """(row name, builder) for each method of this target, in table order; the name is known
    before building, so a saved row skips the build (and a file's weights are not loaded).
    `built` caches the models by (concepts, method), so --together builds each one once."""
    from benchmarks.compare_methods import (at_strength, baseline, describe, kept_or_trained,
                                            parse_variant, spec_of_file, split_strength,
                                            train_unhype, trained_steps, variant_key,
                                            with_strength)
    from unhype.baselines.registry import build
    from unhype.evaluation.methods import UnHypeMethod
    from unhype.evaluation.trained import TrainedStore
    from unhype.fileformat import load_hypernet, read_meta

    concepts, tag = erased_concepts(args, target, ps)
    built = {} if built is None else built
    specs = []

    def make_baseline(kind):
        if args.trained_from is None:
            return build(kind, gen, backend, concepts, ps, args.steps, args.seed)
        return baseline(compare_args(args), kind, gen, backend, concepts, ps,
                        TrainedStore(args.trained_from / tag))

    def make_unhype(spec):
        if args.trained_from is None:
            folder = args.out / (tag if args.together else target)  # one file per model
            return train_unhype(backend, concepts, spec, args.steps, args.seed,
                                folder / f"unhype-{variant_key(spec)}")
        return kept_or_trained(compare_args(args), backend, tag, spec, concepts)

    def cached(kind, make):
        key = (tuple(concepts), kind)
        if key not in built:
            built[key] = make(kind)
        return built[key]

    for b in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        def make(b=b):
            kind, strength = split_strength(b)
            return at_strength(cached(kind, make_baseline), strength, b)
        specs.append((b, make))
    for template in args.unhype_file:
        path = template.replace("{target}", target)
        meta = read_meta(path)
        title = f"{describe(spec_of_file(meta))} ({meta.training.get('steps_done')} steps)"
        if any(s[0] == title for s in specs):  # two files alike: tell them apart
            title += f" [{Path(path).parent.name}/{Path(path).name}]"
        for strength in [float(v) for v in args.strengths.split(",")]:
            row_name = with_strength(title, strength)
            specs.append((row_name, lambda path=path, strength=strength, row_name=row_name:
                          UnHypeMethod.from_loaded(load_hypernet(path), strength, name=row_name)))
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
        spec, strength = split_strength(v)
        row_name = with_strength(f"{describe(parse_variant(spec)._replace(steps=0))} "
                                 f"({trained_steps(spec, args.steps)} steps)", strength)

        def make(v=v, spec=spec, strength=strength, row_name=row_name):
            method = at_strength(cached(spec, make_unhype), strength, v)
            method.name = row_name
            return method
        specs.append((row_name, make))
    return specs


def run_target(args, target, backend, gen, ps, clf, built=None) -> dict:
    """Every method's row for one erased target; each row saved under --out/<target>/."""
    from unhype.evaluation.attack import (AttackSettings, attack_success, paraphrase_prompts,
                                          typo_prompts)
    from unhype.atomic import atomic_write_text
    from unhype.evaluation.harness import generate
    from unhype.evaluation.methods import Method

    label = ps.index(target)
    name = ps.class_names[label]
    colours = ps.colours
    plain = [ps.fill(t, name, k) for k, t in enumerate(ps.templates)][:6] * 2
    sets = {"name": plain, "paraphrase": paraphrase_prompts(name) * 2,
            "typo": typo_prompts(name)}
    attack_prompts = [f"a {colours[k % len(colours)]} {name}" for k in range(args.attack_prompts)]
    settings = AttackSettings(args.eps, args.attack_steps, args.seed)
    folder = args.out / target
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for title, make in [("base model", Method)] + method_specs(args, target, gen, backend, ps,
                                                               built):
        saved = folder / f"{slug(title)}.json"
        if saved.is_file() and not args.force:
            row = json.loads(saved.read_text())
            rows[row.pop("method")] = row
            continue
        if args.cached_only:
            continue
        t = time.time()
        m = make()
        row = {}
        m.attach(gen.unet)
        try:
            for key, prompts in sets.items():
                preds = clf.predict(generate(gen, m, prompts, args.eval_seed, 64))
                row[key] = float((preds == label).float().mean())
                row[f"n_{key}"] = len(prompts)
        finally:
            m.detach()
        row.update(attack_success(gen, m, clf, attack_prompts, label, args.eval_seed, settings))
        row["gate_worst"] = gate_at_worst_case(m, gen, attack_prompts, args.eps,
                                               args.attack_steps)
        row["seconds"] = round(time.time() - t, 1)
        rows[m.name] = row
        atomic_write_text(saved, json.dumps({"method": m.name, **row}))
        print(f"  {target}: {m.name:26s} {row}", file=sys.stderr, flush=True)
    return rows


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}"


def target_table(args, name, description, rows) -> str:
    lines = [f"Robustness on the toy world: erasing '{name}' ({args.steps} training steps; "
             f"attack eps {args.eps}, {args.attack_steps} PGD steps; classifier "
             f"{description}). Shares of images showing '{name}', % (lower is better).",
             "Gate at worst case (UnHype): the generated update's norm ||B A^T|| at the worst "
             f"pooled embedding within eps {args.eps} of each attack prompt ({args.attack_steps} "
             "PGD steps through the hypernetwork), over its norm at the prompt; median.",
             "", "| method | plain name | paraphrases | typos | attack success rate | "
             "gate at worst case |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        gate = "" if r.get("gate_worst") is None else f"{r['gate_worst']:.3f}"
        lines.append(f"| {n} | {pct(r['name'])} | {pct(r['paraphrase'])} | {pct(r['typo'])} | "
                     f"{pct(r['asr'])} ({r['adv_hits']}/{r['attacked']}) | {gate} |")
    return "\n".join(lines)


def pooled(rows_by_target: dict, method: str) -> dict | None:
    """One method's row over the targets: the prompt-set shares averaged (the sets have the same
    size per target), the attacks summed, with the success rate's 95% Jeffreys interval; None
    when a target lacks the method."""
    from unhype.evaluation.metrics import rate_interval

    rows = [r.get(method) for r in rows_by_target.values()]
    if any(r is None for r in rows):
        return None
    out = {key: sum(r[key] for r in rows) / len(rows) for key in ("name", "paraphrase", "typo")}
    out["attacked"] = sum(r["attacked"] for r in rows)
    out["adv_hits"] = sum(r["adv_hits"] for r in rows)
    out["asr"] = out["adv_hits"] / out["attacked"] if out["attacked"] else None
    out["asr_interval"] = rate_interval(out["adv_hits"], out["attacked"]) if out["attacked"] \
        else None
    out["per_target"] = {t: r[method]["asr"] for t, r in rows_by_target.items()}
    return out


def main_table_names(method: str) -> list[str]:
    """The names compare_methods.py may give this row: without the ' (400 steps)' a file's row
    has (the run's steps), or with ', 800 steps' after the recipe (a '+s800' variant)."""
    match = re.search(r" \((\d+) steps\)", method)
    if match is None:
        return [method]
    recipe, rest = method[:match.start()], method[match.end():]
    return [recipe + rest, f"{recipe}, {match.group(1)} steps{rest}"]


def pooled_table(args, targets, description, rows_by_target, h_o=None) -> str:
    h_o = h_o or {}
    lines = [f"Robustness on the toy world over {len(targets)} targets ({', '.join(targets)}), "
             + ("all erased by one model" if args.together else "each erased by its own model")
             + f" ({args.steps} training steps; attack eps {args.eps}, "
             f"{args.attack_steps} PGD steps, {args.attack_prompts} attack prompts per target; "
             f"classifier {description}). Shares of images showing the erased class, %, mean "
             "over the targets (lower is better); attack success pooled over the targets, with "
             "its 95% Jeffreys interval (overlapping intervals are not told apart)."
             + (f" H_o: the method's {'multi' if args.together else 'single'}-concept H_o "
                f"from {', '.join(str(p) for p in args.h_o_from)} (same files or settings, eval "
                "seed of that run)." if h_o else ""),
             "", "| method | " + ("H_o | " if h_o else "") + "plain name | paraphrases | "
             "typos | attack success rate | 95% interval | per target |",
             "|---|" + ("---|" if h_o else "") + "---|---|---|---|---|---|"]
    for method in rows_by_target[targets[0]]:
        r = pooled(rows_by_target, method)
        if r is None:
            continue
        lo, hi = r["asr_interval"] or (None, None)
        per = " / ".join(pct(v) for v in r["per_target"].values())
        ho = next((h_o[n] for n in main_table_names(method) if n in h_o), None)
        ho = ("n/a | " if ho is None else f"{100 * ho:.1f} | ") if h_o else ""
        lines.append(f"| {method} | {ho}{pct(r['name'])} | {pct(r['paraphrase'])} | "
                     f"{pct(r['typo'])} | {pct(r['asr'])} ({r['adv_hits']}/{r['attacked']}) | "
                     f"{pct(lo)}-{pct(hi)} | {per} |")
    return "\n".join(lines)


def gate_at_worst_case(method, gen, prompts, eps, steps):
    """Median over `prompts` of ||B A^T|| at the worst pooled embedding of the eps-ball over
    ||B A^T|| at the prompt (UnHype methods; None for the others)."""
    import torch

    from unhype.trainer.adversary import worst_case_embedding
    from unhype.hypernet import delta_norm

    hypernet = getattr(method, "hypernet", None)
    if hypernet is None:
        return None
    _, pooled = gen.encode(prompts)
    worst = worst_case_embedding(hypernet, pooled, eps, steps, torch.zeros_like(pooled))
    with torch.no_grad():
        ratio = delta_norm(hypernet(worst)) / delta_norm(hypernet(pooled)).clamp(min=1e-12)
    return float(ratio.median())


if __name__ == "__main__":
    main()
