"""Baked LoRAs read and merged by kohya sd-scripts' own LoRA code.

sd-scripts' ``networks/lora.py`` (SD1/SD2/SDXL) and ``networks/lora_flux.py`` (FLUX) build a
LoRA network from a file's keys on sd-scripts' own models (``library/original_unet``,
``library/sdxl_original_unet``, ``library/flux_models``), built full size on the meta device;
only the target layers get real (zero) weights, so ``merge_to`` leaves exactly the update in
them. Every key must be consumed, and each merged layer must equal strength * B A^T of the
hypernetwork's factors (fused FLUX layers: the sum of their slices' updates).

Needs a sd-scripts checkout (``SD_SCRIPTS_PATH``, e.g. from ``github:kohya-ss/sd-scripts``);
skipped without it, as in CI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from unhype.bake import bake_lora
from unhype.families import get_family
from unhype.fileformat import host_paths, load_hypernet, save_hypernet
from unhype.hypernet import HyperNetConfig, build_hypernet, delta_weight

SD_SCRIPTS = os.environ.get("SD_SCRIPTS_PATH")
pytestmark = pytest.mark.skipif(not SD_SCRIPTS, reason="set SD_SCRIPTS_PATH to a kohya "
                                                       "sd-scripts checkout to run these")
STRENGTH = 0.7


@pytest.fixture(scope="module", autouse=True)
def sd_scripts_on_path():
    sys.path.insert(0, SD_SCRIPTS)
    yield
    sys.path.remove(SD_SCRIPTS)


def baked(tmp_path, family: str, preset: str | None, fmt: str = "kohya", model=None):
    """A hypernetwork on the family's full-size targets (or `model`'s), with non-zero B heads,
    and the LoRA baked from it for one embedding: (loaded file, its factors for that embedding,
    kohya tensors)."""
    fam = get_family(family)
    targets = [t.as_dict() for t in fam.targets(preset, model=model)]
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=targets,
                                        embed_dim=fam.embedding.dim, rank=2, hidden=8,
                                        head_hidden=4, seed=0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_hypernet(tmp_path / "h.safetensors", net.eval(), family)
    loaded = load_hypernet(tmp_path / "h.safetensors")
    emb = torch.randn(fam.embedding.dim, generator=gen)
    tensors, _ = bake_lora(loaded, emb, "a photo of a cat", STRENGTH, fmt=fmt)
    with torch.no_grad():
        factors = loaded.hypernet(emb[None])
    return loaded, factors, tensors


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=8,
                                        num_hidden_layers=1, num_attention_heads=2))


def kohya_unet(family: str):
    """sd-scripts' own UNet for the family, full size, on the meta device."""
    with torch.device("meta"):
        if family == "sdxl":
            from library.sdxl_original_unet import SdxlUNet2DConditionModel

            return SdxlUNet2DConditionModel()
        from library.original_unet import UNet2DConditionModel

        if family == "sd1":
            return UNet2DConditionModel(64, 8, 768, False, False)
        return UNet2DConditionModel(96, [5, 10, 20, 20], 1024, True, False)  # SD2 (v)


def zero_weights(model, paths) -> dict[str, torch.nn.Module]:
    """Give the modules at `paths` real zero weights (the rest stays on meta)."""
    modules = dict(model.named_modules())
    for path in paths:
        module = modules[path]
        module.weight = torch.nn.Parameter(torch.zeros(module.weight.shape))
        if module.bias is not None:
            module.bias = torch.nn.Parameter(torch.zeros(module.bias.shape))
    return {p: modules[p] for p in paths}


def merge_and_check_keys(lora_module, network_args, tensors):
    """sd-scripts' two ways in: a network applied to the model must consume every key with its
    shape (as when a LoRA is loaded for training or generation), and one built for inference
    merges the file into the model's weights (as with --network_merge)."""
    network, weights = lora_module.create_network_from_weights(
        1.0, None, *network_args, weights_sd=dict(tensors))
    network.apply_to(network_args[1], network_args[2], True, True)  # registers the modules
    mine = set(network.state_dict())
    assert mine == set(weights), (sorted(set(weights) - mine)[:5], sorted(mine - set(weights))[:5])
    network.load_state_dict(weights, strict=True)  # shapes
    merging, weights = lora_module.create_network_from_weights(
        1.0, None, *network_args, weights_sd=dict(tensors), for_inference=True)
    merging.merge_to(network_args[1], network_args[2], weights, torch.float32, "cpu")
    return merging


@pytest.mark.parametrize("family,preset", [("sd1", None), ("sd1", "attn_all"), ("sd1", "attn_ff"),
                                           ("sd2", None),
                                           ("sdxl", None)])
def test_sd_scripts_consumes_every_key_and_merges_the_update(tmp_path, family, preset):
    import networks.lora as kohya_lora

    loaded, factors, tensors = baked(tmp_path, family, preset)
    unet = kohya_unet(family)
    paths = host_paths(loaded.meta, "diffusers" if family != "sdxl" else "ldm")
    layers = zero_weights(unet, {hp.path for hp in paths.values()})
    encoders = [tiny_clip(), tiny_clip()] if family == "sdxl" else tiny_clip()
    network = merge_and_check_keys(kohya_lora, (None, encoders, unet), tensors)
    assert len(network.unet_loras) == len(paths) and not network.text_encoder_loras
    for name, hp in paths.items():
        a, b = factors[name]
        want = STRENGTH * delta_weight(a[0], b[0])
        torch.testing.assert_close(layers[hp.path].weight.detach(), want, rtol=1e-4, atol=1e-7)
        assert want.abs().max() > 0


def test_sd_scripts_flux_consumes_every_key_and_merges_the_fused_slices(tmp_path):
    """FLUX.1-dev's widths with 2 double and 1 single block (38 full-size single blocks' fused
    linear1 layers alone would take 10 GB of zeros here)."""
    import dataclasses

    import networks.lora_flux as kohya_flux
    from diffusers import FluxTransformer2DModel
    from library import flux_models

    with torch.device("meta"):
        reference = FluxTransformer2DModel(num_layers=2, num_single_layers=1,
                                           guidance_embeds=True)
        params = dataclasses.replace(flux_models.configs["dev"].params, depth=2,
                                     depth_single_blocks=1)
        flux = flux_models.Flux(params)
    loaded, factors, tensors = baked(tmp_path, "flux", None, fmt="kohya_bfl", model=reference)
    paths = host_paths(loaded.meta, "ldm")  # BFL fused paths with row slices
    layers = zero_weights(flux, {hp.path for hp in paths.values()})
    network = merge_and_check_keys(kohya_flux, (None, [tiny_clip()], flux), tensors)
    assert len(network.unet_loras) == len(layers)
    expected = {path: torch.zeros(module.weight.shape) for path, module in layers.items()}
    for name, hp in paths.items():
        a, b = factors[name]
        rows = slice(*hp.out_slice) if hp.out_slice else slice(None)
        expected[hp.path][rows] += STRENGTH * delta_weight(a[0], b[0])
    for path, want in expected.items():
        torch.testing.assert_close(layers[path].weight.detach(), want, rtol=1e-4, atol=1e-7)
    assert any(".qkv" in p for p in expected) and any("linear1" in p for p in expected)
