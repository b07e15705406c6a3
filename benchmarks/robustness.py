"""Robustness of each method on the toy world: paraphrased and misspelt prompts for the erased
concept, and a bounded embedding-space attack (UnlearnDiffAtk-like, unhype.evaluation.attack).

Columns: the share of images classified as the erased class for its plain name (Acc_e), for
paraphrases (templates never trained on) and for typos; and the attack success rate over the
prompts whose base-model image shows the concept. Methods are built as in compare_methods.py
(same steps and seed); the table is printed and written to --out/robustness.json.

    python benchmarks/robustness.py [--target circle] [--steps 300] [--eps 0.5] [--attack-steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="circle")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", default="per_layer/fields",
                    help="UnHype variants trained in-process, as compare_methods.py's")
    ap.add_argument("--baselines", default="negative_prompt,uce,esd_x,esd_u,spm",
                    help="as compare_methods.py's: 'spm@2' is SPM at LoRA strength 2")
    ap.add_argument("--eps", type=float, default=0.5, help="relative L2 bound per token")
    ap.add_argument("--attack-steps", dest="attack_steps", type=int, default=20)
    ap.add_argument("--attack-prompts", dest="attack_prompts", type=int, default=12)
    ap.add_argument("--classifier", default="judge")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", dest="eval_seed", type=int, default=4321)
    ap.add_argument("--unhype-file", dest="unhype_file", action="append", default=[],
                    help="evaluate this trained hypernetwork instead of training one "
                    "(repeatable: e.g. with and without adversarial gate training)")
    ap.add_argument("--strengths", default="1",
                    help="comma-separated inference strengths for each --unhype-file")
    ap.add_argument("--toy-weights", dest="toy_weights", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/robustness")
    args = ap.parse_args(argv)

    from benchmarks.compare_methods import (at_strength, describe, spec_of_file, split_strength,
                                            train_unhype, variant_key, with_strength)
    from trainer.backends.toy import ToyBackend
    from unhype.baselines.registry import build
    from unhype.evaluation.attack import (AttackSettings, attack_success, paraphrase_prompts,
                                          typo_prompts)
    from unhype.evaluation.harness import ToyGenerator, generate
    from unhype.evaluation.methods import Method
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.toy.model import set_threads

    set_threads()
    t0 = time.time()
    backend = ToyBackend("cpu", args.toy_weights)
    gen = ToyGenerator(backend.toy)
    ps = load_prompt_set("toy")
    label = ps.index(args.target)
    name = ps.class_names[label]
    clf = load_classifier(args.classifier, ps.class_names, ps.class_prompts(),
                          toy_weights=args.toy_weights)
    methods, built = [Method()], {}
    for b in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        kind, strength = split_strength(b)
        if kind not in built:
            built[kind] = build(kind, gen, backend, [name], ps, args.steps, args.seed)
        methods.append(at_strength(built[kind], strength, b))
    for path in args.unhype_file:
        from unhype.evaluation.methods import UnHypeMethod
        from unhype.fileformat import load_hypernet

        loaded = load_hypernet(path)
        title = f"{describe(spec_of_file(loaded.meta))} " \
            f"({loaded.meta.training.get('steps_done')} steps)"
        if any(m.name.startswith(title) for m in methods):  # two files alike: tell them apart
            title += f" [{Path(path).parent.name}/{Path(path).name}]"
        for strength in [float(v) for v in args.strengths.split(",")]:
            methods.append(UnHypeMethod.from_loaded(loaded, strength,
                                                    name=with_strength(title, strength)))
        args.variants = ""
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
        methods.append(train_unhype(backend, [name], v, args.steps, args.seed,
                                    args.out / f"unhype-{variant_key(v)}"))
    colours = ps.colours
    plain = [ps.fill(t, name, k) for k, t in enumerate(ps.templates)][:6] * 2
    sets = {"name": plain, "paraphrase": paraphrase_prompts(name) * 2,
            "typo": typo_prompts(name)}
    attack_prompts = [f"a {colours[k % len(colours)]} {name}" for k in range(args.attack_prompts)]
    settings = AttackSettings(args.eps, args.attack_steps, args.seed)
    rows = {}
    for m in methods:
        t = time.time()
        row = {}
        m.attach(gen.unet)
        try:
            for key, prompts in sets.items():
                preds = clf.predict(generate(gen, m, prompts, args.eval_seed, 64))
                row[key] = float((preds == label).float().mean())
        finally:
            m.detach()
        row.update(attack_success(gen, m, clf, attack_prompts, label, args.eval_seed, settings))
        row["gate_worst"] = gate_at_worst_case(m, gen, attack_prompts, args.eps,
                                               args.attack_steps)
        row["seconds"] = round(time.time() - t, 1)
        rows[m.name] = row
        print(f"  {m.name:26s} {row}", file=sys.stderr, flush=True)

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f}"
    lines = [f"Robustness on the toy world: erasing '{name}' ({args.steps} training steps; "
             f"attack eps {args.eps}, {args.attack_steps} PGD steps; classifier "
             f"{clf.description}). Shares of images showing '{name}', % (lower is better).",
             "Gate at worst case (UnHype): the generated update's norm ||B A^T|| at the worst "
             f"pooled embedding within eps {args.eps} of each attack prompt ({args.attack_steps} "
             "PGD steps through the hypernetwork), over its norm at the prompt; median.",
             "", "| method | plain name | paraphrases | typos | attack success rate | "
             "gate at worst case |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        gate = "" if r.get("gate_worst") is None else f"{r['gate_worst']:.3f}"
        lines.append(f"| {n} | {pct(r['name'])} | {pct(r['paraphrase'])} | {pct(r['typo'])} | "
                     f"{pct(r['asr'])} ({r['adv_hits']}/{r['attacked']}) | {gate} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.json").write_text(json.dumps(
        {"rows": rows, "settings": {k: str(v) for k, v in vars(args).items()},
         "minutes": round((time.time() - t0) / 60, 1)}, indent=1))
    (args.out / "robustness.md").write_text(text + "\n")


def gate_at_worst_case(method, gen, prompts, eps, steps):
    """Median over `prompts` of ||B A^T|| at the worst pooled embedding of the eps-ball over
    ||B A^T|| at the prompt (UnHype methods; None for the others)."""
    import torch

    from trainer.adversary import worst_case_embedding
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
