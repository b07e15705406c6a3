"""Does a hypernetwork trained on a full-precision model still erase on an fp8 copy of it?

ComfyUI users often load FLUX / SDXL with an fp8 weight dtype, while the hypernetwork was trained
against bf16 weights. On the toy world: the same file, evaluated (MACE protocol, the toy judge)
on the committed toy UNet, on a copy whose linear weights are rounded to float8 e4m3 (what
`--fp8_base` stores), and on a copy whose linear and convolution weights are rounded (what
ComfyUI's fp8 weight dtypes store). Each model's own base row is its reference. The toy is tiny
and trained in fp32; how sensitive FLUX is to fp8 is not measured here.

    python benchmarks/fp8_inference_toy.py runs/toy_demo/erase_circle.safetensors [--per_class 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FP8 = torch.float8_e4m3fn
ROUNDED = {"full precision (fp32)": (),
           "linear weights in fp8 (--fp8_base)": (torch.nn.Linear,),
           "linear + conv weights in fp8 (ComfyUI fp8 weight dtype)": (torch.nn.Linear,
                                                                       torch.nn.Conv2d)}


def round_to_fp8(unet: torch.nn.Module, kinds: tuple) -> int:
    """Round the weights of `kinds` layers to e4m3 in place (kept as fp32); how many layers."""
    n = 0
    with torch.no_grad():
        for module in unet.modules():
            if kinds and isinstance(module, kinds):
                module.weight.copy_(module.weight.to(FP8).float())
                n += 1
    return n


def main(argv=None):
    from trainer.backends.toy import ToyBackend
    from unhype.evaluation.harness import ToyGenerator, evaluate, generate
    from unhype.evaluation.metrics import paired_change
    from unhype.evaluation.methods import Method, UnHypeMethod
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.fileformat import load_hypernet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hypernet", help="a toy hypernetwork file (make demo writes one)")
    ap.add_argument("--per_class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_hypernet(args.hypernet)
    erased = [c["target"] for c in loaded.meta.concepts]
    ps = load_prompt_set("toy")
    classifier = load_classifier("judge", ps.class_names, ps.class_prompts())
    rows, full_base = [], None
    for label, kinds in ROUNDED.items():
        backend = ToyBackend("cpu")  # a fresh copy of the committed weights each time
        layers = round_to_fp8(backend.unet, kinds)
        gen = ToyGenerator(backend.toy)
        res = evaluate(gen, [Method(), UnHypeMethod.from_loaded(loaded)], ps, erased,
                       classifier, per_class=args.per_class, seed=args.seed, progress=False)
        base, unhype = list(res["methods"].values())
        # how far rounding moved the base model itself: its other-class images against the
        # full-precision model's (same prompts and seeds)
        others = generate(gen, Method(), res["sets"]["others"], args.seed, 32)
        full_base = others if full_base is None else full_base
        rows.append((label, layers, base, unhype, paired_change(others, full_base)))
        print(f"{label}: {layers} layers rounded; base Acc_s {base['acc_s']:.3f}; UnHype "
              f"H_o {unhype['h_o']:.3f}", file=sys.stderr, flush=True)
    print(f"\n{Path(args.hypernet).name}, erasing {', '.join(erased)}; toy judge, "
          f"{args.per_class} images per class and set, eval seed {args.seed}\n")
    print("| toy UNet | layers rounded | base images vs fp32 base: within 1 level / mean change "
          "| base Acc_e | base Acc_s | UnHype Acc_e | UnHype Acc_s (% of this base) | UnHype "
          "Acc_g | UnHype H_o | UnHype's others within 1 level of this base / mean change |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, layers, base, u, moved in rows:
        print(f"| {label} | {layers} | {100 * moved['kept_s']:.1f}% / {moved['change_s']:.2f} | "
              f"{100 * base['acc_e']:.1f} | {100 * base['acc_s']:.1f} | "
              f"{100 * u['acc_e']:.1f} | {100 * u['acc_s']:.1f} "
              f"({100 * u['acc_s'] / base['acc_s']:.0f}%) | {100 * u['acc_g']:.1f} | "
              f"{100 * u['h_o']:.1f} | {100 * u['kept_s']:.1f}% / {u['change_s']:.2f} |")


if __name__ == "__main__":
    main()
