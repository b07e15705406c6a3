"""kohya_bfl bake format: FLUX LoRAs on BFL's fused layers (sd-scripts names), zero-padded slices."""

from __future__ import annotations

import pytest
import torch

from unhype.bake import FORMATS, bake_lora
from unhype.errors import UnHypeError
from unhype.fileformat import host_paths, load_hypernet, save_hypernet
from unhype.hypernet import HyperNetConfig, build_hypernet, delta_weight

torch.set_num_threads(1)


def tiny_flux_file(path, family="flux", preset="attn_all"):
    from diffusers import FluxTransformer2DModel

    from unhype.families import get_family

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    targets = get_family("flux").targets(preset, model=transformer)
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=[t.as_dict() for t in targets],
                                        embed_dim=768, rank=2, hidden=16, seed=0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_hypernet(path, net.eval(), family)
    return load_hypernet(path)


def test_bfl_tensors_sum_to_the_slice_deltas_on_each_fused_layer(tmp_path):
    loaded = tiny_flux_file(tmp_path / "h.safetensors")
    emb = torch.randn(768, generator=torch.Generator().manual_seed(2))
    tensors, meta = bake_lora(loaded, emb, "a cat", 0.5, fmt="kohya_bfl")
    assert "kohya_bfl" in FORMATS and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux"  # as sd-scripts' FLUX LoRAs
    ranks = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(ranks) > 1 and meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    with torch.no_grad():
        factors = loaded.hypernet(emb[None])
    h = 32
    expected: dict[str, torch.Tensor] = {}
    for name, hp in host_paths(loaded.meta, "ldm").items():
        rows = {"qkv": 3 * h, "linear1": 7 * h}.get(hp.path.rsplit(".", 1)[-1], h)
        w = expected.setdefault(hp.path, torch.zeros(rows, h))
        sl = slice(*hp.out_slice) if hp.out_slice else slice(None)
        w[sl] += 0.5 * delta_weight(factors[name][0][0], factors[name][1][0])
    keys = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
            for k in tensors}
    assert keys == {"lora_unet_" + p.replace(".", "_") for p in expected}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in keys
    assert "lora_unet_single_blocks_0_linear1" in keys
    for path, want in expected.items():
        key = "lora_unet_" + path.replace(".", "_")
        up, down = tensors[key + ".lora_up.weight"], tensors[key + ".lora_down.weight"]
        assert float(tensors[key + ".alpha"]) == down.shape[0] == up.shape[1]
        assert up.shape[0] == want.shape[0]  # zero-padded to the fused rows
        torch.testing.assert_close(up @ down, want, rtol=1e-5, atol=1e-6)


def test_bfl_format_refused_for_sd_files_and_unknown_formats(tmp_path):
    from unhype.families import get_family

    sd = get_family("sd1")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=[32, 32], layers_per_block=1, norm_num_groups=8,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=768,
            attention_head_dim=8)
    targets = [t.as_dict() for t in sd.targets(model=unet)]
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=targets, embed_dim=768,
                                        rank=2, hidden=8))
    save_hypernet(tmp_path / "s.safetensors", net, "sd1")
    loaded = load_hypernet(tmp_path / "s.safetensors")
    with pytest.raises(UnHypeError, match="kohya_bfl format is for FLUX"):
        bake_lora(loaded, torch.randn(768), "x", fmt="kohya_bfl")
    with pytest.raises(UnHypeError, match="unknown LoRA format"):
        bake_lora(loaded, torch.randn(768), "x", fmt="peft")


def test_full_size_bfl_lora_is_read_by_diffusers_kohya_flux_converter(tmp_path):
    """diffusers' FluxPipeline.lora_state_dict converts sd-scripts FLUX LoRAs with FLUX.1's
    sizes hard-coded (3072 / 12288), so this runs on the full-size targets (rank 1: small)."""
    from diffusers import FluxPipeline

    from unhype.bake import save_lora
    from unhype.families import get_family

    targets = get_family("flux").targets()
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=[t.as_dict() for t in targets],
                                        embed_dim=768, rank=1, hidden=2, seed=0))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_hypernet(tmp_path / "h.safetensors", net.eval(), "flux")
    loaded = load_hypernet(tmp_path / "h.safetensors")
    emb = torch.randn(768, generator=torch.Generator().manual_seed(2))
    tensors, meta = bake_lora(loaded, emb, "a cat", 0.7, fmt="kohya_bfl")
    save_lora(tmp_path / "l.safetensors", tensors, meta)
    with torch.no_grad():
        factors = loaded.hypernet(emb[None])
    state = FluxPipeline.lora_state_dict(str(tmp_path / "l.safetensors"))
    x = torch.randn(3072, 4, generator=torch.Generator().manual_seed(3))  # probe: B (A x)
    products = {k[:-len(".lora_A.weight")]: state[k.replace("lora_A", "lora_B")] @ (v @ x)
                for k, v in state.items() if k.endswith(".lora_A.weight")}
    ours = {"transformer." + t.path: t.name for t in targets}
    assert set(ours) <= set(products)
    for key, product in products.items():
        if key in ours:
            a, b = factors[ours[key]]
            torch.testing.assert_close(product, 0.7 * b[0] @ (a[0].T @ x), rtol=1e-4, atol=1e-7)
        else:  # the zero-padded slices (to_q, to_k, proj_mlp, ...) convert to zero updates
            assert not product.any(), key
