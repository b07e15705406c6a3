"""Host-side cost of the per-row LoRA hooks, per hooked layer and step, on tiny layers.

On a GPU a denoiser forward at batch 2 is bound by the host launching kernels (docs/gpu.md:
SD1.5 at 512 px takes 29 ms on an H200 whose arithmetic needs a few), so what the hooks add is
their own host work: Python and one launch per tensor operation. Tiny layers on the CPU
measure that work without the arithmetic: microseconds per hooked layer per step, for a host
that builds the hooks and sets the row map at every step (ComfyUI's wrapper) and for hooks set
once.

    python benchmarks/bench_hook_overhead.py [--layers 140] [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import timed as median_seconds  # noqa: E402  (median after one warm-up)


def main(argv=None):
    from unhype.dynamic_lora import DynamicLoRA, resolve_modules

    try:
        from unhype.dynamic_lora import RowCache
    except ImportError:  # an older checkout, measured for comparison
        RowCache = None

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=140, help="hooked layers (SDXL: 140)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(args.layers)]).eval()
    names = {f"l{i}": str(i) for i in range(args.layers)}
    factors = {f"l{i}": (torch.randn(1, 8, 1), torch.randn(1, 8, 1)) for i in range(args.layers)}
    x = torch.randn(2, 77, 8)  # [uncond; cond] rows of a 77-token context
    rows = [-1, 0]
    bindings = resolve_modules(model, names)

    def forward():
        with torch.no_grad():
            model(x)

    def per_step_hooks(cache=None):  # ComfyUI's wrapper: hooks built and set at every call
        def run():
            lora = DynamicLoRA(bindings) if cache is None else DynamicLoRA(bindings, cache)
            try:
                lora.set(factors, rows, skip_silent=False)
                forward()
            finally:
                lora.remove()
        return run
    base = median_seconds(forward, args.repeats)
    cases = {"hooks built and set every step, factors gathered every step":
             per_step_hooks()}
    if RowCache is not None:
        cases["hooks built and set every step, one RowCache (ComfyUI's wrapper)"] = \
            per_step_hooks(RowCache())
    times = {label: median_seconds(run, args.repeats) for label, run in cases.items()}
    with DynamicLoRA(bindings) as lora:
        lora.set(factors, rows, skip_silent=False)
        times["hooks set once, row map set every step (A1111)"] = median_seconds(
            lambda: (lora.set_rows(rows), forward()), args.repeats)
    print(f"{args.layers} hooked Linear(8, 8) layers, rows [uncond; cond] x 77 tokens, 1 thread; "
          f"median of {args.repeats}\n")
    print("| path | forward ms | added per hooked layer (us) |")
    print("|---|---|---|")
    print(f"| no hooks | {1000 * base:.2f} | - |")
    for label, t in times.items():
        print(f"| {label} | {1000 * t:.2f} | {1e6 * (t - base) / args.layers:.1f} |")


if __name__ == "__main__":
    main()
