"""UnHype Apply on a ComfyUI model whose weights are stored in float8 (UNETLoader's fp8 weight
dtypes: the usual FLUX / SDXL set-up on 24 GB cards and below), on the CPU with fp32 compute."""

from __future__ import annotations

import pytest
import torch

from test_apply import (apply, assert_untouched, base_forward, cond_uncond_call, factors_for,
                        weights)

FP8 = torch.float8_e4m3fn
MERGE = "merge into weights (both branches)"


@pytest.fixture(scope="module")
def fp8_models():
    """The tiny model stored in fp8, and an fp32 model holding exactly its weights upcast."""
    import tiny

    stored = tiny.tiny_model(weight_dtype=FP8)
    upcast = tiny.tiny_model()
    state = stored.model.diffusion_model.state_dict()
    upcast.model.diffusion_model.load_state_dict({k: v.float() for k, v in state.items()})
    return stored, upcast


def test_per_row_on_fp8_weights_adds_the_update_at_full_precision(pack, fp8_models, loaded,
                                                                  prompts):
    stored, upcast = fp8_models
    assert {v.dtype for v in stored.model.diffusion_model.state_dict().values()} == {FP8}
    before = weights(stored)
    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    call, cond_chunk, uncond_chunk, info = cond_uncond_call(pack, stored, pos, neg, loaded)
    assert "per-row" in info and "stored in" not in info
    flags = call["cond_or_uncond"]
    out = call["output"].chunk(2)
    assert torch.isfinite(call["output"]).all()
    assert torch.equal(out[uncond_chunk], base_forward(stored, call).chunk(2)[uncond_chunk])
    # the positive row: exactly what the fp32 model with the same (fp8-valued) weights gives
    rows = [0 if f == 0 else -1 for f in flags]
    expected = base_forward(upcast, call, rows, factors_for(loaded, pos), 1.0, loaded).chunk(2)
    torch.testing.assert_close(out[cond_chunk], expected[cond_chunk], rtol=1e-5, atol=1e-5)
    assert (out[cond_chunk] - base_forward(stored, call).chunk(2)[cond_chunk]).abs().max() > 1e-3
    assert_untouched(stored, before)


def merged_gap(model, pos, loaded, pack):
    """|merged output - per-row output| / |per-row effect| on one forward, and Apply's info."""
    import comfy.model_management

    per_row, _, _ = apply(pack, model, pos, loaded)
    merged, _, info = apply(pack, model, pos, loaded, mode=MERGE)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), \
        torch.tensor([3.0]), pos[0][0]
    args = {"input": x, "timestep": t, "c": {"c_crossattn": ctx, "transformer_options": {}},
            "cond_or_uncond": [0]}
    with torch.no_grad():
        base = model.model.apply_model(x, t, c_crossattn=ctx)
        want = per_row.model_options["model_function_wrapper"](model.model.apply_model, args)
        comfy.model_management.load_models_gpu([merged])
        got = merged.model.apply_model(x, t, c_crossattn=ctx)
        comfy.model_management.unload_all_models()
    return float((got - want).norm() / (want - base).norm()), info


def test_merge_into_fp8_weights_says_how_much_of_the_update_it_loses(pack, fp8_models, loaded,
                                                                      prompts):
    import re

    stored, upcast = fp8_models
    before = weights(stored)
    pos = prompts["a photo of a cat"]
    gap_fp8, info = merged_gap(stored, pos, loaded, pack)
    gap_fp32, info_fp32 = merged_gap(upcast, pos, loaded, pack)
    said = re.search(r"stored in float8_e4m3fn: writing the update into them loses about "
                     r"(\d+)% of it \(first prompt, 32 layers\)", info)
    assert said and int(said.group(1)) >= 1, info
    assert "stored in" not in info_fp32
    if "comfy hooks (positive only)" in pack.nodes.glue.available_modes():  # ComfyUI 2024-12+
        _, _, hooks_info = apply(pack, stored, pos, loaded, mode="comfy hooks (positive only)")
        assert said.group(0) in hooks_info  # ComfyUI's hooks patch the same weights
    # the loss is real in ComfyUI's own merge: far above the fp32 model's float noise
    assert gap_fp32 < 1e-4 and gap_fp8 > 100 * gap_fp32
    assert_untouched(stored, before)


def test_rounding_note_measures_the_row_written_not_a_floored_first_one(pack, fp8_models,
                                                                        loaded, prompts):
    """With the first prompt under the gate floor, the note measures the prompt whose update
    is written into the weights (merge's strongest row; the hooks' note as well)."""
    from test_row_kinds import gated_on_cat

    stored, _ = fp8_models
    gated = gated_on_cat(loaded, prompts)
    pos = prompts["a red car on a road"] + prompts["a photo of a cat"]
    for mode in pack.nodes.glue.available_modes()[2:]:  # merge, and comfy hooks where present
        _, _, info = apply(pack, stored, pos, gated, mode=mode)
        assert "of it (prompt row 2, 32 layers)" in info, (mode, info)


def test_merge_rounding_loss_on_known_tensors():
    from unhype.comfy_apply import merge_rounding_loss

    w = torch.full((4, 4), 1.0)
    d = torch.full((4, 4), 0.01)
    assert merge_rounding_loss([(w, d)]) < 1e-5  # fp32 keeps it
    # e4m3 holds 1.0 and 1.125 next to each other: +0.01 rounds back to 1.0, all of it lost
    assert merge_rounding_loss([(w.to(FP8), d)]) == pytest.approx(1.0)
    # bf16 has 2**-7 = 0.0078 steps at 1.0: 1.01 is stored as 1.0078, 22% of the update lost
    assert merge_rounding_loss([(w.to(torch.bfloat16), d)]) == pytest.approx(0.21875, rel=1e-3)
