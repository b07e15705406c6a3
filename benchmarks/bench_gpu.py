"""GPU checks and figures in one run (a lent GPU's time is short): the fp32/fp16/bf16 and xformers
paths on full-size SD1.5, SDXL and FLUX.1-dev denoisers with random weights, and the toy demo
trained on the GPU.

- sampling, per family x dtype x attention: one denoiser forward without UnHype, with the
  per-row LoRA hooks (`DynamicLoRA`), with a floored prompt skipped, and the merged path
  (W += B A^T, forward, restore) spread over --steps sampling steps; hypernetwork generation
  time; peak GPU memory. Checked on each: output finite, the row without a LoRA bit-identical
  to the base model's, per-row and merged outputs agree (gap relative to the LoRA's effect).
- training, the real `unhype train` loop (latent cache of one sampling per prompt): seconds per
  step after a warm-up step, the z_t sampling time, peak GPU memory, the written file loads.
- toy: `unhype train --config_file unhype/trainer/configs/toy_demo.toml` (the README's main job) on the
  GPU, with its own erasure evaluation (`eval = true`), to set beside the CPU figures.

Text encoders are tiny random ones with the real widths and token counts (77 CLIP tokens, 512
T5 tokens): only the denoiser is full size. Rows are written to --json as they finish, so a run
cut short still reports what it measured.

    python benchmarks/bench_gpu.py [--families sd15,sdxl,flux] [--json F] [--budget 420]
    python benchmarks/bench_gpu.py --tiny --device cpu        # smoke run of this script on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import timed, timed_interleaved  # noqa: E402  (medians after a warm-up)

FAMILY = {"sd15": "sd1", "sdxl": "sdxl", "flux": "flux"}
RESOLUTION = {"sd15": 512, "sdxl": 1024, "flux": 1024}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}

# (dtype, attention) sampling cases and (dtype, attention, mode, gradient checkpointing, memory
# options) training cases per family, in the order run: the model is cast fp32 -> fp16 -> bf16 in
# place; a "fp8" case (--fp8_base --cache_text_encoder_outputs, with full-size random text
# encoders so that moving them off the GPU counts) comes last: it leaves the weights in fp8.
SAMPLING = {
    "sd15": [("fp32", "sdpa"), ("fp16", "sdpa"), ("fp16", "xformers"), ("bf16", "sdpa"),
             ("bf16", "xformers")],
    "sdxl": [("fp16", "sdpa"), ("fp16", "xformers"), ("bf16", "sdpa")],
    "flux": [("bf16", "sdpa")],
}
TRAINING = {
    "sd15": [("fp32", "sdpa", "direct", False, ""), ("fp16", "sdpa", "direct", False, ""),
             ("bf16", "sdpa", "direct", False, ""), ("bf16", "xformers", "direct", False, ""),
             ("bf16", "sdpa", "fields", False, "")],
    "sdxl": [("bf16", "sdpa", "direct", False, ""), ("bf16", "sdpa", "direct", True, ""),
             ("bf16", "sdpa", "direct", True, "fp8")],
    "flux": [("bf16", "sdpa", "direct", False, ""), ("bf16", "sdpa", "direct", True, ""),
             ("bf16", "sdpa", "direct", True, "fp8")],
}
# "nf4" (--nf4_base --cache_text_encoder_outputs) replaces the linear layers, so it runs on a
# fresh bf16 model of its own after the family's other cases; needs bitsandbytes
TRAINING_NF4 = {"sdxl": [("bf16", "sdpa", "direct", True, "nf4")],
                "flux": [("bf16", "sdpa", "direct", True, "nf4")]}
CONCEPT = [{"target": "dog", "anchor": "cat", "synonyms": ["puppy"],
            "templates": ["a photo of a {}", "a {}"]}]


# --- measuring ----------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" \
        else float("nan")


def allocated_gib(device) -> float:
    return torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" \
        else float("nan")


def xformers_status() -> str:
    try:
        import xformers
        import xformers.ops  # noqa: F401
        return f"xformers {xformers.__version__}"
    except Exception as exc:  # ImportError, or a build for another torch / CUDA
        return f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"


# --- models -------------------------------------------------------------------------------------
def denoiser_config(kind: str, tiny: bool) -> dict:
    from unhype.trainer.backends.tiny import tiny_unet_config
    from unhype.trainer.backends.tiny_flux import tiny_flux_config
    from unhype.families import get_family

    if not tiny:
        return get_family(FAMILY[kind]).config()
    if kind == "flux":
        return tiny_flux_config()
    return tiny_unet_config("sd1" if kind == "sd15" else "sdxl", channels=(32, 64),
                            sample_size=8)


def build_denoiser(kind: str, tiny: bool, device):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if kind == "flux" else UNet2DConditionModel
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**denoiser_config(kind, tiny))
    return model.eval().requires_grad_(False)


def resolution(kind: str, tiny: bool) -> int:
    return (64 if kind != "flux" else 32) if tiny else RESOLUTION[kind]


def forward_fn(kind: str, model, rows: int, tiny: bool, device, dtype):
    """A no-grad denoiser forward on `rows` rows at the family's usual resolution."""
    from unhype import flow_latents

    g = torch.Generator(device="cpu").manual_seed(1)
    cfg = model.config

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    if kind == "flux":
        h = w = resolution(kind, tiny) // 8
        tokens = 16 if tiny else 512
        x = rand(rows, h * w // 4, cfg.in_channels)
        kw = dict(encoder_hidden_states=rand(rows, tokens, cfg.joint_attention_dim),
                  pooled_projections=rand(rows, cfg.pooled_projection_dim),
                  timestep=torch.full((rows,), 0.5, device=device, dtype=dtype),
                  img_ids=flow_latents.image_ids(h, w, device, dtype),
                  txt_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
                  guidance=torch.full((rows,), 3.5, device=device, dtype=dtype))

        def run():
            with torch.no_grad():
                return model(hidden_states=x, return_dict=False, **kw)[0]
        return run
    lat = resolution(kind, tiny) // 8
    x = rand(rows, cfg.in_channels, lat, lat)
    kw = dict(encoder_hidden_states=rand(rows, 77, cfg.cross_attention_dim))
    if kind == "sdxl":
        size = resolution(kind, tiny)
        kw["added_cond_kwargs"] = {
            "text_embeds": rand(rows, 1280),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=device,
                                     dtype=dtype).expand(rows, 6)}
    t = torch.full((rows,), 500, device=device)

    def run():
        with torch.no_grad():
            return model(x, t, return_dict=False, **kw)[0]
    return run


def set_attention(model, attention: str, saved: dict):
    """'sdpa' restores the processors `saved` (diffusers' default, PyTorch SDPA); 'xformers'
    swaps them for xformers'. Raises when xformers cannot run here."""
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()
    else:
        model.set_attn_processor(dict(saved))


# --- sampling -----------------------------------------------------------------------------------
def scaled_factors(net, emb, targets, model, delta: float):
    """The hypernet's factors for `emb`, A scaled per layer so that ||B A^T|| = delta ||W||
    (a fixed, realistic LoRA size: random hypernet weights give an arbitrary one)."""
    named = dict(model.named_modules())
    with torch.no_grad():
        factors = net(emb)
        out = {}
        for tg in targets:
            a, b = factors[tg.name]
            w = named[tg.path].weight.float()
            now = (b[0] @ a[0].T).norm()
            out[tg.name] = (a * (delta * w.norm() / now.clamp(min=1e-12)), b)
    return out


@contextlib.contextmanager
def merged_weights(named: dict, targets, factors, lost: list | None = None):
    """W += B A^T of prompt 0 in each target's dtype inside the block, W restored after it;
    `lost` collects, per layer, the part of B A^T that rounding into that dtype lost."""
    saved = {}
    with torch.no_grad():
        try:
            for tg in targets:
                w = named[tg.path].weight
                saved[tg.path] = w.detach().clone()
                a, b = factors[tg.name]
                delta_w = b[0] @ a[0].T
                w.add_(delta_w.to(w.dtype))
                if lost is not None:
                    lost.append(float(((w.float() - saved[tg.path].float()) - delta_w).norm()
                                      / delta_w.norm()))
            yield
        finally:
            for path, w in saved.items():
                named[path].weight.copy_(w)


def sampling_case(kind, model, dtype_name, attention, args, device) -> dict:
    from unhype.dynamic_lora import DynamicLoRA, RowCache, resolve_modules
    from unhype.families import get_family
    from unhype.hypernet import HyperNetConfig, TargetSpec, build_hypernet, default_hidden

    family = get_family(FAMILY[kind])
    dtype = DTYPES[dtype_name]
    targets = family.targets(model=model)
    paths = {tg.name: tg.path for tg in targets}
    dims = {tg.name: (tg.in_dim, tg.out_dim) for tg in targets}
    specs = [TargetSpec(tg.name, tg.module_type, tg.in_dim, tg.out_dim, tg.path) for tg in targets]
    net = build_hypernet(HyperNetConfig(
        variant="per_layer", targets=specs, embed_dim=family.embedding.dim, rank=args.rank,
        hidden=default_hidden("per_layer"), head_hidden=64, seed=0)).to(device).eval()
    with torch.no_grad():  # non-zero B, as after training
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    emb = torch.randn(1, family.embedding.dim, device=device)
    factors = scaled_factors(net, emb, targets, model, args.delta)
    floored = {k: (torch.zeros_like(a), b) for k, (a, b) in factors.items()}
    named = dict(model.named_modules())

    # checks on [uncond; cond] rows: row 0 base weights, row 1 the LoRA
    check = forward_fn(kind, model, 2, args.tiny, device, dtype)
    base = check().float()
    with DynamicLoRA.attach(model, paths, dims) as lora:
        lora.set(factors, [-1, 0])
        hooked = check().float()
    lost = []
    with merged_weights(named, targets, factors, lost):
        merged = check().float()
    restored = torch.equal(check().float(), base)
    effect = (hooked[1] - base[1]).norm()
    row = {"part": "sampling", "model": kind, "dtype": dtype_name, "attention": attention,
           "targets": len(targets), "rank": args.rank,
           "finite": bool(torch.isfinite(base).all() and torch.isfinite(hooked).all()),
           "uncond_row_identical": bool(torch.equal(hooked[0], base[0])),
           "lora_effect_rel": float(effect / base[1].norm()),
           "merge_gap_rel": float((merged[1] - hooked[1]).norm() / effect),
           "merge_weight_loss_rel": sum(lost) / len(lost),
           "weights_restored": restored}
    del base, hooked, merged

    # timing: one prompt = [uncond; cond] rows for SD, the cond row alone for FLUX (distilled)
    rows = 1 if kind == "flux" else 2
    row_map = [0] if rows == 1 else [-1, 0]
    fwd = forward_fn(kind, model, rows, args.tiny, device, dtype)
    bindings, cache = resolve_modules(model, paths, dims), RowCache()

    def synced(fn):  # the GPU runs asynchronously: time until its work is done
        return lambda: (fn(), sync(device))

    def hooks(f, skip=False):  # as ComfyUI's wrapper: hooks built, set and removed every step
        @contextlib.contextmanager
        def setup():
            lora = DynamicLoRA(bindings, cache).set(f, row_map, skip_silent=skip)
            sync(device)
            try:
                yield
            finally:
                lora.remove()
        return setup, synced(fwd)

    def merge_restore():
        with merged_weights(named, targets, factors):
            pass
    times = timed_interleaved({"base": synced(fwd), "rows": hooks(factors),
                               "floored_skipped": hooks(floored, skip=True),
                               "merge": synced(merge_restore)}, args.repeats)
    with torch.no_grad():
        gen = timed(synced(lambda: net(emb)), args.repeats * 3)
    reset_peak(device)
    fwd()
    peak_base = peak_gib(device)
    reset_peak(device)
    lora = DynamicLoRA(bindings, cache).set(factors, row_map)
    fwd()
    peak_rows = peak_gib(device)
    lora.remove()
    base_s = times["base"]
    row.update({
        "rows": rows, "forward_ms": 1000 * base_s,
        "per_row_ratio": times["rows"] / base_s,
        "floored_skipped_ratio": times["floored_skipped"] / base_s,
        "merge_ms": 1000 * times["merge"],
        "merged_ratio": (args.steps * base_s + times["merge"]) / (args.steps * base_s),
        "gen_ms": 1000 * gen, "hypernet_params": net.num_parameters(),
        "peak_gib_base": peak_base, "peak_gib_rows": peak_rows})
    return row


# --- training -----------------------------------------------------------------------------------
def backend_for(kind, model, args, device, dtype, full_text: bool = False):
    """`full_text`: full-size random text encoders (bench_training_memory's: CLIP-L, bigG,
    T5-XXL) built on `device`, with the tiny vocabularies' token ids."""
    from bench_training_memory import clip_bigg, clip_l, t5_xxl
    from unhype.trainer.backends.diffusers_sd import DiffusersSD
    from unhype.trainer.backends.flux import DiffusersFlux
    from unhype.trainer.backends.tiny import tiny_components, tiny_text_encoder, tiny_tokenizer
    from unhype.trainer.backends.tiny_flux import flux_scheduler, tiny_t5, tiny_t5_tokenizer

    def built(make):  # made on the device in `dtype`: no fp32 copy of T5-XXL's 4.8 B weights
        saved = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return make().eval()
        finally:
            torch.set_default_dtype(saved)

    size = resolution(kind, args.tiny)
    if kind == "flux":
        t5_dim = model.config.joint_attention_dim
        tokens = 16 if args.tiny else 512
        clip = built(clip_l) if full_text else tiny_text_encoder(768, positions=77)
        t5 = built(t5_xxl) if full_text else tiny_t5(d_model=t5_dim)
        return DiffusersFlux(model, flux_scheduler(), tiny_tokenizer(77), clip,
                             tiny_t5_tokenizer(tokens), t5, device=device, dtype=dtype,
                             resolution=size, max_sequence_length=tokens,
                             description="FLUX.1-dev-size, random weights")
    sd = "sd1" if kind == "sd15" else "sdxl"
    _, scheduler, _, _ = tiny_components(sd, 0, denoiser_config(kind, True))
    if sd == "sd1":
        toks, encs = [tiny_tokenizer(77)], [tiny_text_encoder(768, positions=77)]
    else:
        toks = [tiny_tokenizer(77), tiny_tokenizer(77)]
        encs = ([built(clip_l), built(clip_bigg)] if full_text else
                [tiny_text_encoder(768, positions=77),
                 tiny_text_encoder(1280, projection=1280, seed=1, positions=77)])
    return DiffusersSD(sd, model, scheduler, toks, encs, device=device, dtype=dtype,
                       resolution=size, description=f"{kind}-size, random weights")


def training_case(kind, model, dtype_name, attention, mode, checkpointing, memory, args,
                  device) -> dict:
    import unhype.trainer.samples as samples
    from unhype.trainer import loop
    from unhype.trainer.config import resolve
    from unhype.fileformat import check_targets_in_model, load_hypernet

    samples.SampleGrids.before = lambda self, *a, **k: None  # grids are not what is measured
    samples.SampleGrids.after = lambda self, *a, **k: []
    dtype = DTYPES[dtype_name]
    out = tempfile.mkdtemp(prefix="bench_gpu_")
    ddim = args.ddim_flux if kind == "flux" else args.ddim
    cfg = resolve({
        "pretrained_model_name_or_path": "<in memory>", "output_dir": out,
        "output_name": "bench", "max_train_steps": args.train_steps, "mode": mode,
        "train_batch_size": 1, "retain_batch_size": 64, "ddim_steps": ddim, "latent_cache": 1,
        "sample_steps": 1, "sample_seeds": 1, "log_every": 1, "seed": 0,
        "device": str(device), "mixed_precision": MIXED[dtype_name],
        "xformers": attention == "xformers", "gradient_checkpointing": checkpointing,
        "network_dim": args.rank, "fp8_base": memory == "fp8", "nf4_base": memory == "nf4",
        "cache_text_encoder_outputs": memory in ("fp8", "nf4")})
    cfg.concept_entries = [dict(c) for c in CONCEPT]
    backend = backend_for(kind, model, args, device, dtype,
                          full_text=memory in ("fp8", "nf4") and not args.tiny)
    run = loop.prepare(cfg, quiet=True, backend=backend)
    weights = allocated_gib(device)
    marks, timing = [], {}
    real_retain, real_cache = loop.retain_loss, loop.shared_cache

    def mark(r, gen):
        sync(device)
        marks.append(time.perf_counter())
        return real_retain(r, gen)

    def cache(r, dist, *rest):  # the loop's own arguments, whatever they are
        t0 = time.perf_counter()
        value = real_cache(r, dist, *rest)
        sync(device)
        timing["cache_s"] = time.perf_counter() - t0
        return value
    loop.retain_loss, loop.shared_cache = mark, cache
    reset_peak(device)
    try:
        with torch.autograd.set_detect_anomaly(args.anomaly):
            code = loop.train(run, progress=False)
    finally:
        loop.retain_loss, loop.shared_cache = real_retain, real_cache
        run.lora.remove()
        if checkpointing:
            model.disable_gradient_checkpointing()
    prompts = len(run.items)
    row = {"part": "training", "model": kind, "dtype": dtype_name, "attention": attention,
           "mode": mode, "checkpointing": checkpointing, "memory": memory, "exit": code,
           "resolution": resolution(kind, args.tiny), "ddim": ddim, "prompts": prompts,
           "s_per_step": (marks[-1] - marks[1]) / (len(marks) - 2) if len(marks) > 2
           else float("nan"),
           "sampling_s_per_prompt": timing.get("cache_s", float("nan")) / prompts,
           "weights_gib": weights, "peak_gib": peak_gib(device),
           "hypernet_params": run.hypernet.num_parameters(),
           "loss_finite": bool(run.log) and all(
               v == v for rec in run.log for v in (rec["remove"], rec["retain"]))}
    if code == 0:
        loaded = load_hypernet(Path(out) / "bench.safetensors")
        check_targets_in_model(loaded, model)
        row["file_loads"] = True
    return row


# --- the toy demo on the GPU --------------------------------------------------------------------
def toy_case(args, device, seconds_left: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_gpu_toy_"))
    cmd = [sys.executable, "-m", "unhype", "train", "--config_file",
           "unhype/trainer/configs/toy_demo.toml", "--device", str(device), "--output_dir", str(out),
           "--cpu_threads", "0",
           "--save_every_n_steps", "0"]
    if args.tiny:
        cmd += ["--max_train_steps", "4", "--eval_images", "2"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=max(seconds_left, 30))
    except subprocess.TimeoutExpired as exc:
        return {"part": "toy", "model": "toy demo", "dtype": "fp32", "exit": "timeout",
                "seconds": time.perf_counter() - t0, "log_tail": str(exc.stdout)[-1500:]}
    seconds = time.perf_counter() - t0
    row = {"part": "toy", "model": "toy demo", "dtype": "fp32", "exit": res.returncode,
           "seconds": seconds}
    if (out / "metrics.json").is_file():
        row["metrics"] = json.loads((out / "metrics.json").read_text())
    row["log_tail"] = (res.stdout + res.stderr)[-1500:]
    return row


# --- report -------------------------------------------------------------------------------------
def fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, float) else str(v)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git
        return "unknown"


def env_line(env: dict) -> str:
    return (f"{env['gpu']}; torch {env['torch']}, diffusers {env['diffusers']}, xformers: "
            f"{env['xformers']}" + (f"; commit {env['commit']}" if "commit" in env else ""))


def print_tables(rows: list, env: dict | None) -> None:
    if env is not None:
        print(f"\n## GPU figures ({env_line(env)})\n")
    samp = [r for r in rows if r.get("part") == "sampling"]
    if samp:
        print("Sampling: one denoiser forward per step (SD: [uncond; cond] rows at 512 / 1024 "
              "px; FLUX: the cond row at 1024 px, 512 T5 tokens); median of the repeats; the "
              "hooks are built, set and removed around each timed forward, as ComfyUI's wrapper "
              "does each step (rows measured before the RowCache: factors gathered anew each "
              "step). Ratios are against the forward without UnHype; 'merged' adds the merge and "
              "restore of the weights once per 30 steps. The checks run on [uncond; cond] rows "
              "with ||B A^T|| = 5% of ||W|| per layer: 'LoRA effect' is the change of the cond "
              "row's output (relative), 'merged vs per-row gap' the difference of the two paths "
              "relative to that effect, which rounding elsewhere in the forward dominates (TF32 "
              "convolutions in fp32, fp16/bf16 arithmetic); 'B A^T lost in the merge' isolates "
              "the merge's own rounding of the update into the weights' dtype.\n")
        print("| model | dtype | attention | targets | forward ms | per-row ratio | floored "
              "skipped | merged ratio (merge ms) | LoRA gen ms | peak GiB base / hooks | "
              "finite | uncond row identical | LoRA effect | merged vs per-row gap | "
              "B A^T lost in the merge |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in samp:
            if "error" in r:
                print(f"| {r['model']} | {r['dtype']} | {r['attention']} | {r['error']} |")
                continue
            print(f"| {r['model']} | {r['dtype']} | {r['attention']} | {r['targets']} | "
                  f"{r['forward_ms']:.1f} | {r['per_row_ratio']:.3f} | "
                  f"{r['floored_skipped_ratio']:.3f} | {r['merged_ratio']:.3f} "
                  f"({r['merge_ms']:.1f}) | {r['gen_ms']:.2f} | {r['peak_gib_base']:.2f} / "
                  f"{r['peak_gib_rows']:.2f} | {r['finite']} | {r['uncond_row_identical']} | "
                  f"{r['lora_effect_rel']:.2e} | {r['merge_gap_rel']:.2e} | "
                  f"{r['merge_weight_loss_rel']:.2e} |")
    train = [r for r in rows if r.get("part") == "training"]
    if train:
        print("\nTraining (`unhype train` loop, batch 1 prompt, 64 retained prompts; s/step "
              "after a warm-up step; the latent cache samples each of the 2 prompts once, "
              "batched, and keeps the frozen model's predictions at every step):\n")
        print("| model | dtype | attention | mode | grad. checkpointing | fp8 / nf4 base + text "
              "encoders on CPU | px | exit | s/step | latent cache s/prompt (steps) | weights "
              "GiB | peak GiB | hypernet params | loss finite | file loads |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in train:
            memory = r.get("memory") or False
            if "error" in r:
                print(f"| {r['model']} | {r['dtype']} | {r['attention']} | {r['mode']} | "
                      f"{r['checkpointing']} | {memory} | {r['error']} |")
                continue
            print(f"| {r['model']} | {r['dtype']} | {r['attention']} | {r['mode']} | "
                  f"{r['checkpointing']} | {memory} | {r['resolution']} | {r['exit']} | "
                  f"{r['s_per_step']:.3f} | {r['sampling_s_per_prompt']:.2f} ({r['ddim']}) | "
                  f"{r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {r['hypernet_params']:,} | "
                  f"{r['loss_finite']} | {r.get('file_loads', False)} |")
    for r in rows:
        if r.get("part") == "toy":
            print(f"\nToy demo (`make demo`'s config) on {env.get('device')}: exit {r['exit']}, "
                  f"{r['seconds']:.0f} s; metrics: {json.dumps(r.get('metrics'))[:1500]}")


def report(paths: list[str], toy_metrics: str | None = None) -> None:
    """Markdown of saved --json files (a later file's row replaces an earlier one's of the same
    case: a rerun after a fix) and of the toy demo's metrics.json."""
    cases, envs = {}, {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        envs[Path(path).name] = data["env"]
        for r in data["rows"]:
            if r.get("part") in ("sampling", "training"):
                key = tuple(r.get(k) for k in ("part", "model", "dtype", "attention", "mode",
                                                "checkpointing")) + (r.get("memory") or "",)
                cases[key] = {**r, "source": Path(path).name}
    rows = list(cases.values())
    print("# GPU figures\n")
    print(f"Written by `python benchmarks/bench_gpu.py --report {' '.join(paths)}"
          + (f" --toy-metrics {toy_metrics}" if toy_metrics else "") + "` from the rows that "
          "`benchmarks/bench_gpu.py` saved on the GPU. Full-size denoisers with random weights "
          "(SD1.5 UNet 860 M, SDXL UNet 2.57 G, FLUX.1-dev transformer 11.9 G parameters), tiny "
          "text encoders of the real widths and token counts; hypernetwork per_layer, rank 1, "
          "the families' default target layers. Sources (a later file's row replaces an "
          "earlier one's):\n")
    for name, env in envs.items():
        print(f"- `{name}`: {env_line(env)}")
    print()
    print_tables(rows, None)
    if toy_metrics:
        m = json.loads(Path(toy_metrics).read_text())
        u, b = m["unhype"], m["base"]
        print(f"\nThe README's main job (`unhype/trainer/configs/toy_demo.toml`) trained on the GPU "
              f"(`--device cuda`), its own evaluation, {m['per_class']} images per class: "
              f"base Acc_e {100 * b['acc_e']:.1f}% / Acc_s {100 * b['acc_s']:.1f}%; UnHype "
              f"Acc_e {100 * u['acc_e']:.1f}%, Acc_s {100 * u['acc_s']:.1f}%, Acc_g "
              f"{100 * u['acc_g']:.1f}%, H_o {100 * u['h_o']:.1f}%.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="sd15,sdxl,flux")
    ap.add_argument("--parts", default="sampling,training,toy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke run on CPU)")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--delta", type=float, default=0.05, help="||B A^T|| / ||W|| per layer")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="sampling steps for the merged ratio")
    ap.add_argument("--train-steps", dest="train_steps", type=int, default=5)
    ap.add_argument("--ddim", type=int, default=50, help="SD z_t sampling steps (cache)")
    ap.add_argument("--ddim-flux", dest="ddim_flux", type=int, default=28)
    ap.add_argument("--budget", type=float, default=420, help="seconds; later cases skipped")
    ap.add_argument("--json", default=None, help="write the rows here as they finish")
    ap.add_argument("--anomaly", action="store_true",
                    help="training under autograd anomaly detection (names a failing op)")
    ap.add_argument("--lora-fp32", dest="lora_fp32", action="store_true",
                    help="DynamicLoRA.compute_dtype = float32 (the LoRA matmuls in fp32)")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="print the markdown of saved --json files and stop")
    ap.add_argument("--toy-metrics", dest="toy_metrics", help="with --report: the toy "
                    "demo's metrics.json")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.toy_metrics)
    if args.lora_fp32:
        from unhype.dynamic_lora import DynamicLoRA

        DynamicLoRA.compute_dtype = torch.float32
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here (use --tiny --device cpu to smoke-test)")
    import diffusers

    env = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "xformers": xformers_status(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
           "commit": commit()}
    print(json.dumps(env), flush=True)
    parts = set(args.parts.split(","))
    rows, start = [], time.perf_counter()

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))

    def over_budget(what) -> bool:
        if time.perf_counter() - start > args.budget:
            record({"part": "skipped", "what": what})
            return True
        return False

    for kind in args.families.split(","):
        if over_budget(kind):
            continue
        t0 = time.perf_counter()
        model = build_denoiser(kind, args.tiny, device)
        saved = dict(model.attn_processors)
        record({"part": "build", "model": kind, "seconds": time.perf_counter() - t0,
                "params": sum(p.numel() for p in model.parameters())})
        for dtype_name in ("fp32", "fp16", "bf16"):
            cases = [("sampling", a, (None, None, "")) for d, a in SAMPLING[kind]
                     if d == dtype_name if "sampling" in parts]
            cases += [("training", a, (m, c, mem)) for d, a, m, c, mem in TRAINING[kind]
                      if d == dtype_name if "training" in parts]
            if not cases:
                continue
            if dtype_name == "bf16" and "training" in parts and TRAINING_NF4.get(kind):
                cases += [("nf4", a, (m, c, mem)) for d, a, m, c, mem in TRAINING_NF4[kind]]
            model.to(DTYPES[dtype_name])
            for part, attention, (mode, ckpt, memory) in cases:
                if over_budget(f"{kind} {dtype_name} {part} {attention} {mode or ''} {memory}"):
                    continue
                try:
                    set_attention(model, attention, saved)
                    if part == "sampling":
                        row = sampling_case(kind, model, dtype_name, attention, args, device)
                    elif part == "nf4":  # its own model: NF4 replaces the layers in place
                        del model
                        reset_peak(device)
                        model = build_denoiser(kind, args.tiny, device).to(torch.bfloat16)
                        saved = dict(model.attn_processors)
                        set_attention(model, attention, saved)
                        row = training_case(kind, model, dtype_name, attention, mode, ckpt,
                                            memory, args, device)
                    else:
                        row = training_case(kind, model, dtype_name, attention, mode, ckpt,
                                            memory, args, device)
                except Exception as exc:
                    traceback.print_exc()
                    row = {"part": "training" if part == "nf4" else part, "model": kind,
                           "dtype": dtype_name,
                           "attention": attention, "mode": mode, "checkpointing": ckpt,
                           "memory": memory,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                finally:
                    model.set_attn_processor(dict(saved))
                record(row)
        del model
        reset_peak(device)
    if "toy" in parts and not over_budget("toy demo"):
        record(toy_case(args, device, args.budget + 90 - (time.perf_counter() - start)))
    print_tables(rows, env)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    failed = [r for r in rows if "error" in r and not (  # no xformers here: not a failure
        r.get("attention") == "xformers" and "xformers" in r["error"])]
    if args.tiny and failed:  # the CPU smoke test: every case must run (on a GPU an OOM row is
        print(f"{len(failed)} case(s) failed", file=sys.stderr)  # a result, not a failure)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
