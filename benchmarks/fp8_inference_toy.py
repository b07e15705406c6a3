"""Does a hypernetwork trained on a full-precision model still erase on a low-bit copy of it?

ComfyUI and Forge users often load FLUX / SDXL in fp8, NF4 or GGUF, while the hypernetwork was
trained against bf16 weights. On the toy world: the same file, evaluated (MACE protocol, the toy
judge) on the committed toy UNet and on copies whose weights are rounded as those formats store
them and computed in fp32: linear weights in float8 e4m3 (what `--fp8_base` stores), linear and
convolution weights in e4m3 (ComfyUI's fp8 weight dtypes), linear weights in bitsandbytes NF4
(Forge's / ComfyUI's NF4 models, `--nf4_base`) and in GGUF Q4_0 (ComfyUI-GGUF / Forge GGUF
models). Each model's own base row is its reference. The toy is tiny and trained in fp32; how
sensitive FLUX is to these formats is not measured here.

    python benchmarks/fp8_inference_toy.py runs/toy_demo/erase_circle.safetensors [--per_class 50]
        [--formats fp8,fp8_conv,nf4,q4_0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FP8 = torch.float8_e4m3fn


def fp8(w: torch.Tensor) -> torch.Tensor:
    return w.to(FP8).float()


def nf4(w: torch.Tensor) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Params4bit

    q = Params4bit(w.detach().clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    return dequantize_4bit(q, quant_state=q.quant_state).float()


def q4_0(w: torch.Tensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType.Q4_0
    return torch.from_numpy(quants.dequantize(quants.quantize(w.detach().numpy(), kind), kind))


# format -> (row label, layer kinds rounded, rounding); "full" is always the first row
FORMATS = {
    "full": ("full precision (fp32)", (), None),
    "fp8": ("linear weights in fp8 (--fp8_base)", (torch.nn.Linear,), fp8),
    "fp8_conv": ("linear + conv weights in fp8 (ComfyUI fp8 weight dtype)",
                 (torch.nn.Linear, torch.nn.Conv2d), fp8),
    "nf4": ("linear weights in NF4 (Forge / ComfyUI NF4 models, --nf4_base)",
            (torch.nn.Linear,), nf4),
    "q4_0": ("linear weights in GGUF Q4_0 (ComfyUI-GGUF, Forge GGUF)", (torch.nn.Linear,), q4_0),
}


def round_weights(unet: torch.nn.Module, kinds: tuple, rounding) -> int:
    """Round the weights of `kinds` layers in place (kept as fp32); how many layers. GGUF's
    blocks of 32 need rows of a multiple of 32; other layers stay as they are."""
    n = 0
    with torch.no_grad():
        for module in unet.modules():
            if kinds and isinstance(module, kinds):
                if rounding is q4_0 and module.weight.shape[-1] % 32:
                    continue
                module.weight.copy_(rounding(module.weight).reshape(module.weight.shape))
                n += 1
    return n


def main(argv=None):
    from unhype.trainer.backends.toy import ToyBackend
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
    ap.add_argument("--formats", default="fp8,fp8_conv,nf4,q4_0",
                    help=f"rows after the full-precision one: {', '.join(list(FORMATS)[1:])}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_hypernet(args.hypernet)
    erased = [c["target"] for c in loaded.meta.concepts]
    ps = load_prompt_set("toy")
    classifier = load_classifier("judge", ps.class_names, ps.class_prompts())
    rows, full_base = [], None
    for fmt in ["full"] + [f for f in args.formats.split(",") if f and f != "full"]:
        label, kinds, rounding = FORMATS[fmt]
        backend = ToyBackend("cpu")  # a fresh copy of the committed weights each time
        layers = round_weights(backend.unet, kinds, rounding)
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
