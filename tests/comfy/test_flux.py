"""UnHype Apply and baked LoRAs on a tiny ComfyUI FLUX (comfy.ldm.flux): fused-layer row slices.

Needs a ComfyUI with FLUX (set COMFYUI_PATH to a current checkout); the 2024-03 ComfyUI that CI
installs has no comfy.ldm.flux and every test here is skipped with that reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from unhype.errors import UnHypeError
from unhype.fileformat import host_paths
from unhype.hypernet import delta_weight

torch.set_num_threads(1)


def _has_flux() -> bool:
    try:
        return importlib.util.find_spec("comfy.ldm.flux") is not None
    except (ImportError, ValueError):
        return False


pytestmark = pytest.mark.skipif(not _has_flux(), reason="this ComfyUI has no comfy.ldm.flux "
                                "(predates FLUX); set COMFYUI_PATH to a current ComfyUI")

HIDDEN, HEADS, CONTEXT, TOKENS = 64, 4, 32, 8
TINY_FLUX = {  # what comfy.model_detection produces for FLUX, with tiny widths
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
    "vec_in_dim": 768, "context_in_dim": CONTEXT, "hidden_size": HIDDEN, "mlp_ratio": 4.0,
    "num_heads": HEADS, "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6],
    "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}


def tiny_flux_model(seed=0):
    return tiny_flux_model_with(seed)


def tiny_flux_model_with(seed=0, weight_dtype=None, **changes):
    """`weight_dtype` (e.g. float8_e4m3fn): weights stored in it, computed in fp32."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from tiny import _randomize

    config = comfy.supported_models.Flux({**TINY_FLUX, **changes})
    if weight_dtype is None:
        config.set_inference_dtype(torch.float32, None)
    else:
        config.set_inference_dtype(weight_dtype, torch.float32)
    base = config.get_model({})
    _randomize(base.diffusion_model, seed)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                            torch.device("cpu"))


def tiny_diffusers_flux():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
            attention_head_dim=HIDDEN // HEADS, num_attention_heads=HEADS,
            joint_attention_dim=CONTEXT, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def flux_hypernet(path, preset=None, seed=0):
    from unhype.families import get_family
    from unhype.fileformat import save_hypernet
    from unhype.hypernet import HyperNetConfig, build_hypernet

    targets = [t.as_dict() for t in get_family("flux").targets(preset, model=tiny_diffusers_flux())]
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=targets, embed_dim=768,
                                        rank=2, hidden=16, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_hypernet(path, net.eval(), "flux", concepts=[
        {"target": "a photo of a cat", "anchor": "a photo", "synonyms": []}],
        training={"note": "random test network"})


def cond(seed, guidance=3.5):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TOKENS, CONTEXT, generator=gen),
             {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": guidance}]]


@pytest.fixture(scope="module")
def flux_model():
    return tiny_flux_model()


@pytest.fixture(scope="module")
def flux_loaded(pack, comfy_dirs):
    path = flux_hypernet(comfy_dirs["unhype"] / "tiny_flux.safetensors")
    return pack.nodes.glue.load_cached(str(path))


@pytest.fixture(scope="module")
def flux_wide(pack, comfy_dirs):  # every q/k/v slice kind, single blocks included
    path = flux_hypernet(comfy_dirs["unhype"] / "tiny_flux_wide.safetensors", "attn_all", 3)
    return pack.nodes.glue.load_cached(str(path))


def apply(pack, model, conditioning, loaded, strength=1.0, mode="auto"):
    return pack.nodes.definitions.UnHypeApply().apply(model, conditioning, loaded, strength,
                                                      mode)["result"]


def weights(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def assert_untouched(model, before):
    after = model.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed[:3]}"
    hooked = [n for n, m in model.model.named_modules() if m._forward_hooks]
    assert not hooked, f"hooks left on {hooked[:3]}"


def merged_forward(model, loaded, conditioning, x, t, strength=1.0, index=0):
    """The base FLUX with each target's slice delta merged into a copy of its fused weight."""
    import copy

    pooled = torch.cat([e[1]["pooled_output"] for e in conditioning]).float()
    with torch.no_grad():
        factors = loaded.hypernet(pooled)
    root = copy.deepcopy(model.model)
    named = dict(root.diffusion_model.named_modules())
    with torch.no_grad():
        for name, hp in host_paths(loaded.meta, "ldm").items():
            a, b = factors[name]
            delta = strength * delta_weight(a[index], b[index])
            w = named[hp.path].weight
            rows = slice(*hp.out_slice) if hp.out_slice else slice(None)
            w[rows] += delta.to(w.dtype)
        c = conditioning[0]
        return root.apply_model(x, t, c_crossattn=c[0], y=c[1]["pooled_output"],
                                guidance=torch.full((x.shape[0],), c[1]["guidance"]))


def sample(model, positive, negative, steps=1, cfg=1.0):
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                               latent, disable_pbar=True, seed=0)


def test_targets_resolve_to_slices_in_comfys_key_map(pack, flux_model, flux_wide):
    import comfy.lora
    from unhype.comfy_apply import build_plan

    plan = build_plan(flux_wide, cond(1), 1.0)
    keys = pack.nodes.glue.resolve_keys(flux_model, plan)
    key_map = comfy.lora.model_lora_keys_unet(flux_model.model, {})
    assert len(keys) == len(flux_wide.meta.config.targets) == 2 * 8 + 2 * 3
    sliced = [k for k in keys.values() if isinstance(k, tuple)]
    assert len(sliced) == 18
    assert keys["lora_transformer_transformer_blocks_1_attn_to_v"] == \
        ("diffusion_model.double_blocks.1.img_attn.qkv.weight", (0, 2 * HIDDEN, HIDDEN))
    assert keys["lora_transformer_single_transformer_blocks_0_attn_to_k"] == \
        ("diffusion_model.single_blocks.0.linear1.weight", (0, HIDDEN, HIDDEN))
    assert all(key_map[n] == k for n, k in keys.items())


def test_per_row_equals_slice_delta_merged_into_fused_weight(pack, flux_model, flux_loaded,
                                                             flux_wide):
    model = flux_model
    before = weights(model)
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([0.7])
    for loaded in (flux_loaded, flux_wide):
        c = cond(2)
        patched, out_cond, info = apply(pack, model, c, loaded)
        assert "per-row" in info and "every row" in info and out_cond is c
        args = {"input": x, "timestep": t, "cond_or_uncond": [0],
                "c": {"c_crossattn": c[0][0], "y": c[0][1]["pooled_output"],
                      "guidance": torch.tensor([3.5]), "transformer_options": {}}}
        with torch.no_grad():
            got = patched.model_options["model_function_wrapper"](model.model.apply_model, args)
            base = model.model.apply_model(x, t, **args["c"])
        want = merged_forward(model, loaded, c, x, t)
        assert (got - base).abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # a second prompt in the same batch gets its own LoRA; unknown rows run the base
        c2 = cond(3)
        both = [c[0], c2[0]]
        patched2, _, _ = apply(pack, model, both, loaded)
        stray = torch.randn(1, TOKENS, CONTEXT)
        args2 = {"input": x.repeat(3, 1, 1, 1), "timestep": t.repeat(3), "cond_or_uncond": [0],
                 "c": {"c_crossattn": torch.cat([c2[0][0], stray, c[0][0]]),
                       "y": torch.cat([c2[0][1]["pooled_output"], torch.zeros(1, 768),
                                       c[0][1]["pooled_output"]]),
                       "guidance": torch.full((3,), 3.5), "transformer_options": {}}}
        with torch.no_grad():
            out = patched2.model_options["model_function_wrapper"](model.model.apply_model,
                                                                   args2)
            base3 = model.model.apply_model(args2["input"], args2["timestep"], **args2["c"])
        torch.testing.assert_close(out[2:], got, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[0:1], merged_forward(model, loaded, c2, x, t),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[1:2], base3[1:2], rtol=0, atol=0)
    assert_untouched(model, before)


def test_weights_bit_identical_after_sampling_and_exception(pack, flux_model, flux_wide):
    model = flux_model
    before = weights(model)
    c = cond(4)
    patched, _, _ = apply(pack, model, c, flux_wide)
    ref = sample(model, c, c)
    out = sample(patched, c, c)
    assert (out - ref).abs().max() > 1e-5
    assert_untouched(model, before)
    torch.testing.assert_close(sample(model, c, c), ref, rtol=0, atol=0)

    target = model.model.diffusion_model.final_layer
    seen = {}

    def boom(module, args):
        seen["hooked"] = sum(1 for m in model.model.modules() if m._forward_hooks)
        raise RuntimeError("boom inside FLUX")

    handle = target.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sample(patched, c, c)
    finally:
        handle.remove()
    assert seen["hooked"] == len({hp.path for hp in host_paths(flux_wide.meta,
                                                                     "ldm").values()})
    assert_untouched(model, before)


def test_merge_path_patches_the_fused_slices(pack, flux_model, flux_wide):
    import comfy.model_management

    model = flux_model
    before = weights(model)
    c = cond(5)
    merged, _, info = apply(pack, model, c, flux_wide, mode="merge into weights (both branches)")
    assert "MERGED" in info
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([0.4])
    with torch.no_grad():
        comfy.model_management.load_models_gpu([merged])
        got = merged.model.apply_model(x, t, c_crossattn=c[0][0], y=c[0][1]["pooled_output"],
                                       guidance=torch.tensor([3.5]))
        comfy.model_management.unload_all_models()
    torch.testing.assert_close(got, merged_forward(model, flux_wide, c, x, t),
                               rtol=1e-4, atol=1e-5)
    assert_untouched(model, before)


def test_fp8_flux_per_row_is_exact_and_merge_says_what_rounding_loses(pack, flux_wide):
    """A FLUX model stored in fp8 (the common 24 GB set-up): per-row gives what the fp32 model
    with the same weights gives; merging into the fused fp8 slices is reported as lossy."""
    import re

    stored = tiny_flux_model_with(weight_dtype=torch.float8_e4m3fn)
    upcast = tiny_flux_model()
    state = stored.model.diffusion_model.state_dict()
    assert state["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    upcast.model.diffusion_model.load_state_dict({k: v.float() for k, v in state.items()})
    c = cond(8)
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([0.6])
    args = {"input": x, "timestep": t, "cond_or_uncond": [0],
            "c": {"c_crossattn": c[0][0], "y": c[0][1]["pooled_output"],
                  "guidance": torch.tensor([3.5]), "transformer_options": {}}}
    outs = {}
    for name, model in (("fp8", stored), ("fp32", upcast)):
        patched, _, info = apply(pack, model, c, flux_wide)
        assert "stored in" not in info
        with torch.no_grad():
            outs[name] = patched.model_options["model_function_wrapper"](
                model.model.apply_model, args)
    torch.testing.assert_close(outs["fp8"], outs["fp32"], rtol=1e-5, atol=1e-6)
    _, _, info = apply(pack, stored, c, flux_wide, mode="merge into weights (both branches)")
    said = re.search(r"stored in float8_e4m3fn: writing the update into them loses about "
                     r"(\d+)% of it \(first prompt, (\d+) layers\)", info)
    assert said and int(said.group(2)) == len(flux_wide.meta.config.targets), info


def test_wrong_family_refused_both_ways(pack, flux_model, tiny_parts, loaded, flux_loaded):
    with pytest.raises(UnHypeError, match="trained for sd1 but the model is flux"):
        apply(pack, flux_model, cond(6), loaded)
    sd_cond = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]
    with pytest.raises(UnHypeError, match="trained for flux but the model is sd1"):
        apply(pack, tiny_parts["model"], sd_cond, flux_loaded)


def baked(loaded, seed=7, fmt=None):
    from unhype.bake import bake_lora

    emb = torch.randn(768, generator=torch.Generator().manual_seed(seed))
    kw = {} if fmt is None else {"fmt": fmt}
    tensors, _ = bake_lora(loaded, emb, "a photo of a cat", 0.8, **kw)
    with torch.no_grad():
        factors = loaded.hypernet(emb[None])
    return tensors, factors


def comfy_lora_patched_weights(model, tensors, caplog):
    """ComfyUI's own path for a LoRA file: key map -> load_lora -> add_patches -> patched model."""
    import logging

    import comfy.lora
    import comfy.model_management

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(tensors, key_map)
    dropped = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    patched = model.clone()
    added = patched.add_patches(patches, 1.0)
    comfy.model_management.load_models_gpu([patched])
    try:
        got = {k: v.detach().clone() for k, v in patched.model.state_dict().items()}
    finally:
        comfy.model_management.unload_all_models()
    return dropped, patches, added, got


@pytest.mark.parametrize("fmt", [None, "kohya_bfl"])
def test_baked_flux_lora_fully_consumed_by_comfyui(flux_model, flux_wide, caplog, fmt):
    model = flux_model
    before = weights(model)
    if fmt is not None:
        from unhype import bake

        if "kohya_bfl" not in getattr(bake, "FORMATS", ()):
            pytest.skip("no kohya_bfl bake format")
    tensors, factors = baked(flux_wide, fmt=fmt)
    dropped, patches, added, got = comfy_lora_patched_weights(model, tensors, caplog)
    assert not dropped, dropped[:3]
    assert len(added) == len(patches)
    paths = host_paths(flux_wide.meta, "ldm")
    want = {k: v.clone() for k, v in before.items()}
    for name, hp in paths.items():
        a, b = factors[name]
        key = "diffusion_model." + hp.path + ".weight"
        rows = slice(*hp.out_slice) if hp.out_slice else slice(None)
        want[key][rows] += 0.8 * delta_weight(a[0], b[0])
    changed = {k for k in before if not torch.equal(before[k], got[k])}
    assert changed == {"diffusion_model." + hp.path + ".weight" for hp in paths.values()}
    for k in changed:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert_untouched(model, before)
    # the check sees ComfyUI's drop: a key it does not know is reported
    import comfy.lora

    extra = dict(tensors)
    extra["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    caplog.clear()
    comfy.lora.load_lora(extra, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert any("lora_unet_not_a_layer" in r.getMessage() for r in caplog.records)


def test_flux_workflow_ui_and_api_agree_and_run_in_comfys_executor(pack, tiny_parts, flux_loaded,
                                                                   comfy_dirs, monkeypatch):
    import json
    import shutil

    import comfy.sd
    import comfy.taesd.taesd
    import execution
    import nodes

    from test_workflows import ROOT, StubServer, ui_to_api, validate
    from tiny import _randomize
    from unhype import comfy_apply

    nodes.NODE_CLASS_MAPPINGS.update(pack.NODE_CLASS_MAPPINGS)
    ui = json.loads((ROOT / "workflows" / "unhype_flux.json").read_text())
    api = json.loads((ROOT / "workflows" / "unhype_flux_api.json").read_text())
    assert ui_to_api(ui, nodes.NODE_CLASS_MAPPINGS) == \
        {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert json.loads((ROOT / "example_workflows" / "unhype_flux.json").read_text()) == ui
    sampler = next(v for v in api.values() if v["class_type"] == "KSampler")
    assert sampler["inputs"]["cfg"] == 1.0  # guidance-distilled: one pass
    assert api[sampler["inputs"]["positive"][0]]["class_type"] == "UnHypeApply"
    assert api[sampler["inputs"]["model"][0]]["class_type"] == "UnHypeApply"
    apply_node = api[sampler["inputs"]["positive"][0]]
    assert api[apply_node["inputs"]["conditioning"][0]]["class_type"] == "UnHypeTextEncode"
    assert api["2"]["inputs"]["type"] == "flux"

    # run it on a tiny FLUX (context width of the tiny CLIP) with a 16-channel TAESD
    model = tiny_flux_model_with(context_in_dim=768)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    _randomize(taesd, 3)
    vae = comfy.sd.VAE(sd=taesd.state_dict())
    prompt = json.loads(json.dumps(api))
    for node in prompt.values():
        node.pop("_meta", None)
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if cls == "KSampler":
            inputs.update(steps=2)
        if cls == "UnHypeLoader":
            shutil.copy(flux_loaded.path, comfy_dirs["unhype"] / inputs["hypernetwork"])
    monkeypatch.setattr(nodes.UNETLoader, "load_unet", lambda self, *a, **k: (model,))
    monkeypatch.setattr(nodes.DualCLIPLoader, "load_clip",
                        lambda self, *a, **k: (tiny_parts["clip"],))
    monkeypatch.setattr(nodes.VAELoader, "load_vae", lambda self, *a, **k: (vae,))
    for kind, name in (("diffusion_models", "flux1-dev.safetensors"),
                       ("text_encoders", "t5xxl_fp16.safetensors"),
                       ("text_encoders", "clip_l.safetensors"), ("vae", "ae.safetensors")):
        folder = comfy_dirs["checkpoints"].parent / kind
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"")
        monkeypatch.setitem(__import__("folder_paths").folder_names_and_paths, kind,
                            ([str(folder)], {".safetensors"}))
    calls = []
    original = comfy_apply.UnHypeWrapper.__call__

    def counting(self, apply_model, args):
        calls.append((list(args["cond_or_uncond"]), self.calls))
        out = original(self, apply_model, args)
        calls[-1] = (calls[-1][0], self.calls - calls[-1][1])
        return out

    monkeypatch.setattr(comfy_apply.UnHypeWrapper, "__call__", counting)
    before = weights(model)
    valid = validate(prompt)
    assert valid[0], valid[1:]
    executor = execution.PromptExecutor(StubServer())
    executor.execute(prompt, "test-flux", {}, valid[2])
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success, errors
    assert calls == [([0], 1), ([0], 1)]  # cfg 1: one conditional pass per step, LoRA on
    assert list(comfy_dirs["output"].glob("UnHype_flux_*.png"))
    assert_untouched(model, before)


def test_full_size_flux_dev_targets_resolve_in_comfys_model_on_meta(pack, tmp_path):
    """The real FLUX.1-dev ComfyUI model (meta device, the unet_config comfy.model_detection
    gives it): family detected, all 95 targets found by ComfyUI's key map as (fused key, row
    slice) and by the hooks, with the right shapes."""
    import comfy.supported_models

    from unhype.comfy_apply import build_plan
    from unhype.dynamic_lora import resolve_modules
    from unhype.families import get_family
    from unhype.fileformat import load_hypernet, save_hypernet
    from unhype.hypernet import HyperNetConfig, build_hypernet

    dev = {**TINY_FLUX, "in_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
           "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
           "depth_single_blocks": 38, "axes_dim": [16, 56, 56]}
    base = comfy.supported_models.Flux(dev).get_model({}, device="meta")

    class Patcher:  # the parts of a ModelPatcher the checks read
        model = base

    fam = get_family("flux")
    targets = [t.as_dict() for t in fam.targets()]
    net = build_hypernet(HyperNetConfig(variant="shared", targets=targets, embed_dim=768, rank=1,
                                        hidden=8, head_hidden=4))
    loaded = load_hypernet(save_hypernet(tmp_path / "f.safetensors", net, "flux"))
    glue = pack.nodes.glue
    assert glue.model_family(Patcher) == "flux"
    glue.check_model(Patcher, loaded)
    cond = [[torch.zeros(1, 4, 4096), {"pooled_output": torch.zeros(1, 768)}]]
    plan = build_plan(loaded, cond, 1.0)
    keys = glue.resolve_keys(Patcher, plan)
    assert len(keys) == len(targets) == 95
    assert keys["lora_transformer_single_transformer_blocks_37_attn_to_v"] == \
        ("diffusion_model.single_blocks.37.linear1.weight", (0, 6144, 3072))
    assert len(resolve_modules(base.diffusion_model, plan.paths, plan.dims)) == 95


def test_comfy_hooks_path_matches_per_row_on_flux(pack, flux_model, flux_wide):
    glue = pack.nodes.glue
    if glue.comfy_hooks() is None:
        pytest.skip("this ComfyUI has no comfy/hooks.py")
    model = flux_model
    before = weights(model)
    c = cond(8)
    per_row, _, _ = apply(pack, model, c, flux_wide)
    hooked, hooked_cond, info = apply(pack, model, c, flux_wide,
                                      mode="comfy hooks (positive only)")
    assert "hooks" in info
    want = sample(per_row, c, c, steps=2)
    got = sample(hooked, hooked_cond, c, steps=2)
    assert (want - sample(model, c, c, steps=2)).abs().max() > 1e-5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_untouched(model, before)


def test_bake_node_writes_both_flux_forms_and_comfy_loads_them(pack, flux_model, flux_wide,
                                                               loaded, comfy_dirs, caplog):
    import comfy.utils

    node = pack.nodes.definitions.UnHypeBakeLoRA()
    c = cond(9)
    before = weights(flux_model)
    results = {}
    for fmt in ("kohya", "kohya_bfl"):
        path = node.bake(flux_wide, c, f"flux {fmt}", 1.0, True, "a cat", fmt)["result"][0]
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
        prefix = "lora_transformer_" if fmt == "kohya" else "lora_unet_"
        assert all(k.startswith(prefix) for k in tensors)
        dropped, patches, added, got = comfy_lora_patched_weights(flux_model, tensors, caplog)
        assert not dropped and len(added) == len(patches)
        results[fmt] = got
    for k in before:  # the two forms patch the model identically
        torch.testing.assert_close(results["kohya"][k], results["kohya_bfl"][k],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(UnHypeError, match="kohya_bfl format is for FLUX"):
        node.bake(loaded, [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]],
                  "sd bfl", 1.0, True, "", "kohya_bfl")
    assert not (comfy_dirs["loras"] / "sd_bfl.safetensors").exists()


def test_text_encode_windows_skip_t5_and_keep_the_pooled_vectors(pack, tmp_path):
    """On FLUX's text encoder (clip_l + t5xxl) a window needs only CLIP-L's pooled vector: its
    T5 stream is cut to one token. The node's conditioning is still CLIP Text Encode's (all
    T5 states), and each stored window equals the full encode's pooled output."""
    import tiny
    from unhype.comfy_apply import WINDOWS_KEY
    from unhype.prompt_windows import prompt_windows

    clip = tiny.tiny_flux_clip(tmp_path)
    seen = []
    t5 = clip.cond_stage_model.t5xxl
    original = t5.encode_token_weights

    def counting(token_weight_pairs):
        seen.append(sum(len(chunk) for chunk in token_weight_pairs))
        return original(token_weight_pairs)

    t5.encode_token_weights = counting
    text = "masterpiece, best quality, " * 20 + "a photo of a cat"
    windows = prompt_windows(text)
    with torch.no_grad():
        (cond,) = pack.nodes.definitions.UnHypeTextEncode().encode(clip, text)
        assert seen[0] >= 256 and seen[1:] == [1] * len(windows)
        ref = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        full = torch.cat([clip.encode_from_tokens(clip.tokenize(w), return_pooled=True)[1]
                          for w in windows])
    assert torch.equal(cond[0][0], ref[0][0])
    assert torch.equal(cond[0][1]["pooled_output"], ref[0][1]["pooled_output"])
    torch.testing.assert_close(cond[0][1][WINDOWS_KEY], full.float(), rtol=0, atol=0)


def test_also_read_text_reads_clip_text_encode_fluxs_t5_text(pack, tmp_path):
    """CLIP Text Encode Flux (ComfyUI's own node) pools only its clip_l text: a concept named in
    the t5xxl text alone is read through UnHype Also Read Text, by CLIP-L, with the T5 stream
    cut to one token."""
    import tiny
    from comfy_extras.nodes_flux import CLIPTextEncodeFlux
    from unhype.comfy_apply import WINDOWS_KEY

    clip = tiny.tiny_flux_clip(tmp_path)
    with torch.no_grad():
        (cond,) = CLIPTextEncodeFlux.execute(clip, "photo, high quality", "a photo of a cat",
                                             3.5).args
        (read,) = pack.nodes.definitions.UnHypeAlsoReadText().add(cond, clip,
                                                                  "a photo of a cat")
        cat = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)[1]
    assert read[0][1]["guidance"] == 3.5 and torch.equal(read[0][0], cond[0][0])
    torch.testing.assert_close(read[0][1][WINDOWS_KEY], cat.float(), rtol=0, atol=0)
    assert not torch.equal(cond[0][1]["pooled_output"], cat)  # the clip_l text's, not the cat


def test_prompts_sharing_a_t5_text_get_their_own_clip_l_loras(pack, flux_model, flux_wide,
                                                              tmp_path, monkeypatch):
    """Two CLIP Text Encode Flux entries with the same t5xxl text and different clip_l texts
    have the same cross-attention tensor; the pooled vector (what the hypernetwork reads, and
    what ComfyUI passes the model as ``y``) tells them apart: each row gets its own LoRA."""
    import nodes as comfy_nodes
    import tiny
    from comfy_extras.nodes_flux import CLIPTextEncodeFlux
    from unhype import comfy_apply

    clip = tiny.tiny_flux_clip(tmp_path)
    with torch.no_grad():
        dog = CLIPTextEncodeFlux.execute(clip, "a dog", "a character in a park", 3.5).args[0]
        mouse = CLIPTextEncodeFlux.execute(clip, "a mouse", "a character in a park", 3.5).args[0]
    both = comfy_nodes.ConditioningCombine().combine(dog, mouse)[0]
    assert torch.equal(both[0][0], both[1][0])  # the same T5 states
    assert not torch.equal(both[0][1]["pooled_output"], both[1][1]["pooled_output"])
    seen, real = [], comfy_apply.row_map
    monkeypatch.setattr(comfy_apply, "row_map",
                        lambda *a, **k: (lambda r: seen.append(r.tolist()) or r)(real(*a, **k)))
    patched, conditioning, _ = apply(pack, flux_model, both, flux_wide)
    sample(patched, conditioning, conditioning, steps=1)
    assert seen and all(sorted(rows) == [0, 1] for rows in seen), seen
