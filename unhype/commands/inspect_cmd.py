"""`unhype inspect FILE [--prompt P ...]`: what a hypernetwork file holds and, for given prompts,
the update it applies to each, as text or JSON."""

from __future__ import annotations

import json
import textwrap

from unhype.summary import concept_text, fmt, gate_text, history_lines, is_number, \
    retain_share, retain_text, same_way_texts, signatures_text


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a hypernetwork file's metadata and test "
                                              "prompts against it")
    p.add_argument("file", help="UnHype hypernetwork .safetensors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--prompt", action="append", default=None, metavar="P",
                   help="a prompt to test (repeat for more): the update the hosts apply to it "
                        "(after the gate floor), its share of the file's gate_reference, whether "
                        "the floor zeroes it, the nearest concept by direction")
    p.add_argument("--text_encoder", default=None,
                   help="the base model's text encoder, as `unhype bake --text_encoder` takes "
                        "it (a checkpoint, a diffusers folder or a CLIP-L file); not needed for "
                        "the toy family")
    p.add_argument("--per_layer", action="store_true",
                   help="with --prompt: also each layer's applied update norm")
    p.set_defaults(func=run)


def probe_prompts(loaded, prompts: list[str], text_encoder: str | None = None,
                  per_layer: bool = False):
    """unhype.probe of `prompts` with the family's text encoder (long prompts: the readings of
    them and their windows the hosts and `unhype bake` apply, unhype.prompt_windows)."""
    from unhype.embedding import load_embedder
    from unhype.errors import UnHypeError
    from unhype.probe import concept_texts, probe

    if any(not p.strip() for p in prompts):
        raise UnHypeError("--prompt is empty; give the text to test")
    embedder = load_embedder(loaded.family, text_encoder)
    return probe(loaded, embedder, prompts, concept_texts(loaded.meta), windows=True,
                 per_layer=per_layer)


def inspect(path, prompts: list[str] | None = None, text_encoder: str | None = None,
            per_layer: bool = False) -> tuple[dict, list, object]:
    """(the file's description, unhype.probe results of `prompts`, the loaded file)."""
    from unhype.families import get_family
    from unhype.fileformat import load_hypernet
    from unhype.sizes import variant_size_table

    loaded = load_hypernet(path)
    meta, cfg = loaded.meta, loaded.meta.config
    share = retain_share(meta.training or {}, loaded.gate_reference)
    info = {
        "file": str(path), "size_bytes": loaded.path.stat().st_size,
        "format_version": meta.format_version, "family": meta.family,
        "embedding": meta.embedding, "variant": cfg.variant, "rank": cfg.rank,
        "hidden": cfg.hidden, "hyper_steps": cfg.hyper_steps,
        "parameters": loaded.hypernet.num_parameters(trainable_only=False),  # loaded frozen
        "targets": [{"name": t.name, "in_dim": t.in_dim, "out_dim": t.out_dim}
                    for t in cfg.targets],
        "concepts": meta.concepts, "training": _without_signatures(meta.training),
        "created": meta.created,
        "history": meta.history,
        "gate_reference": loaded.gate_reference, "gate_floor": loaded.gate_floor,
        "gate_saturate": loaded.gate_saturate, "retain_share": share,
        "retain_above_floor": bool(share is not None and loaded.gate_reference is not None
                                   and share > loaded.gate_floor),
        "concepts_same_way": [{"concepts": [x, y], "cosine": c} for x, y, c in
                              (loaded.signatures.same_way() if loaded.signatures else [])],
        "variant_sizes": variant_size_table(meta.family),
        "variant_sizes_layers": len(get_family(meta.family).targets()),
    }
    results = probe_prompts(loaded, prompts, text_encoder, per_layer) if prompts else []
    if prompts:
        info["prompts"] = [r.as_dict() for r in results]
    return info, results, loaded


def describe(path, prompts: list[str] | None = None, text_encoder: str | None = None,
             per_layer: bool = False) -> dict:
    return inspect(path, prompts, text_encoder, per_layer)[0]


def _training_lines(training: dict) -> list[str]:
    keys = ("mode", "max_train_steps", "learning_rate", "eta", "pretrained_model_name_or_path")
    lines = ["  training   " + ", ".join(f"{k}={training[k]}" for k in keys if k in training)]
    if isinstance(training.get("base_model_sha256"), str):  # AutoV2 is its first 10 digits
        lines.append(f"  base model sha256 {training['base_model_sha256']}")
    precision = training.get("mixed_precision")
    stored = "fp8" if training.get("fp8_base") else "4-bit NF4" if training.get(
        "nf4_base") else None
    if precision or stored:  # what the frozen model was when trained
        flag = "--fp8_base" if stored == "fp8" else "--nf4_base"
        lines.append(f"  base model {'fp32' if precision in (None, 'no') else precision} weights"
                     + (f", linear layers stored in {stored} ({flag}: trained against the "
                        "rounded model)" if stored else ""))
    if training.get("adversarial_eps"):  # says how hard the gate is to switch off
        fraction = training.get("adversarial_fraction", 1.0)
        if not is_number(fraction):  # free-form record: shown, not trusted
            fraction = 1.0
        lines.append(
            f"  robustness adversarial gate training, eps {fmt(training['adversarial_eps'])}"
            f" ({training.get('adversarial_steps')} PGD steps"
            + (f", on {fraction:.0%} of target prompts" if fraction < 1 else "")
            + (f", consistency loss weight {fmt(training.get('consistency_weight', 1.0))}"
               if training.get("adversarial_loss") == "consistency" else "") + ")")
    return lines


def _without_signatures(training: dict) -> dict:
    """The training record with the concepts' signatures (thousands of numbers each) given by
    the concepts they are for."""
    from unhype.concept_signatures import KEY

    if isinstance(training, dict) and isinstance(training.get(KEY), dict):
        return {**training, KEY: sorted(map(str, training[KEY]))}
    return training


def _gate_lines(loaded) -> list[str]:
    retain, warning = retain_text(loaded)
    signatures = signatures_text(loaded)
    return [f"  gate floor {gate_text(loaded)}"] + \
        ([f"  told apart {signatures}"] if signatures else []) + \
        [f"  warning    {text}" for text in same_way_texts(loaded)] + \
        ([f"  retained   {retain}"] if retain else []) + \
        ([f"  warning    {warning} with --prompt"] if warning else [])


def _table(rows: list[list], headers: list[str]) -> list[str]:
    cells = [[str(v) for v in row] for row in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["    " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]


def _prompt_lines(results) -> list[str]:
    from unhype.probe import ROW_HEADERS, ROW_NOTE

    lines = ["  prompts"] + _table([r.as_row() for r in results], ROW_HEADERS)
    for r in results:
        for name, norm in (r.layers or {}).items():
            lines.append(f"      {r.prompt!r} {name}: {norm:.4g}")
    return lines + textwrap.wrap(ROW_NOTE, 96, initial_indent="    ", subsequent_indent="    ")


def run(args) -> int:
    if args.per_layer and not args.prompt:
        from unhype.errors import UnHypeError

        raise UnHypeError("--per_layer shows the layers of the prompts given with --prompt; "
                          "give at least one")
    info, results, loaded = inspect(args.file, args.prompt, args.text_encoder, args.per_layer)
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
        print(f"  concept    {concept_text(c)}")
    if info["training"]:
        print("\n".join(_training_lines(info["training"])))
    print("\n".join(_gate_lines(loaded)))
    print(f"  created    {info['created']}")
    for line in history_lines(loaded.meta):  # later edits: the trained values stay here
        print(f"  changed    {line}")
    print(f"  parameter counts of both variants, {info['family']} default preset "
          f"({info['variant_sizes_layers']} layers):")
    for row in info["variant_sizes"]:
        print(f"    rank {row['rank']}: per_layer {row['per_layer']:>12,}   shared "
              f"{row['shared']:>10,}   ratio {row['ratio']:.1f}x")
    if results:
        print("\n".join(_prompt_lines(results)))
    return 0
