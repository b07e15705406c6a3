"""A tiny random FLUX diffusers folder (tests and benchmarks, no download).

Real class layout (FluxTransformer2DModel, CLIPTextModel + CLIPTokenizer, T5EncoderModel +
T5TokenizerFast, FlowMatchEulerDiscreteScheduler with FLUX.1-dev's settings, optional
AutoencoderKL), the real CLIP-L pooled width (768) so the `flux` family's checks hold, everything
else as small as diffusers allows. `build_flux_folder(path)` writes model_index.json and the
component folders with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unhype.trainer.backends.tiny import CHARS, tiny_text_encoder, tiny_tokenizer

T5_DIM = 32
LATENT_CHANNELS = 4


def tiny_flux_config(guidance_embeds: bool = True) -> dict:
    return {"patch_size": 1, "in_channels": 4 * LATENT_CHANNELS, "num_layers": 1,
            "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
            "joint_attention_dim": T5_DIM, "pooled_projection_dim": 768,
            "guidance_embeds": guidance_embeds, "axes_dims_rope": [2, 2, 4]}


def tiny_t5_tokenizer(max_length: int = 16):
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_t5(seed: int = 0, d_model: int = T5_DIM):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=4 + 2 * len(CHARS), d_model=d_model, d_kv=8, d_ff=32,
                      num_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)
    return T5EncoderModel(config).eval()


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         scaling_factor=0.3611, shift_factor=0.1159).eval()


def build_flux_folder(path, seed: int = 0, guidance_embeds: bool = True,
                      vae: bool = False) -> Path:
    """Write a tiny random diffusers FLUX folder to `path`; returns it."""
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    torch.manual_seed(seed)
    FluxTransformer2DModel(**tiny_flux_config(guidance_embeds)).save_pretrained(
        path / "transformer", safe_serialization=True)
    flux_scheduler().save_pretrained(path / "scheduler")
    tiny_tokenizer().save_pretrained(path / "tokenizer")
    tiny_text_encoder(768, seed=seed).save_pretrained(path / "text_encoder",
                                                      safe_serialization=True)
    tiny_t5_tokenizer().save_pretrained(path / "tokenizer_2")
    tiny_t5(seed).save_pretrained(path / "text_encoder_2", safe_serialization=True)
    index = {"_class_name": "FluxPipeline",
             "transformer": ["diffusers", "FluxTransformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "vae": [None, None]}
    if vae:
        tiny_vae().save_pretrained(path / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (path / "model_index.json").write_text(json.dumps(index, indent=1))
    return path
