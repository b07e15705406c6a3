"""The toy-world erasure table: one concept (averaged over shapes), three concepts in one
hypernetwork, both variants x both modes, measured with the toy judge (unhype/trainer/evaluate.py).

Each cell is a real `unhype train --config_file unhype/trainer/configs/toy_demo.toml --eval` run with
the concept/variant/mode flags overridden; results are collected from each run's metrics.json.

    python benchmarks/toy_erasure_table.py [--shapes circle,square,triangle] [--steps 600]
        [--variants per_layer,shared] [--modes fields,direct] [--out runs/toy_table]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(concepts: str, variant: str, mode: str, out: Path, args) -> dict | None:
    metrics = out / "metrics.json"
    if metrics.is_file() and not args.force:
        return json.loads(metrics.read_text())
    if args.report_only:
        return None
    cmd = [sys.executable, "-m", "unhype", "train", "--config_file",
           str(ROOT / "unhype/trainer/configs/toy_demo.toml"), "--concepts", concepts, "--variant",
           variant, "--mode", mode, "--output_dir", str(out), "--output_name", "hypernet",
           "--eval_images", str(args.per_class), "--save_every_n_steps", "0"]
    if args.steps:
        cmd += ["--max_train_steps", str(args.steps)]
    for extra in args.extra + (args.direct_extra if mode == "direct" else []):
        cmd += extra.split("=", 1) if "=" in extra else [extra]
    t = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(res.stdout + res.stderr)
    if res.returncode or not metrics.is_file():
        print(f"FAILED {concepts} {variant} {mode}: see {out / 'train.log'}", file=sys.stderr)
        return None
    print(f"  {concepts:28s} {variant:9s} {mode:6s} {time.time() - t:5.0f} s", file=sys.stderr)
    return json.loads(metrics.read_text())


def mean(rows, side, key):
    return sum(r[side][key] for r in rows) / len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="circle,square,triangle")
    ap.add_argument("--variants", default="per_layer,shared")
    ap.add_argument("--modes", default="fields,direct")
    ap.add_argument("--steps", type=int, default=None, help="default: the config's")
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/toy_table")
    ap.add_argument("--no-multi", action="store_true", help="skip the three-concept rows")
    ap.add_argument("--force", action="store_true", help="rerun cells that have metrics")
    ap.add_argument("--extra", action="append", default=[],
                    help="extra flag for every run, e.g. --extra=--fields_lambda=2")
    ap.add_argument("--direct-extra", action="append", default=[
        "--learning_rate=1e-3", "--retain_learning_rate=1e-3"],
        help="extra flags for direct-mode runs (default: lr 1e-3 for both optimisers)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    ap.add_argument("--report-only", action="store_true",
                    help="only tabulate the runs that already have metrics")
    args = ap.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    jobs = []
    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            for s in shapes:
                jobs.append((s, variant, mode, args.out / f"{variant}-{mode}-{s}"))
            if not args.no_multi:
                jobs.append((",".join(shapes), variant, mode, args.out / f"{variant}-{mode}-multi"))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip([j[3] for j in jobs],
                           pool.map(lambda j: run_one(*j, args), jobs)))
    table = []
    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            found = [s for s in shapes if results[args.out / f"{variant}-{mode}-{s}"]]
            single = [results[args.out / f"{variant}-{mode}-{s}"] for s in found]
            if single:
                table.append((f"1 concept (mean of {len(single)}: {', '.join(found)})",
                              variant, mode, single))
            multi = results.get(args.out / f"{variant}-{mode}-multi")
            if multi:
                table.append((f"{len(shapes)} concepts in one hypernet", variant, mode, [multi]))
    lines = [f"toy world, judge-measured, {args.per_class} images per class and prompt set; "
             f"flags: {' '.join(args.extra) or '(config defaults)'}", "",
             "| setting | variant | mode | Acc_e (erased) | Acc_s (others, % of base) | "
             "Acc_g (synonyms) | H_o | base Acc_e / Acc_s / Acc_g / H_o |",
             "|---|---|---|---|---|---|---|---|"]
    for name, variant, mode, rows in table:
        rel = sum(r["unhype"]["acc_s_rel"] for r in rows) / len(rows)
        lines.append(
            f"| {name} | {variant} | {mode} | {mean(rows, 'unhype', 'acc_e'):.1%} | "
            f"{mean(rows, 'unhype', 'acc_s'):.1%} ({rel:.0%}) | "
            f"{mean(rows, 'unhype', 'acc_g'):.1%} | {mean(rows, 'unhype', 'h_o'):.1%} | "
            f"{mean(rows, 'base', 'acc_e'):.0%} / {mean(rows, 'base', 'acc_s'):.0%} / "
            f"{mean(rows, 'base', 'acc_g'):.0%} / {mean(rows, 'base', 'h_o'):.0%} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
