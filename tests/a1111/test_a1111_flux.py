"""FLUX in A1111/Forge: not supported by the extension; refused by name with a clear message.

Forge runs FLUX (backend/nn/flux.py, BFL layout: double_blocks.N.img_attn.qkv); the extension
hooks LDM UNets only, so a FLUX model or a FLUX hypernetwork file stops the generation with a
message that says so and where to go instead (or, with the mismatch setting, generates without
UnHype and says so in the infotext comments).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unhype.errors import UnHypeError
from unhype.fileformat import save_hypernet
from unhype.model_check import detect_family

torch.set_num_threads(1)


def bfl_flux_like() -> nn.Module:
    """The module layout of Forge's / ComfyUI's FLUX transformer, tiny."""
    block = nn.Module()
    block.img_attn = nn.Module()
    block.img_attn.qkv = nn.Linear(8, 24)
    model = nn.Module()
    model.double_blocks = nn.ModuleList([block])
    model.single_blocks = nn.ModuleList([nn.Linear(8, 8)])
    return model


def test_flux_layout_is_detected_and_named_in_the_refusal():
    from unhype_webui.session import host_family_problem

    assert detect_family(bfl_flux_like()) == "flux"
    msg = host_family_problem("sd1", "flux", "erase_cat.safetensors")
    assert "FLUX is not supported in the A1111/Forge extension" in msg
    assert "erase_cat.safetensors is for sd1, the loaded model is flux" in msg
    assert "ComfyUI" in msg and "kohya_bfl" in msg
    assert "FLUX is not supported" in host_family_problem("flux", "flux")
    assert "FLUX is not supported" in host_family_problem("flux", "sdxl")
    assert host_family_problem("sd1", "sd1") is None


def flux_file(folder):
    from diffusers import FluxTransformer2DModel

    from unhype.families import get_family
    from unhype.hypernet import HyperNetConfig, build_hypernet

    with torch.device("meta"):
        tr = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2,
                                    joint_attention_dim=32, pooled_projection_dim=768,
                                    guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    targets = [t.as_dict() for t in get_family("flux").targets(model=tr)]
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=targets, embed_dim=768,
                                        rank=1, hidden=8))
    path = folder / "erase_flux.safetensors"
    save_hypernet(path, net, "flux", concepts=[{"target": "cat"}])
    return path


@pytest.mark.needs_unet
def test_forge_flux_model_and_flux_file_stop_the_generation_with_the_message(webui_dirs):
    import fake_models
    from test_a1111_generation import hooks_left, run
    from modules import scripts, shared

    from tests.helpers import hypernet_for

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    script = scripts.load_scripts(str(root), [str(root / "scripts" / "unhype_a1111.py")])[0]()
    net = hypernet_for(fake_models.tiny_diffusers_twin(), family="sd1", rank=1, hidden=8)
    save_hypernet(webui_dirs["unhype"] / "erase_cat.safetensors", net, "sd1",
                  concepts=[{"target": "cat"}])
    flux_file(webui_dirs["unhype"])
    flux_model = bfl_flux_like()
    forge_flux = fake_models.ForgeSD1(unet=flux_model)
    with pytest.raises(UnHypeError, match="FLUX is not supported in the A1111/Forge extension"):
        run(forge_flux, script, ["a cat"], args=(True, "erase_cat", 1.0, True))
    assert hooks_left(flux_model) == 0

    sd1 = fake_models.A1111SD1()
    with pytest.raises(UnHypeError, match="erase_flux is for flux, the loaded "
                                          "model is sd1"):
        run(sd1, script, ["a cat"], args=(True, "erase_flux", 1.0, True))
    assert hooks_left(sd1.model.diffusion_model) == 0

    shared.opts.unhype_on_family_mismatch = "Generate without UnHype"  # fresh opts per test
    p, _ = run(sd1, script, ["a cat"], args=(True, "erase_flux", 1.0, True))
    assert any("FLUX is not supported" in c for c in p.comments)
    assert hooks_left(sd1.model.diffusion_model) == 0
