"""`--text_encoder` as one .safetensors file: an A1111 / ComfyUI checkpoint or a standalone CLIP-L
(unhype.embedding with the built-in configs). The encoder is full size (CLIP-L, 123M weights) with
random weights; its embedding must equal transformers' CLIPTextModel holding the same weights,
tokenized by OpenAI's CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch

from unhype.embedding import load_embedder
from unhype.errors import UnHypeError
from unhype.families import get_family
from unhype.fileformat import atomic_save_safetensors

UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
PROMPTS = ["a photo of a cat", "a red car on a road"]


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    """(reference CLIPTextModel, its tensors with the `text_model.` level, cache folder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from unhype.model_configs import config_folder

    cache = tmp_path_factory.mktemp("cache")
    config = CLIPTextConfig.from_pretrained(config_folder("sd15", cache=cache) / "text_encoder")
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    tensors = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous()
               for k, v in model.state_dict().items()}
    return model, tensors, cache


def reference(model, prompts):
    from transformers import CLIPTokenizer

    from unhype.model_configs import config_folder

    tok = CLIPTokenizer.from_pretrained(config_folder("sd15") / "tokenizer")
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).pooler_output


def test_sd1_checkpoint_and_clip_l_file_give_the_encoders_embedding(clip_l, tmp_path,
                                                                    monkeypatch):
    model, tensors, cache = clip_l
    monkeypatch.setenv("UNHYPE_CACHE", str(cache))
    checkpoint = tmp_path / "sd15-pruned.safetensors"
    atomic_save_safetensors({UNET_KEY: torch.zeros(320, 768), **{
        f"cond_stage_model.transformer.{k}": v for k, v in tensors.items()}}, checkpoint, {})
    standalone = tmp_path / "clip_l.safetensors"
    atomic_save_safetensors(dict(tensors), standalone, {})
    want = reference(model, PROMPTS)
    for family, path in (("sd1", checkpoint), ("sd1", standalone), ("flux", standalone)):
        got = load_embedder(get_family(family), str(path))(PROMPTS)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{family} {path.name}")


def test_wrong_or_broken_files_are_refused(clip_l, tmp_path, monkeypatch):
    _, tensors, cache = clip_l
    monkeypatch.setenv("UNHYPE_CACHE", str(cache))
    xl = tmp_path / "sdxl.safetensors"
    atomic_save_safetensors({UNET_KEY: torch.zeros(640, 2048)}, xl, {})
    with pytest.raises(UnHypeError, match="is an sdxl checkpoint, but this hypernetwork is for "
                                          "sd1"):
        load_embedder(get_family("sd1"), str(xl))
    with pytest.raises(UnHypeError, match="not an SD or FLUX.1 checkpoint.*for flux.*clip_l"):
        other = tmp_path / "other.safetensors"
        atomic_save_safetensors({"x": torch.zeros(1)}, other, {})
        load_embedder(get_family("flux"), str(other))
    partial = tmp_path / "partial_clip_l.safetensors"
    atomic_save_safetensors({k: v for k, v in tensors.items() if "layers.11." not in k},
                            partial, {})
    with pytest.raises(UnHypeError, match="not a CLIP-L text encoder \\(missing"):
        load_embedder(get_family("sd1"), str(partial))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UnHypeError, match="not a readable .safetensors"):
        load_embedder(get_family("sd1"), str(corrupt))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02")
    with pytest.raises(UnHypeError, match="only .safetensors"):
        load_embedder(get_family("sd1"), str(pickle))


FLUX_KEYS = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
             "vector_in.in_layer.weight": torch.zeros(8, 768)}


def test_flux_checkpoints_give_clip_l_or_say_they_hold_none(clip_l, tmp_path, monkeypatch):
    """ComfyUI's all-in-one FLUX checkpoint (CheckpointSave: the Flux config's "text_encoders."
    + FluxClipModel's clip_l SDClipModel, T5 beside it) holds CLIP-L; BFL's transformer file
    holds none; Chroma and FLUX.2 share the blocks but are not FLUX.1."""
    model, tensors, cache = clip_l
    monkeypatch.setenv("UNHYPE_CACHE", str(cache))
    comfy = tmp_path / "flux1-schnell-fp8.safetensors"
    atomic_save_safetensors({
        **{f"model.diffusion_model.{k}": v for k, v in FLUX_KEYS.items()},
        **{f"text_encoders.clip_l.transformer.{k}": v for k, v in tensors.items()},
        "text_encoders.clip_l.logit_scale": torch.tensor(4.6),
        "text_encoders.clip_l.transformer.text_projection.weight": torch.zeros(768, 768),
        "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(8, 4)}, comfy, {})
    got = load_embedder(get_family("flux"), str(comfy))(PROMPTS)
    torch.testing.assert_close(got, reference(model, PROMPTS), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnHypeError, match="is a flux checkpoint, but this hypernetwork is for "
                                          "sd1"):
        load_embedder(get_family("sd1"), str(comfy))

    bfl = tmp_path / "flux1-schnell.safetensors"
    atomic_save_safetensors(dict(FLUX_KEYS), bfl, {})
    with pytest.raises(UnHypeError, match="a FLUX transformer file: it holds no CLIP-L text "
                                          "encoder; pass FLUX's clip_l.safetensors"):
        load_embedder(get_family("flux"), str(bfl))
    relatives = {"Chroma": {"distilled_guidance_layer.in_proj.weight": torch.zeros(8, 64)},
                 "FLUX.2": {"double_stream_modulation_img.lin.weight": torch.zeros(48, 8)}}
    for name, extra in relatives.items():
        path = tmp_path / f"{name}.safetensors"
        atomic_save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8),
                                 **extra}, path, {})
        for family in ("flux", "sd1"):
            with pytest.raises(UnHypeError, match=f"is a {name} transformer, which UnHype does "
                                                  f"not support; this hypernetwork is for "
                                                  f"{family}"):
                load_embedder(get_family(family), str(path))
