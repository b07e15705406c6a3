"""What erased prompts render as, per method: the toy judge's confidence on the erased-class and
synonym images, and a grid of them.

H_o only asks whether an erased prompt's image is still the concept. A method can erase by
drawing another clean shape (SPM, plain direct mode) or by turning the picture into a texture
(the adversarially trained files of the fifth session); the judge is near-certain on a clean
shape (base images: 0.998) and unsure on a texture, so its top-class probability tells the two
apart. Methods: NAME=FILE (a hypernetwork, with its gate floor; '{target}' in FILE is replaced
by each target), `spm` (trained here, 400 steps, seed 0, as compare_methods.py) or `base`; and
with --trained-from, the baselines and UnHype variants a compare_methods.py run kept (the very
files behind its H_o columns; what it lacks is trained and kept there, as robustness.py does).

    python benchmarks/erased_quality.py --target triangle --eval-seed 777 \\
        r4=runs/.../hypernet.safetensors spm base
    python benchmarks/erased_quality.py --target circle,square,triangle --eval-seed 1234 \\
        --trained-from runs/s20/main --baselines spm,spm@2 \\
        --variants per_layer/direct+r4+adv0.5+sat --out runs/erased_quality_main
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
    ap.add_argument("methods", nargs="*", help="NAME=hypernet.safetensors, spm or base")
    ap.add_argument("--target", default="triangle", help="erased class; comma-separated: one "
                    "model per target, and a table of the means over them")
    ap.add_argument("--eval-seed", dest="eval_seed", type=int, default=777)
    ap.add_argument("--per-class", dest="per_class", type=int, default=50)
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400, help="training steps of what is trained "
                    "(spm) or loaded from --trained-from")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--trained-from", dest="trained_from", type=Path, default=None,
                    help="a compare_methods.py --out folder: --baselines and --variants come "
                    "from its single-<target> folders")
    ap.add_argument("--baselines", default="", help="with --trained-from: as compare_methods.py's "
                    "(e.g. spm,spm@2,esd_x)")
    ap.add_argument("--variants", default="", help="with --trained-from: UnHype variants as "
                    "compare_methods.py's ('@2': at strength 2)")
    ap.add_argument("--grid", type=int, default=12, help="erased images per method in the grid")
    ap.add_argument("--toy-weights", dest="toy_weights", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 2, or 1 when the CPUs are already busy)")
    ap.add_argument("--force", action="store_true", help="recompute saved rows")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/erased_quality")
    args = ap.parse_args(argv)
    if (args.baselines or args.variants) and args.trained_from is None:
        ap.error("--baselines / --variants need --trained-from (a compare_methods.py --out)")
    for spec in args.methods:
        if spec not in ("base", "spm") and "=" not in spec:
            ap.error(f"{spec!r}: NAME=FILE, spm or base")

    from robustness import toy_world

    t0 = time.time()
    backend, gen, ps, clf = toy_world(args.threads, args.toy_weights)
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    for t in targets:
        ps.index(t)  # an unknown class fails here, before any work, with the classes it knows
    rows = {t: run_target(args, t, backend, gen, ps, clf) for t in targets}
    text = "\n\n".join(([mean_table(args, rows)] if len(targets) > 1 else [])
                       + [target_table(args, t, rows[t]) for t in targets])
    print(text)
    from unhype.atomic import atomic_write_text

    atomic_write_text(args.out / "erased_quality.json", json.dumps(
        {"rows": rows, "settings": {k: str(v) for k, v in vars(args).items()},
         "minutes": round((time.time() - t0) / 60, 1)}, indent=1))
    atomic_write_text(args.out / "erased_quality.md", text + "\n")


def method_list(args, target, gen, backend, ps) -> list[tuple[str, object]]:
    """(row name, builder) for each method on `target`, base model first; builders run only
    for rows not saved yet."""
    from robustness import method_specs

    from unhype.baselines.registry import build
    from unhype.evaluation.methods import Method, UnHypeMethod
    from unhype.fileformat import load_hypernet

    out = [("base model", Method)]
    for spec in args.methods:
        if spec == "spm":
            out.append(("SPM (gated rank-1), trained here",
                        lambda: rename(build("spm", gen, backend, [target], ps, args.steps,
                                             args.seed), "SPM (gated rank-1), trained here")))
        elif "=" in spec:
            name, path = spec.split("=", 1)
            path = path.replace("{target}", target)
            out.append((name, lambda name=name, path=path:
                        UnHypeMethod.from_loaded(load_hypernet(path), name=name)))
    if args.trained_from is not None:
        specs = argparse.Namespace(
            target=target, together=False, trained_from=args.trained_from, steps=args.steps,
            seed=args.seed, toy_weights=args.toy_weights, out=args.out,
            baselines=args.baselines, variants=args.variants, unhype_file=[], strengths="1")
        out += method_specs(specs, target, gen, backend, ps)
    return out


def rename(method, name: str):
    method.name = name
    return method


def run_target(args, target, backend, gen, ps, clf) -> dict:
    """Every method's row on one erased target (each saved under --out/<target>/, so a run
    stopped part way resumes), and the grid of their erased images."""
    import torch
    from safetensors.torch import load_file, save_file
    from torchvision.utils import save_image

    from unhype.atomic import atomic_path, atomic_write_text
    from unhype.evaluation.harness import evaluate

    folder = args.out / target
    folder.mkdir(parents=True, exist_ok=True)
    rows, grid = {}, []
    for title, make in method_list(args, target, gen, backend, ps):
        saved, shown = folder / f"{slug(title)}.json", folder / f"{slug(title)}.safetensors"
        row = json.loads(saved.read_text()) if saved.is_file() and shown.is_file() else None
        if row is not None and not args.force and row.get("settings", measured(args)) == \
                measured(args):
            rows[row.pop("method")] = {k: v for k, v in row.items() if k != "settings"}
            grid.append(load_file(str(shown))["erased"])
            continue
        t = time.time()
        method = make()
        res = evaluate(gen, [method], ps, [target], clf, args.per_class, args.eval_seed,
                       args.batch_size, progress=False, keep_images=10 ** 9)
        r = res["methods"][method.name]
        conf = clf.confidence(torch.cat([r["images"]["erased"], r["images"]["synonyms"]]))
        row = {"h_o": r["h_o"], "acc_e": r["acc_e"], "acc_s": r["acc_s"], "acc_g": r["acc_g"],
               "confidence": float(conf.mean()), "confident": float((conf > 0.9).float().mean()),
               "n": len(conf), "seconds": round(time.time() - t, 1)}
        with atomic_path(shown) as tmp:
            save_file({"erased": r["images"]["erased"][:args.grid].contiguous()}, str(tmp))
        atomic_write_text(saved, json.dumps({"method": method.name, **row,
                                             "settings": measured(args)}))
        rows[method.name] = row
        grid.append(r["images"]["erased"][:args.grid])
        print(f"  {target}: {method.name:40s} confidence {row['confidence']:.3f}", file=sys.stderr,
              flush=True)
    with atomic_path(args.out / f"erased-{target}.png") as tmp:
        save_image(torch.cat(grid), str(tmp), nrow=len(grid[0]), padding=1, format="png")
    return rows


def measured(args) -> dict:
    """What a saved row was measured with: a rerun with other settings measures it again."""
    return {"eval_seed": args.eval_seed, "per_class": args.per_class, "steps": args.steps,
            "seed": args.seed, "batch_size": args.batch_size, "grid": args.grid,
            "toy_weights": None if args.toy_weights is None else str(args.toy_weights)}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


HEADER = ["| method | H_o | Acc_e | Acc_g | judge confidence, mean | share above 0.9 |",
          "|---|---|---|---|---|---|"]


def line(name, r) -> str:
    return (f"| {name} | {100 * r['h_o']:.1f} | {100 * r['acc_e']:.0f} | {100 * r['acc_g']:.0f} "
            f"| {r['confidence']:.3f} | {100 * r['confident']:.0f}% |")


def target_table(args, target, rows) -> str:
    return "\n".join(
        [f"Erasing '{target}', eval seed {args.eval_seed}, {args.per_class} images per set: the "
         f"judge's top-class probability on the erased and synonym images (grid: "
         f"{args.out / f'erased-{target}.png'}, one row per method).", "", *HEADER]
        + [line(n, r) for n, r in rows.items()])


def mean_table(args, rows) -> str:
    """Each method's numbers averaged over the targets (every target has the same image
    counts); a method some target lacks is left out."""
    targets = list(rows)
    names = [n for n in rows[targets[0]] if all(n in rows[t] for t in targets)]
    mean = {n: {k: sum(rows[t][n][k] for t in targets) / len(targets)
                for k in ("h_o", "acc_e", "acc_g", "confidence", "confident")} for n in names}
    return "\n".join(
        [f"Erased images over {', '.join(targets)} (one model per target), eval seed "
         f"{args.eval_seed}, {args.per_class} images per set, {args.steps} training steps: the "
         "toy judge's top-class probability on the erased-class and synonym images, mean over "
         "the targets (a clean shape: about 0.998; a texture or a broken picture: lower).", "",
         *HEADER] + [line(n, r) for n, r in mean.items()])


if __name__ == "__main__":
    main()
