"""`unhype inspect FILE`: what a hypernetwork file holds, as text or JSON."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a hypernetwork file's metadata")
    p.add_argument("file", help="UnHype hypernetwork .safetensors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def describe(path) -> dict:
    from unhype.fileformat import load_hypernet
    from unhype.sizes import variant_size_table

    loaded = load_hypernet(path)
    meta, cfg = loaded.meta, loaded.meta.config
    return {
        "file": str(path), "size_bytes": loaded.path.stat().st_size,
        "format_version": meta.format_version, "family": meta.family,
        "embedding": meta.embedding, "variant": cfg.variant, "rank": cfg.rank,
        "hidden": cfg.hidden, "hyper_steps": cfg.hyper_steps,
        "parameters": loaded.hypernet.num_parameters(trainable_only=False),  # loaded frozen
        "targets": [{"name": t.name, "in_dim": t.in_dim, "out_dim": t.out_dim}
                    for t in cfg.targets],
        "concepts": meta.concepts, "training": meta.training, "created": meta.created,
        "variant_sizes_sd1": variant_size_table(),
    }


def run(args) -> int:
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}  ({info['size_bytes'] / 1e6:.2f} MB, format v{info['format_version']})")
    print(f"  family     {info['family']}")
    print(f"  embedding  {info['embedding'].get('source')} ({info['embedding'].get('dim')}-d)")
    print(f"  variant    {info['variant']}, rank {info['rank']}, hidden {info['hidden']}, "
          f"T = {info['hyper_steps']}")
    print(f"  params     {info['parameters']:,}")
    print(f"  targets    {len(info['targets'])} layers, e.g. {info['targets'][0]['name']}")
    for c in info["concepts"]:
        syn = ", ".join(c.get("synonyms", [])) or "-"
        print(f"  concept    erase {c.get('target')!r} -> anchor {c.get('anchor', '')!r} "
              f"(synonyms: {syn})")
    if info["training"]:
        keys = ("mode", "max_train_steps", "learning_rate", "eta", "pretrained_model_name_or_path")
        print("  training   " + ", ".join(f"{k}={info['training'][k]}" for k in keys
                                          if k in info["training"]))
        training = info["training"]
        precision = training.get("mixed_precision")
        stored = "fp8" if training.get("fp8_base") else "4-bit NF4" if training.get(
            "nf4_base") else None
        if precision or stored:  # what the frozen model was when trained
            flag = "--fp8_base" if stored == "fp8" else "--nf4_base"
            print(f"  base model {'fp32' if precision in (None, 'no') else precision} weights"
                  + (f", linear layers stored in {stored} ({flag}: trained against the "
                     "rounded model)" if stored else ""))
        if training.get("adversarial_eps"):  # says how hard the gate is to switch off
            fraction = training.get("adversarial_fraction", 1.0)
            if not isinstance(fraction, (int, float)):  # free-form record: shown, not trusted
                fraction = 1.0
            print(f"  robustness adversarial gate training, eps {training['adversarial_eps']}"
                  f" ({training.get('adversarial_steps')} PGD steps"
                  + (f", on {fraction:.0%} of target prompts" if fraction < 1 else "")
                  + (f", consistency loss weight {training.get('consistency_weight', 1.0):g}"
                     if training.get("adversarial_loss") == "consistency" else "") + ")")
    ref = info["training"].get("gate_reference") if info["training"] else None
    if ref:
        from unhype.gate_floor import DEFAULT_FLOOR

        floor = info["training"].get("gate_floor", DEFAULT_FLOOR)
        print(f"  gate floor prompts whose update is under {floor:.0%} of {ref:.4g} (the "
              f"concepts' median ||dW||) get none, full from {2 * floor:.0%}"
              + (", saturated: raised to the concepts' strength from there"
                 if info["training"].get("gate_saturate") else ""))
    else:
        print("  gate floor none (the file stores no gate reference: trained before it existed; "
              "`unhype stamp-floor` adds it)")
    print(f"  created    {info['created']}")
    print("  parameter counts of both variants, SD1 default preset (32 layers):")
    for row in info["variant_sizes_sd1"]:
        print(f"    rank {row['rank']}: per_layer {row['per_layer']:>12,}   shared "
              f"{row['shared']:>10,}   ratio {row['ratio']:.1f}x")
    return 0
