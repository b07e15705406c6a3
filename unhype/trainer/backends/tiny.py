"""Tiny random SD1 / SD2 / SDXL diffusers pipeline folders (tests and benchmarks, no download).

Real class layouts, real embedding widths (768 / 1024 / 1280 pooled) so the families' checks hold,
everything else as small as diffusers allows. `build_pipeline_folder(kind, path)` writes
model_index.json, unet/, text_encoder(_2)/, tokenizer(_2)/ and scheduler/ with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(hidden: int, projection: int | None = None, seed: int = 0,
                      positions: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=hidden,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=positions, projection_dim=projection or hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_unet_config(kind: str = "sd1", channels=(32, 64), sample_size: int = 8) -> dict:
    cross = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[kind]
    config = {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": list(channels), "attention_head_dim": 8,
        "cross_attention_dim": cross, "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }
    if kind != "sd1":
        config["use_linear_projection"] = True
    if kind == "sdxl":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=1280 + 6 * 8)
    return config


def tiny_components(kind: str = "sd1", seed: int = 0, unet_config: dict | None = None):
    """(unet, scheduler, tokenizers, text_encoders) with random weights."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_config or tiny_unet_config(kind)).eval()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon")
    if kind == "sdxl":
        tokenizers = [tiny_tokenizer(), tiny_tokenizer()]
        encoders = [tiny_text_encoder(768, seed=seed),
                    tiny_text_encoder(1280, projection=1280, seed=seed + 1)]
    else:
        tokenizers = [tiny_tokenizer()]
        encoders = [tiny_text_encoder(768 if kind == "sd1" else 1024, seed=seed)]
    return unet, scheduler, tokenizers, encoders


def build_pipeline_folder(kind: str, path, seed: int = 0) -> Path:
    """Write a tiny random diffusers pipeline folder of `kind` (sd1, sd2, sdxl) to `path`."""
    path = Path(path)
    unet, scheduler, tokenizers, encoders = tiny_components(kind, seed)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    suffixes = ["", "_2"][: len(encoders)]
    for suffix, tok, enc in zip(suffixes, tokenizers, encoders):
        tok.save_pretrained(path / f"tokenizer{suffix}")
        enc.save_pretrained(path / f"text_encoder{suffix}", safe_serialization=True)
    pipe = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    index = {"_class_name": pipe, "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if kind == "sdxl":
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    (path / "model_index.json").write_text(json.dumps(index, indent=1))
    return path
