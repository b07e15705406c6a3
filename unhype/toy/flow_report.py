"""`unhype toy flow-report`: the toy flow model measured with the toy judge -> docs/toy_flow.md.

Base quality: the same prompt sets as `unhype toy report` (canonical, synonyms, shape only;
judge CNN, class means) at the flow model's defaults, a guidance sweep, determinism and timing.
Erasure (`--hypernet FILE`, a hypernetwork trained on the flow model with `unhype train
--pretrained_model_name_or_path toy_flux`): the SD toy's protocol (`unhype.trainer.evaluate`): Acc_e on
the erased shape prompted by name, Acc_s on the nine others, Acc_g on its synonyms, H_o, the
same seeds with and without the LoRA (cond rows only), and the same bars (erased <= 10%, others
>= 90% of base, synonyms <= 20%).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from unhype.atomic import atomic_write_text


def base_quality(toy, judge_net, per_class: int, sweep: bool = True) -> dict:
    from unhype.toy import flow, report

    out = report.measure(toy, judge_net, per_class=per_class, steps=flow.DEFAULT_STEPS,
                         guidance=flow.DEFAULT_GUIDANCE)
    if sweep:
        prompts, s, c = report.prompt_set("canonical", 4, seed=1)
        out["guidance_sweep"] = []
        for g in (1.0, 2.0, 3.0, 4.0, 5.0, 7.0):
            ps, pc = judge_net.classify(report.sample_many(toy, prompts, 1, flow.DEFAULT_STEPS,
                                                           g))
            out["guidance_sweep"].append({
                "guidance": g, "shape": report.class_mean_accuracy(ps.numpy(), s),
                "colour": report.class_mean_accuracy(pc.numpy(), c)})
    t = time.time()
    toy.sample(["a red circle"] * 16, seed=0)
    out["sample_seconds"] = time.time() - t
    a = toy.sample(["a red circle", "a blue star"], seed=3)
    out["deterministic"] = bool(torch.equal(a, toy.sample(["a red circle", "a blue star"],
                                                          seed=3)))
    return out


def erasure(path, per_class: int = 24, seed: int = 777, weights=None) -> dict:
    """The SD toy's erasure protocol on the flow model for one hypernetwork file."""
    from unhype.trainer import evaluate as ev
    from unhype.trainer.backends.toy_flux import ToyFluxBackend
    from unhype.dynamic_lora import DynamicLoRA
    from unhype.fileformat import check_targets_in_model, load_hypernet

    loaded = load_hypernet(path)
    backend = ToyFluxBackend(weights=weights)
    lora = DynamicLoRA(check_targets_in_model(loaded, backend.unet))
    erased = ev.erased_shapes(loaded.meta.concepts)
    sets = ev.prompt_sets(erased, per_class)
    t0 = time.time()
    try:
        base = ev.scores({k: ev.sample_judged(backend, p, seed) for k, (p, _) in sets.items()},
                         sets)
        after = ev.scores({k: ev.sample_judged(backend, p, seed, loaded.generate, lora)
                           for k, (p, _) in sets.items()}, sets)
    finally:
        lora.remove()
    passes = ev.bars(base, after)
    training = loaded.meta.training
    keep = ("mode", "variant", "max_train_steps", "train_batch_size", "learning_rate",
            "retain_learning_rate", "hyper_steps", "fields_lambda", "network_dim",
            "target_preset", "ddim_steps", "eta", "latent_cache", "seed")
    return {"file": str(path), "erased": erased, "per_class": per_class, "base": base,
            "unhype": after, "targets": len(loaded.meta.config.targets),
            "training": {k: training.get(k) for k in keep},
            "passes": passes, "seconds": round(time.time() - t0, 1)}


def write_markdown(path: Path, r: dict) -> None:
    from unhype.toy import flow

    b = r["base"]
    cfg = flow.toy_flow_config()
    lines = [
        "# Toy flow model",
        "",
        "A tiny diffusers `FluxTransformer2DModel` trained by rectified flow on the toy world "
        "(`unhype/toy/flow.py`, weights in `unhype/toy/weights/flow/`), so the FLUX code path of "
        "the trainer (`unhype/trainer/backends/flux.py`: velocity ESD target, FlowMatch Euler sampling, "
        "packed latents) is measured end to end on CPU. Written by `unhype toy flow-report`; "
        "rebuild the weights with `unhype toy build --stages flow`.",
        "",
        "## Model",
        "",
        f"- `FluxTransformer2DModel`: {cfg['num_layers']} double + {cfg['num_single_layers']} "
        f"single blocks, {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']} "
        f"(RoPE axes {cfg['axes_dims_rope']}), no guidance embedding; "
        f"{r.get('parameters', 0) / 1e6:.2f} M parameters, fp16 on disk.",
        "- Input: the toy's 12x8x8 latent (16x16 image pixel-unshuffled) packed 2x2 by "
        "`FluxPipeline._pack_latents` into 16 tokens of 48 values; text: the toy CLIP's "
        "`last_hidden_state` (16 x 64, `joint_attention_dim`) and `pooler_output` (64, "
        "`pooled_projections`; also the hypernetwork's input). Family `toy_flux`, preset "
        "`paper` (`attn.to_v`, `attn.add_v_proj`, `attn.to_out.0`).",
        "- Training: v = noise - x0 on z = (1 - sigma) x0 + sigma noise, sigma half uniform, "
        "half logit-normal; 10% caption dropout; AdamW, cosine schedule, EMA. Sampling: "
        f"FlowMatch Euler ({flow.DEFAULT_STEPS} steps, static shift "
        f"{flow.scheduler_config()['shift']}), CFG {flow.DEFAULT_GUIDANCE} with the SD toy's "
        "[uncond; cond] batch contract (the LoRA goes on cond rows only).",
    ]
    if "build" in r:
        bj = r["build"]
        lines.append(f"- These weights: {bj.get('flow_steps')} steps x batch "
                     f"{bj.get('flow_batch')}, {bj.get('flow_minutes', 0):.1f} min on "
                     f"{bj.get('threads')} CPU thread(s) of a shared 2-core machine.")
    lines += ["", "## Base quality (judge CNN)", "",
              f"{flow.DEFAULT_STEPS} Euler steps, guidance {flow.DEFAULT_GUIDANCE}; "
              f"{b['per_class']} images per shape class (shape only: fewer); class means.", "",
              "| prompts | images | shape | colour |", "|---|---|---|---|"]
    for kind in ("canonical", "synonyms", "shape_only"):
        if kind in b:
            row = b[kind]
            colour = f"{row['colour']:.1%}" if "colour" in row else "-"
            lines.append(f"| {kind.replace('_', ' ')} | {row['images']} | {row['shape']:.1%} | "
                         f"{colour} |")
    if b.get("guidance_sweep"):
        lines += ["", "Guidance sweep (canonical prompts, 4 per shape):", "",
                  "| guidance | shape | colour |", "|---|---|---|"]
        lines += [f"| {g['guidance']} | {g['shape']:.1%} | {g['colour']:.1%} |"
                  for g in b["guidance_sweep"]]
    lines += ["", f"Sampling 16 images: {b['sample_seconds']:.2f} s; same seed, same images: "
              f"{b['deterministic']}."]
    for e in r.get("erasure", []):
        eb, eu, tr = e["base"], e["unhype"], e["training"]
        lines += ["", f"## Erasure of {', '.join(e['erased'])}: mode {tr['mode']} (trainer, "
                  "FLUX backend)", "",
                  f"`{Path(e['file']).name}`: mode {tr['mode']}, {tr['variant']}, rank "
                  f"{tr['network_dim']}, {tr['max_train_steps']} steps x "
                  f"{tr['train_batch_size']} prompts, lr {tr['learning_rate']} / retain "
                  f"{tr['retain_learning_rate']}, T {tr['hyper_steps']}, preset "
                  f"{tr['target_preset'] or 'paper'} ({e['targets']} layers), flow steps "
                  f"{tr['ddim_steps']}, eta {tr['eta']}. Judge, {e['per_class']} images per "
                  "class and prompt set, same seeds with and without the LoRA.", "",
                  "| model | Acc_e (erased) | Acc_s (others) | Acc_g (synonyms) | H_o |",
                  "|---|---|---|---|---|",
                  f"| base | {eb['acc_e']:.1%} | {eb['acc_s']:.1%} | {eb['acc_g']:.1%} | "
                  f"{eb['h_o']:.1%} |",
                  f"| UnHype | {eu['acc_e']:.1%} | {eu['acc_s']:.1%} ({eu['acc_s_rel']:.0%} of "
                  f"base) | {eu['acc_g']:.1%} | {eu['h_o']:.1%} |", "",
                  "Bars (as the SD toy): " + ", ".join(
                      f"{k} {'met' if v else 'MISSED'}" for k, v in e["passes"].items()) + "."]
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def run(per_class: int = 32, hypernets=(), erase_per_class: int = 24, output="docs/toy_flow.md",
        weights=None, sweep: bool = True, notes=()) -> dict:
    from unhype.toy import flow, judge

    toy = flow.load_toy_flow(weights=weights)
    results = {"base": base_quality(toy, judge.load_judge(weights), per_class, sweep),
               "parameters": sum(p.numel() for p in toy.transformer.parameters()),
               "notes": list(notes)}
    build_json = flow.flow_dir(weights) / "build.json"
    if build_json.is_file():
        results["build"] = json.loads(build_json.read_text())
    results["erasure"] = [erasure(h, erase_per_class, weights=weights) for h in hypernets]
    write_markdown(Path(output), results)
    return results
