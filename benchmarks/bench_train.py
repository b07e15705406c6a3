"""Training speed and memory: steps/s and peak RSS of `unhype train` steps on this machine's CPU.

Models: the toy (if its weights are built), a tiny random SD1 UNet, and an SD1.5-size UNet
(860 M parameters, random weights) at a small resolution. Each row runs in its own process so
the peak resident memory (ru_maxrss) is that configuration's. Both modes; latent cache on (the
partial DDIM sampling of z_t is then paid once up front, shown separately) and off (fresh z_t
every step, as the paper: its cost grows with --ddim_steps).

    python benchmarks/bench_train.py [--steps 3] [--skip-sd15] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(kind: str, mode: str, cache: int, steps: int, resolution: int, threads: int,
        ddim: int) -> dict:
    import resource
    import tempfile

    import torch

    sys.path.insert(0, ROOT)
    torch.set_num_threads(threads)
    from unhype.trainer import loop
    from unhype.trainer.backends.diffusers_sd import DiffusersSD
    from unhype.trainer.backends.tiny import tiny_components
    from unhype.trainer.config import resolve
    from unhype.families import sd15_unet_config

    out = tempfile.mkdtemp(prefix="bench_train_")
    opts = dict(output_dir=out, output_name="bench", max_train_steps=steps, mode=mode,
                train_batch_size=1, retain_batch_size=64, ddim_steps=ddim, latent_cache=cache,
                sample_steps=1, sample_seeds=1, log_every=10 ** 6, concepts="dog", seed=0,
                device="cpu")
    t0 = time.time()
    if kind == "toy":
        opts.update(pretrained_model_name_or_path="toy", template_set="toy", concepts="circle")
        cfg = resolve(opts)
        session = loop.prepare(cfg, quiet=True)
    else:
        cfg = resolve({**opts, "pretrained_model_name_or_path": "<in memory>"})
        unet_config = None
        if kind == "sd15":
            unet_config = {**sd15_unet_config(), "sample_size": resolution // 8}
        unet, sched, toks, encs = tiny_components("sd1", 0, unet_config)
        backend = DiffusersSD("sd1", unet, sched, toks, encs, resolution=resolution
                              if kind == "sd15" else None, description=kind)
        session = loop.prepare(cfg, quiet=True, backend=backend)
    setup = time.time() - t0
    import unhype.trainer.samples as samples  # grids are not what is measured here
    samples.SampleGrids.before = lambda self: None
    samples.SampleGrids.after = lambda self, step: []
    timings = {}
    real_draw = loop.draw_batch

    def timed_draw(run, gen):
        if run.cache is not None and "cache" not in timings:
            timings["cache"] = time.time() - t_train
        timings.setdefault("first_step", time.time())
        return real_draw(run, gen)
    loop.draw_batch = timed_draw
    t_train = time.time()
    # one warm-up step is excluded: measure steps 2..N
    marks = []
    real_retain = loop.retain_loss

    def mark(run, gen):
        value = real_retain(run, gen)
        marks.append(time.time())
        return value
    loop.retain_loss = mark
    assert loop.train(session, progress=False) == 0
    rate = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": kind, "mode": mode, "cache": cache, "steps_per_s": rate,
            "s_per_step": 1 / rate if rate == rate else float("nan"),
            "cache_s": timings.get("cache", 0.0), "setup_s": setup, "peak_mb": peak,
            "hypernet_params": session.hypernet.num_parameters(),
            "targets": len(session.hypernet.config.targets), "ddim": ddim}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=256, help="SD1.5 image size (px)")
    ap.add_argument("--ddim", type=int, default=10, help="DDIM steps of the partial sampling")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, mode, cache = args.one.split(":")
        print(json.dumps(one(kind, mode, int(cache), args.steps, args.resolution, args.threads,
                             args.ddim)))
        return
    from unhype.toy.model import weights_dir

    kinds = (["toy"] if (weights_dir() / "unet" / "config.json").is_file() else []) + ["tiny"]
    if not args.skip_sd15:
        kinds.append("sd15")
    rows = []
    for kind in kinds:
        for mode in ("fields", "direct"):
            for cache in ((1, 0) if kind != "sd15" else (0,)):
                cmd = [sys.executable, __file__, "--one", f"{kind}:{mode}:{cache}",
                       "--steps", str(args.steps), "--threads", str(args.threads),
                       "--resolution", str(args.resolution), "--ddim", str(args.ddim)]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                if res.returncode or not line:
                    print(f"{kind} {mode} cache={cache}: failed\n{res.stderr[-2000:]}",
                          file=sys.stderr)
                    continue
                rows.append(json.loads(line[-1]))
                print(f"  done {kind} {mode} cache={cache}", file=sys.stderr)
    print(f"\nunhype train on CPU ({args.threads} thread(s)); batch 1 prompt, 64 retained "
          f"prompts; z_t: DDIM {args.ddim} steps + CFG; SD1.5 at {args.resolution}px\n")
    print("| model | mode | z_t | hypernet params | steps/s | s/step | cache build s | "
          "peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {'cached' if r['cache'] else 'fresh'} | "
              f"{r['hypernet_params']:,} | {r['steps_per_s']:.3f} | {r['s_per_step']:.2f} | "
              f"{r['cache_s']:.1f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
