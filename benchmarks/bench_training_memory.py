"""Weights the trainer keeps on the GPU per memory option: full-size SD1.5, SDXL, FLUX.1-dev.

Every component is built at full size on the `meta` device (exact shapes, no memory) and the
options are applied as `unhype train` applies them (`unhype/trainer/memory.py`: diffusers' layerwise
casting for `--fp8_base`, the bytes bitsandbytes' NF4 takes for the same layers for
`--nf4_base` (`unhype.trainer.memory.nf4_weight_bytes`: NF4 cannot be quantised on the meta device),
the text encoders moved off the device for `--cache_text_encoder_outputs`); the table counts the bytes left on the training device. No GPU
is needed, and none of this is a measured peak: the estimate column adds what the H200 run
measured on top of the weights (its peak minus the memory allocated after `prepare`, i.e.
activations, hypernetwork and optimiser, gradient checkpointing on; benchmarks/results/) to the
weights of each row. The per-layer fp8 -> bf16 copy of layerwise casting (one layer at a time,
at most 126 MiB for FLUX's largest layer) is left out of the estimate.

    python benchmarks/bench_training_memory.py [--families sd15,sdxl,flux]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unhype.trainer.memory import nf4_weight_bytes, store_in_fp8, weight_bytes  # noqa: E402
from unhype.families import get_family  # noqa: E402

FAMILY = {"sd15": "sd1", "sdxl": "sdxl", "flux": "flux"}
RESULTS = ROOT / "benchmarks" / "results"
# the H200 rows whose overhead (peak - weights) the estimate reuses: bf16, direct, checkpointing
MEASURED = {"sdxl": ("gpu-h200-run1.json", True), "flux": ("gpu-h200-run3-flux-training.json",
                                                            True),
            "sd15": ("gpu-h200-run1.json", False)}


def clip_text(hidden, layers, heads, ffn, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=ffn, max_position_embeddings=77,
                         projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def clip_l():
    return clip_text(768, 12, 12, 3072)


def clip_bigg():
    return clip_text(1280, 32, 20, 5120, projection=1280)


def t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                   num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))


def vae(latent_channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4)


def components(kind: str, dtype) -> dict:
    """Full-size denoiser, text encoders and VAE of `kind` on the meta device, in `dtype`."""
    import diffusers

    family = get_family(FAMILY[kind])
    with torch.device("meta"):
        parts = {"denoiser": getattr(diffusers, family.model_class).from_config(family.config())}
        parts["text"] = [clip_l()] + {"sd15": [], "sdxl": [clip_bigg()], "flux": [t5_xxl()]}[kind]
        parts["vae"] = vae(16 if kind == "flux" else 4)
    for module in [parts["denoiser"], *parts["text"], parts["vae"]]:
        module.to(dtype)
    return parts


def measured_overhead(kind: str) -> float | None:
    """GiB the H200 run allocated on top of the weights (peak - allocated after prepare)."""
    name, checkpointing = MEASURED[kind]
    path = RESULTS / name
    if not path.is_file():
        return None
    for row in json.loads(path.read_text())["rows"]:
        if (row.get("part") == "training" and row.get("model") == kind and row.get("dtype")
                == "bf16" and row.get("mode") == "direct" and row.get("checkpointing")
                == checkpointing and row.get("attention") == "sdpa" and "peak_gib" in row):
            return row["peak_gib"] - row["weights_gib"]
    return None


def rows_for(kind: str) -> list[dict]:
    gib = 2 ** 30
    overhead = measured_overhead(kind)
    out = []
    for storage in ("bf16", "fp8", "nf4"):
        parts = components(kind, torch.bfloat16)
        if storage == "fp8":
            store_in_fp8(parts["denoiser"], torch.bfloat16)
        denoiser = (nf4_weight_bytes(parts["denoiser"]) if storage == "nf4" else
                    weight_bytes(parts["denoiser"])) / gib
        text = weight_bytes(*parts["text"]) / gib
        vae_gib = weight_bytes(parts["vae"]) / gib
        for offload in (False, True):
            on_device = denoiser + vae_gib + (0 if offload else text)
            out.append({"model": kind, "fp8_base": storage == "fp8",
                        "nf4_base": storage == "nf4", "cache_text_encoder_outputs": offload,
                        "denoiser_gib": denoiser, "text_gib": text, "vae_gib": vae_gib,
                        "on_device_gib": on_device,
                        "estimate_gib": None if overhead is None else on_device + overhead,
                        "overhead_gib": overhead})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="sd15,sdxl,flux")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    rows = [r for kind in args.families.split(",") for r in rows_for(kind)]
    print("| model | denoiser linear layers | --cache_text_encoder_outputs | denoiser GiB | "
          "text encoders GiB | VAE GiB | weights on the GPU, GiB | estimated peak, GiB (bf16, "
          "checkpointing) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        est = "n/a" if r["estimate_gib"] is None else (
            f"{r['estimate_gib']:.1f} (+{r['overhead_gib']:.2f} measured)")
        storage = "fp8 (--fp8_base)" if r["fp8_base"] else "NF4 (--nf4_base)" if r[
            "nf4_base"] else "bf16"
        print(f"| {r['model']} | {storage} | "
              f"{'yes' if r['cache_text_encoder_outputs'] else 'no'} | {r['denoiser_gib']:.2f} | "
              f"{r['text_gib']:.2f} | {r['vae_gib']:.2f} | {r['on_device_gib']:.2f} | {est} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
