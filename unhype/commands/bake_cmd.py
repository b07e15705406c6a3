"""`unhype bake HYPERNET --prompt P -o LORA`: the LoRA for one prompt as a kohya LoRA file."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("bake", help="write the LoRA generated for a prompt as a kohya LoRA")
    p.add_argument("hypernet", help="UnHype hypernetwork .safetensors")
    p.add_argument("--prompt", required=True, help="prompt whose LoRA is baked")
    p.add_argument("--strength", type=float, default=1.0, help="multiplier baked into lora_up")
    p.add_argument("-o", "--output", required=True, help="output LoRA .safetensors")
    p.add_argument("--format", default="kohya", choices=["kohya", "kohya_bfl"],
                   help="kohya: canonical names (FLUX: lora_transformer_*, read by ComfyUI and "
                        "diffusers); kohya_bfl (FLUX only): sd-scripts' BFL fused-layer names "
                        "lora_unet_double_blocks_N_img_attn_qkv (ComfyUI, Forge)")
    p.add_argument("--text_encoder", default=None,
                   help="the base model's text encoder: its A1111 / ComfyUI checkpoint "
                        "(.safetensors), a diffusers pipeline or text-encoder folder, or (SD1, "
                        "FLUX) a CLIP-L file such as ComfyUI's clip_l.safetensors; not needed "
                        "for the toy family")
    p.set_defaults(func=run)


def run(args) -> int:
    from unhype.atomic import check_output
    from unhype.bake import NO_OP_NOTE, bake_lora, bake_readings, network_dim_alpha, \
        probe_embedding, prompt_claim, save_lora, update_norm, weak_note
    from unhype.dynamic_lora import check_strength
    from unhype.embedding import load_embedder
    from unhype.fileformat import load_hypernet
    from unhype.prompt_windows import prompt_windows

    strength = check_strength(args.strength)
    check_output(args.output, [args.hypernet, args.text_encoder], "-o")
    loaded = load_hypernet(args.hypernet)
    embedder = load_embedder(loaded.family, args.text_encoder)
    # a long prompt: the readings of it and its windows the hosts apply (prompt_windows.combined_rows)
    embedding = bake_readings(loaded, embedder([args.prompt] + prompt_windows(args.prompt)))
    # what the LoRA does for this prompt (the same embedding), recorded in its metadata
    probed = probe_embedding(loaded, embedding, args.prompt, embedder)
    tensors, metadata = bake_lora(loaded, embedding, args.prompt, strength,
                                  title=Path(args.output).stem, fmt=args.format, probed=probed)
    save_lora(args.output, tensors, metadata)
    norm = update_norm(tensors)
    print(f"wrote {args.output} ({args.format}): {len(tensors) // 3} layers, rank "
          f"{network_dim_alpha(tensors, loaded.meta.config.rank)[0]}, update ||dW|| = "
          f"{norm:.4g}, sshs_model_hash "
          f"{metadata['sshs_model_hash'][:12]}")
    print(f"  for {args.prompt!r}: {prompt_claim(probed)}")
    if norm == 0:
        print(f"unhype bake: note: {NO_OP_NOTE}", file=sys.stderr)
    elif weak_note(probed):
        print(f"unhype bake: warning: {weak_note(probed)}", file=sys.stderr)
    return 0
