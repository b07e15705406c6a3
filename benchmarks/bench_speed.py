"""Speed and size of UnHype: per-prompt LoRA generation, the sampling-time overhead of the per-row
and merged paths, memory and file size per variant; the toy UNet and an SD1.5-size UNet (random
weights, CPU). All ratios come from one run on one machine.

- generation: hypernet forward for 1 prompt (and 8), ms, per variant
- per-row: UNet forward on [uncond; cond] rows with `DynamicLoRA` (cond rows only) vs without;
  and for a prompt the gate floor switched off (zero factors): hooks adding zero vs skipped
  (`skip_silent`, what the hosts do)
- merged: W += B A^T for one prompt, forwards on the patched weights, W restored; the overhead is
  the merge + restore time spread over `--steps` sampling steps
- memory: hypernet parameters, factors per prompt, process peak RSS; file: .safetensors size

    python benchmarks/bench_speed.py [--models toy,sd15] [--repeats 3] [--sd-latent 64]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def timed_interleaved(cases: dict, repeats: int) -> dict:
    """Median seconds of each case's `run()`, the cases interleaved round by round (after one
    warm-up round), so a change in machine load hits every case alike: ratios between cases
    are then fair where separately timed medians are not. A case is `run` or a context manager
    factory and `run`: `(setup, run)`, with only `run` timed inside `with setup():`."""
    cases = {k: v if isinstance(v, tuple) else (contextlib.nullcontext, v)
             for k, v in cases.items()}
    times = {k: [] for k in cases}
    for round_ in range(repeats + 1):
        for k, (setup, run) in cases.items():
            with setup():
                t = time.perf_counter()
                run()
                if round_:
                    times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_unet(kind: str):
    from diffusers import UNet2DConditionModel

    from unhype.families import get_family

    torch.manual_seed(0)
    family = get_family("toy" if kind == "toy" else "sd1")
    return UNet2DConditionModel(**family.config()).eval().requires_grad_(False), family


def bench_model(kind: str, args) -> list[dict]:
    from unhype.dynamic_lora import DynamicLoRA
    from unhype.fileformat import save_hypernet
    from unhype.hypernet import HyperNetConfig, TargetSpec, build_hypernet, default_hidden

    t0 = time.time()
    unet, family = build_unet(kind)
    build_s = time.time() - t0
    targets = family.targets(model=unet)
    cfg_unet = unet.config
    latent = args.sd_latent if kind == "sd15" else cfg_unet.sample_size
    steps = args.steps or (30 if kind == "sd15" else 20)
    n_prompts = 1
    rows = 2 * n_prompts
    x = torch.randn(rows, cfg_unet.in_channels, latent, latent)
    ctx = torch.randn(rows, 77 if kind == "sd15" else 16, cfg_unet.cross_attention_dim)
    t = torch.tensor([500] * rows)

    def forward():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)

    out = []
    for variant in args.variants:
        specs = [TargetSpec(tg.name, tg.module_type, tg.in_dim, tg.out_dim, tg.path)
                 for tg in targets]
        hcfg = HyperNetConfig(variant=variant, targets=specs, embed_dim=family.embedding.dim,
                              rank=args.rank, hidden=default_hidden(variant), head_hidden=64,
                              seed=0)
        net = build_hypernet(hcfg).eval()
        with torch.no_grad():  # non-zero B, as after training
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        emb1, emb8 = torch.randn(1, family.embedding.dim), torch.randn(8, family.embedding.dim)
        with torch.no_grad():
            gen1 = timed(lambda: net(emb1), args.repeats * 3)
            gen8 = timed(lambda: net(emb8), args.repeats * 3)
            factors = net(emb1)
        factor_bytes = sum(a.numel() + b.numel() for a, b in factors.values()) * 4
        row_map = torch.tensor([-1] * n_prompts + list(range(n_prompts)))
        # a prompt the gate floor switched off (zero A): hooks adding zero vs skipped
        floored = {k: (torch.zeros_like(a), b) for k, (a, b) in factors.items()}

        def with_lora(use, skip=False):  # hooks set up outside the timed forward
            @contextlib.contextmanager
            def setup():
                with DynamicLoRA.attach(unet, {tg.name: tg.path for tg in targets},
                                        {tg.name: (tg.in_dim, tg.out_dim)
                                         for tg in targets}) as lora:
                    lora.set(use, row_map, skip_silent=skip)
                    yield
            return setup, forward

        # base, per-row, floored timed round by round: one load change hits all four alike
        times = timed_interleaved({"base": forward, "rows": with_lora(factors),
                               "floored_hooked": with_lora(floored),
                               "floored_skipped": with_lora(floored, skip=True)}, args.repeats)
        base_s = times["base"]
        named = dict(unet.named_modules())

        def merge_restore():
            saved = {}
            with torch.no_grad():
                for tg in targets:
                    w = named[tg.path].weight
                    saved[tg.path] = w.detach().clone()
                    a, b = factors[tg.name]
                    w.add_(b[0] @ a[0].T)
                for path, w in saved.items():
                    named[path].weight.copy_(w)
        merge_s = timed(merge_restore, args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "h.safetensors"
            save_hypernet(path, net, family.name, concepts=[{"target": "x"}])
            size = path.stat().st_size
        out.append({
            "model": kind, "variant": variant, "targets": len(targets), "latent": latent,
            "unet_build_s": round(build_s, 1), "base_forward_ms": 1000 * base_s,
            "gen1_ms": 1000 * gen1, "gen8_ms": 1000 * gen8,
            "per_row_ratio": times["rows"] / base_s,
            "floored_hooked_ratio": times["floored_hooked"] / base_s,
            "floored_skipped_ratio": times["floored_skipped"] / base_s,
            "merged_ratio": (steps * base_s + merge_s) / (steps * base_s), "steps": steps,
            "merge_ms": 1000 * merge_s, "hypernet_params": net.num_parameters(),
            "factors_kb": factor_bytes / 1024, "file_mb": size / 2 ** 20,
            "peak_rss_mb": peak_rss_mb()})
        print(f"  {kind} {variant}: {out[-1]}", file=sys.stderr, flush=True)
    del unet
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="toy,sd15")
    ap.add_argument("--variants", default="per_layer,shared")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (toy 20, SD 30)")
    ap.add_argument("--sd-latent", dest="sd_latent", type=int, default=64,
                    help="SD1.5 latent size (64 = 512 px)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: toy's rule)")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    from unhype.toy.model import set_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        set_threads()
    rows = []
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        if kind not in ("toy", "sd15"):
            raise SystemExit(f"--models: toy and/or sd15, not {kind!r}")
        rows += bench_model(kind, args)
    print(f"UnHype speed and size on CPU ({torch.get_num_threads()} torch threads, rank "
          f"{args.rank}, 1 prompt = [uncond; cond] rows; median of {args.repeats}):\n")
    print("| model | variant | targets | LoRA gen 1 prompt (ms) | 8 prompts (ms) | UNet forward "
          "(ms) | per-row time ratio | floored prompt: zero hooks / skipped | merged time ratio | "
          "hypernet params | factors/prompt (KB) | file (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['latent']}x{r['latent']} latent) | {r['variant']} | "
              f"{r['targets']} | {r['gen1_ms']:.2f} | {r['gen8_ms']:.2f} | "
              f"{r['base_forward_ms']:.0f} | {r['per_row_ratio']:.3f} | "
              f"{r['floored_hooked_ratio']:.3f} / {r['floored_skipped_ratio']:.3f} | "
              f"{r['merged_ratio']:.3f} ({r['steps']} steps) | {r['hypernet_params']:,} | "
              f"{r['factors_kb']:.1f} | {r['file_mb']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
