"""Baked kohya LoRAs: diffusers' own loader consumes every key and reproduces the dynamic LoRA."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers import hypernet_for, tiny_sd_unet
from unhype.bake import bake_lora, save_lora
from unhype.dynamic_lora import DynamicLoRA
from unhype.errors import UnHypeError
from unhype.fileformat import load_hypernet, save_hypernet

pytest.importorskip("peft", reason="diffusers' LoRA loader needs peft")


def tiny_text_encoder(hidden=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                         projection_dim=hidden)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_pipeline(family):
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"])
    if family == "sd1":
        unet = tiny_sd_unet(cross_attention_dim=32)
        return StableDiffusionPipeline(vae=vae, text_encoder=tiny_text_encoder(), tokenizer=None,
                                       unet=unet, scheduler=DDIMScheduler(),
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[16, 32, 32], attention_head_dim=[2, 4, 4], norm_num_groups=8,
        cross_attention_dim=64, transformer_layers_per_block=[1, 1, 2],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80).eval()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_text_encoder(),
                                     text_encoder_2=tiny_text_encoder(projection=True),
                                     tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=DDIMScheduler())


def unet_inputs(family, unet, batch=2):
    torch.manual_seed(1)
    cross = unet.config.cross_attention_dim
    args = (torch.randn(batch, 4, 8, 8), torch.tensor([500] * batch), torch.randn(batch, 5, cross))
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32),
                                      "time_ids": torch.randn(batch, 6)}
    return args, extra


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", ["xattn_kv", "attn_all", "attn_ff"])
def test_diffusers_loads_every_key_and_matches_dynamic_lora(tmp_path, family, preset):
    pipe = tiny_pipeline(family)
    from unhype.families import get_family

    fam = get_family(family)
    targets = fam.targets(preset, model=pipe.unet)
    net = hypernet_for(pipe.unet, family=family, rank=2, perturb=0.1)
    if preset != "xattn_kv":  # rebuild on the wider preset
        from unhype.hypernet import HyperNetConfig, build_hypernet

        cfg = net.config
        net = build_hypernet(HyperNetConfig(variant="shared", targets=[t.as_dict() for t in
                                                                        targets],
                                            embed_dim=cfg.embed_dim, rank=2, hidden=16,
                                            head_hidden=8))
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    hyper_path = tmp_path / "h.safetensors"
    save_hypernet(hyper_path, net, family, concepts=[{"target": "cat", "anchor": ""}])
    loaded = load_hypernet(hyper_path)
    emb = torch.randn(fam.embedding.dim)
    tensors, metadata = bake_lora(loaded, emb, "a photo of a cat", strength=0.8)
    lora_path = tmp_path / "baked.safetensors"
    save_lora(lora_path, tensors, metadata)

    args, extra = unet_inputs(family, pipe.unet)
    with torch.no_grad():
        base = pipe.unet(*args, **extra).sample
        with DynamicLoRA.attach(pipe.unet, {t.name: t.path for t in targets}) as dyn:
            dyn.set(loaded.hypernet(emb[None]), [0, 0], strength=0.8)  # both branches
            expected = pipe.unet(*args, **extra).sample
        pipe.load_lora_weights(str(lora_path), adapter_name="unhype")
        baked = pipe.unet(*args, **extra).sample
    assert (expected - base).abs().max() > 1e-3  # the LoRA does something measurable
    torch.testing.assert_close(baked, expected, rtol=1e-3, atol=1e-4)
    lora_layers = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")
                   and "unhype" in getattr(m, "lora_A", {})]
    assert len(lora_layers) == len(targets)  # every key consumed, none silently dropped


def test_kohya_metadata_and_hash(tmp_path):
    unet = tiny_sd_unet()
    net = hypernet_for(unet)
    save_hypernet(tmp_path / "h.safetensors", net, "sd1",
                  concepts=[{"target": "cat", "anchor": ""}])
    loaded = load_hypernet(tmp_path / "h.safetensors")
    tensors, metadata = bake_lora(loaded, torch.randn(768), "a cat", 1.0, title="no_cats")
    save_lora(tmp_path / "l.safetensors", tensors, metadata)
    with safe_open(tmp_path / "l.safetensors", "pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "2.0" and meta["modelspec.title"] == "no_cats"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    assert json.loads(meta["ss_network_args"])["unhype_prompt"] == "a cat"
    name = loaded.meta.config.targets[0].name
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    # kohya's hash covers the tensor data of a file saved with ss_* metadata only
    from unhype.bake import kohya_hashes
    assert kohya_hashes(tensors, metadata)[0] == meta["sshs_model_hash"]
    with pytest.raises(UnHypeError, match="strength"):
        bake_lora(loaded, torch.randn(768), "a cat", float("inf"))


def test_flux_lora_loads_in_diffusers_and_matches_dynamic_lora(tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from unhype.families import get_family
    from unhype.hypernet import HyperNetConfig, build_hypernet

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=[4, 6, 6]).eval()
    targets = get_family("flux").targets(model=transformer)
    assert len(targets) == 4  # to_v, to_out.0, add_v_proj (double) + to_v (single)
    net = build_hypernet(HyperNetConfig(variant="shared", targets=[t.as_dict() for t in targets],
                                        embed_dim=768, rank=2, hidden=16, head_hidden=8))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    save_hypernet(tmp_path / "h.safetensors", net, "flux")
    loaded = load_hypernet(tmp_path / "h.safetensors")
    emb = torch.randn(768)
    tensors, metadata = bake_lora(loaded, emb, "x", 1.0)
    assert metadata["ss_base_model_version"] == "flux1"
    save_lora(tmp_path / "l.safetensors", tensors, metadata)
    kwargs = dict(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 4, 32),
                  pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3),
                  guidance=torch.tensor([3.5]))
    with torch.no_grad():
        base = transformer(**kwargs).sample
        with DynamicLoRA.attach(transformer, {t.name: t.path for t in targets}) as dyn:
            dyn.set(loaded.hypernet(emb[None]), [0])
            expected = transformer(**kwargs).sample
        state, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "l.safetensors"),
                                                     return_alphas=True)
        assert len(state) == 2 * len(targets)  # every layer converted, nothing dropped
        FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas,
                                                transformer=transformer, adapter_name="u")
        baked = transformer(**kwargs).sample
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(baked, expected, rtol=1e-4, atol=1e-5)


def test_modelspec_of_sd2_follows_the_prediction_it_was_trained_for():
    """sd-scripts writes 768-v only for a v-prediction SD 2.x; an epsilon (512) model is
    stable-diffusion-v2-512 at 512x512."""
    from types import SimpleNamespace

    from unhype.bake import _modelspec_architecture
    from unhype.families import get_family

    def fake(family, training):
        return SimpleNamespace(family=get_family(family), meta=SimpleNamespace(training=training))

    assert _modelspec_architecture(fake("sd2", {"prediction_type": "epsilon"})) == \
        ("stable-diffusion-v2-512/lora", "512x512")
    assert _modelspec_architecture(fake("sd2", {"prediction_type": "v_prediction"})) == \
        ("stable-diffusion-v2-768-v/lora", "768x768")
    assert _modelspec_architecture(fake("sdxl", {})) == \
        ("stable-diffusion-xl-v1-base/lora", "1024x1024")


def _two_way(emb):
    """Layer "a" grows with the embedding's first entry, "b" with its second (tests/test_probe)."""
    n = len(emb)
    return {"a": (emb[:, :1, None].expand(-1, 3, 1).clone(), torch.ones(n, 2, 1)),
            "b": (emb[:, 1:2, None].expand(-1, 3, 1).clone(), torch.ones(n, 2, 1))}


def test_metadata_says_what_the_baked_prompt_fires_not_every_concept(tmp_path):
    """A LoRA baked for one prompt of a two-concept file: the metadata names the concept the
    prompt fires and its share of the reference (it claimed "erases ['circle', 'square']"
    for any prompt); a prompt at 0.3 of the reference fires nothing and gets the weak note."""
    from dataclasses import replace

    from unhype.bake import probe_embedding, weak_note
    from unhype.fileformat import save_with_training

    save_hypernet(tmp_path / "h.safetensors", hypernet_for(tiny_sd_unet(), rank=1), "sd1",
                  concepts=[{"target": "circle"}, {"target": "square"}])
    scale = 6 ** 0.5  # ||dW|| of (1, 0) in _two_way
    loaded = replace(load_hypernet(save_with_training(
        load_hypernet(tmp_path / "h.safetensors"), tmp_path / "g.safetensors",
        gate_reference=scale, gate_floor=0.03)), hypernet=_two_way)
    words = {"circle": (1.0, 0.0), "square": (0.0, 1.0)}

    def embed(texts):
        return torch.tensor([words[t] for t in texts])

    strong, weak = torch.tensor([1.2, 0.0]), torch.tensor([0.3, 0.05])
    probed = probe_embedding(loaded, strong, "a red circle", embed)
    assert probed.fired == ["circle"] and weak_note(probed) is None
    _, meta = bake_lora(loaded, strong, "a red circle", 1.0, probed=probed)
    text = meta["modelspec.description"]
    assert "for prompt 'a red circle': fires circle; nearest concept circle at cosine 1.00; " \
           "1.20 of circle's reference" in text
    assert "the hypernetwork file erases ['circle', 'square']" in text
    assert "fires circle" in meta["ss_training_comment"]
    args = json.loads(meta["ss_network_args"])
    assert args["unhype_fires"] == ["circle"] and args["unhype_share_of_reference"] == \
        pytest.approx(1.2) and args["unhype_nearest_concept"] == "circle"
    probed = probe_embedding(loaded, weak, "a red circle, a blue heart", embed)
    assert probed.fired == [] and probed.relative == pytest.approx((0.3 ** 2 + 0.05 ** 2) ** 0.5)
    _, meta = bake_lora(loaded, weak, "a red circle, a blue heart", 1.0, probed=probed)
    assert "fires nothing; nearest concept circle at cosine 0.99; 0.30 of circle's reference, " \
           "under the firing threshold 0.5" in meta["modelspec.description"]
    assert weak_note(probed).startswith("this LoRA is weak for this prompt (fires nothing")
    # without a text encoder (ComfyUI Bake with no CLIP): the share alone, still weak
    _, meta = bake_lora(loaded, weak, "x", 1.0)
    assert "concepts not measured (no text encoder); 0.30 of the reference, under the firing " \
           "threshold 0.5" in meta["modelspec.description"]
    assert weak_note(probe_embedding(loaded, weak, "x")) is not None
    assert weak_note(probe_embedding(loaded, strong, "x")) is None
