"""The extension inside a (stand-in) A1111 / Forge generation, on a real ldm-layout UNet.

Every UNet call made while sampling is recorded; each row's output is then recomputed with a
copy of the UNet whose weights have that row's prompt LoRA merged (W + s * B A^T), or with the
base UNet for rows that must run it (unconditional rows). Rows must agree to float precision.
"""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch

from unhype.errors import UnHypeError
from unhype.fileformat import host_paths, load_hypernet, save_hypernet
from unhype.hypernet import delta_weight
from unhype.prompt_tags import plain_text

pytestmark = pytest.mark.needs_unet
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


# --- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1():
    import fake_models

    return fake_models.A1111SD1()


@pytest.fixture(scope="module")
def sd1_net():
    import fake_models
    from tests.helpers import hypernet_for

    return hypernet_for(fake_models.tiny_diffusers_twin(), family="sd1", rank=2, hidden=16,
                        perturb=0.05)


@pytest.fixture
def hyper_file(webui_dirs, sd1_net):
    path = webui_dirs["unhype"] / "erase_cat.safetensors"
    save_hypernet(path, sd1_net, "sd1", concepts=[{"target": "cat", "anchor": ""}])
    return path


@pytest.fixture
def script(webui_dirs):
    from modules import scripts

    loaded = scripts.load_extension_scripts(str(ROOT), [str(ROOT / "scripts" / "unhype_a1111.py")])
    return loaded[0]()


def hooks_left(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def run(sd_model, script, prompts, args=(True, "erase_cat", 1.0, True), **kw):
    from modules.processing import StableDiffusionProcessingTxt2Img, process_images

    p = StableDiffusionProcessingTxt2Img(sd_model=sd_model, prompt=list(prompts),
                                         batch_size=len(prompts), negative_prompt="ugly",
                                         scripts=[(script, list(args))], **kw)
    return p, process_images(p)


def merged(unet, loaded, emb, strength):
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        factors = loaded.hypernet(emb.reshape(1, -1))
        for name, hp in host_paths(loaded.meta, "ldm").items():
            a, b = factors[name]
            ref.get_submodule(hp.path).weight += strength * delta_weight(a[0], b[0])
    return ref


def check_rows(p, unet, expected, refs):
    """expected(call_index, row) -> key into refs (None: base UNet). Returns the largest
    change the LoRA made to any row (so a test can insist it is not nothing)."""
    assert p.unet_calls, "the sampler never called the UNet"
    worst_lora = 0.0
    for c, (x, t, ctx, out) in enumerate(p.unet_calls):
        kw = {"context": ctx} if not isinstance(ctx, dict) else \
            {"context": ctx["crossattn"], "y": ctx["vector"]}
        keys = [expected(c, r) for r in range(x.shape[0])]
        with torch.no_grad():
            outs = {None: unet(x, t, **kw)}
            for key in set(keys) - {None}:
                outs[key] = refs[key](x, t, **kw)
        for r, key in enumerate(keys):
            want = outs[key][r]
            worst_lora = max(worst_lora, float((want - outs[None][r]).abs().max()))
            torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-4,
                                       msg=f"call {c} row {r} expected {key}")
    return worst_lora


def refs_for(sd_model, unet, path, texts, strength=1.0):
    loaded = load_hypernet(path)
    return {t: merged(unet, loaded, sd_model.pooled([plain_text(t)])[0], strength)
            for t in texts}


# --- loading ---------------------------------------------------------------------------
@pytest.mark.parametrize("root, loader", [(".", "scripts/unhype_a1111.py"),
                                          ("a1111_extension", "a1111_extension/scripts/unhype_script.py")])
def test_loader_registers_script_callbacks_and_tag_again_after_reload(webui_dirs, root, loader):
    from modules import extra_networks, script_callbacks, scripts

    for _ in range(2):  # "Reload UI": callbacks cleared, script files run again
        found = scripts.load_extension_scripts(str((ROOT / root).resolve()), [str(ROOT / loader)])
        assert [c.__name__ for c in found] == ["UnHypeScript"]
        kinds = {k for k, v in script_callbacks.callback_map.items() if v}
        assert {"callbacks_before_ui", "callbacks_ui_tabs", "callbacks_ui_settings",
                "callbacks_model_loaded"} <= kinds
        assert "unhype" in extra_networks.extra_network_registry
    s = found[0]()
    assert s.title() == "UnHype" and s.show(False) is scripts.AlwaysVisible
    assert sys.modules["unhype_webui.script"].UnHypeScript is found[0]


# --- per-row application ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["a1111", "a1111_split", "forge"])
def test_each_prompt_gets_its_own_lora_on_cond_rows_only(sd1, hyper_file, script, layout):
    prompts = ["a photo of a cat", "a (red:1.2) car on a road"]
    unet = sd1.model.diffusion_model
    p, res = run(sd1, script, prompts, layout=layout)
    refs = refs_for(sd1, unet, hyper_file, prompts)
    n = len(prompts)

    def expected(c, r):
        if layout == "forge":  # one call, uncond rows first
            return None if r < n else prompts[r - n]
        if layout == "a1111_split":  # two calls per step of batch_size rows each
            r += (c % 2) * n
        return prompts[r] if r < n else None

    assert check_rows(p, unet, expected, refs) > 1e-3  # the LoRA really changes the output
    assert hooks_left(unet) == 0
    assert p.extra_generation_params["UnHype"].startswith("erase_cat [")
    assert p.extra_generation_params["UnHype strength"] == "1"
    assert len(p.unhype_state.sessions) == 1 and p.unhype_state.sessions[0].calls == len(p.unet_calls)
    assert "sample" not in p.__dict__  # the wrapper is gone after postprocess


def test_a_generation_keeps_only_its_current_session(sd1, hyper_file, script, monkeypatch):
    """Batch count 4: p.sample runs four times, each with its own session; a removed session
    lets go of its factors and rows at once (each iteration's were held until the end)."""
    from modules.processing import StableDiffusionProcessingTxt2Img, process_images

    from unhype_webui import runner

    held, real = [], runner.use_session

    def spy(p, session):  # what the sessions of this generation hold at each switch
        real(p, session)
        held.append(sum(len(s.factors) + len(s.bank._entries) for s in p.unhype_state.sessions))
    monkeypatch.setattr(runner, "use_session", spy)

    p = StableDiffusionProcessingTxt2Img(
        sd_model=sd1, prompt=["a photo of a cat", "a red car"] * 4, batch_size=2, n_iter=4,
        negative_prompt="ugly", scripts=[(script, [True, "erase_cat", 1.0, False])])
    res = process_images(p)
    assert len(res.images) == 8 and hooks_left(sd1.model.diffusion_model) == 0
    sessions = p.unhype_state.sessions
    assert len(sessions) == 4 and held == [3, 0] * 4  # 1 file's factors + 2 rows, then none
    assert all(not s.factors and not s.bank._entries and not s.bank._on and not s.bank._latents
               for s in sessions)


def test_apply_to_all_rows_gives_uncond_rows_their_items_lora(sd1, hyper_file, script):
    prompts = ["a cat", "a dog"]
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, prompts, args=(True, "erase_cat", 0.8, False))
    refs = refs_for(sd1, unet, hyper_file, prompts, 0.8)
    check_rows(p, unet, lambda c, r: prompts[r % 2], refs)
    assert p.extra_generation_params["UnHype cond only"] == "False"


def test_and_parts_and_prompt_editing_use_each_rows_own_text(sd1, hyper_file, script):
    prompts = ["a cat AND a red car", "[(cat:1.3):dog:1] photo"]
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, prompts, layout="a1111_split", steps=3)
    texts = ["a cat", "a red car", "(cat:1.3) photo", "dog photo"]
    refs = refs_for(sd1, unet, hyper_file, texts)
    # a1111 layout: 3 cond rows (item 0 has two AND parts) + 2 uncond, in chunks of 2 rows
    layout = lambda step: ["a cat", "a red car", "(cat:1.3) photo" if step <= 1 else "dog photo",  # noqa
                           None, None]
    check_rows(p, unet, lambda c, r: layout(c // 3)[(c % 3) * 2 + r], refs)


def test_and_parts_weighted_below_zero_run_the_base_model(sd1, hyper_file, script):
    # "a dog AND a cat :-0.8" steers away from a cat: that part is negative guidance, which
    # runs the base model as the negative prompt does (erasing it undid the user's "avoid")
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, ["a dog AND a cat :-0.8"], steps=1)
    refs = refs_for(sd1, unet, hyper_file, ["a dog"])
    assert check_rows(p, unet, lambda c, r: ["a dog", None, None][r], refs) > 1e-3


def test_tags_apply_to_the_prompts_that_carry_them(sd1, hyper_file, script):
    prompts = ["a cat <unhype:erase_cat:0.5>", "a cat"]
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, prompts, args=(False, None, 1.0, True))
    refs = refs_for(sd1, unet, hyper_file, ["a cat"], 0.5)
    # identical text in both items: the rows cannot be told apart, both get the tag's LoRA
    check_rows(p, unet, lambda c, r: "a cat" if r < 2 else None, refs)
    p, _ = run(sd1, script, ["a cat <unhype:erase_cat:0.5>", "a dog"], args=(False, None, 1, True))
    check_rows(p, unet, lambda c, r: "a cat" if r == 0 else None, refs)
    assert p.extra_generation_params["UnHype hashes"].startswith("erase_cat: ")
    assert [t.strength for t in p.unhype_tags] == [0.5]


def test_a_tag_of_the_panels_file_replaces_the_panel_for_its_prompt(sd1, hyper_file, script):
    # the panel's file at 1.0, and the same file tagged at 0.5 in the first prompt: that
    # prompt gets 0.5 (before: both, 1.5), the other prompt the panel's 1.0
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, ["a cat <unhype:erase_cat:0.5>", "a dog"])
    refs = {**refs_for(sd1, unet, hyper_file, ["a cat"], 0.5),
            **refs_for(sd1, unet, hyper_file, ["a dog"], 1.0)}
    assert check_rows(p, unet, lambda c, r: ["a cat", "a dog", None, None][r], refs) > 1e-3


def test_hires_pass_uses_the_hires_prompt(sd1, hyper_file, script):
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, ["a cat"], enable_hr=True, hr_prompt="a dog", steps=2)
    refs = refs_for(sd1, unet, hyper_file, ["a cat", "a dog"])
    check_rows(p, unet, lambda c, r: None if r else ("a cat" if c < 2 else "a dog"), refs)


def test_hires_prompt_with_a_text_encoder_lora_is_still_erased(webui_dirs, sd1_net, script):
    """The web UI activates the hires prompt's extra networks inside sample_hr_pass, then makes
    the hires conds: a text-encoder LoRA there changes the conds, so the hires session must
    be built after them (before, its rows matched no known cond and ran the base model)."""
    import fake_models
    from modules import extra_networks

    model = fake_models.A1111SD1(text=fake_models.TinyTextModel(seed=3))
    text, unet = model.cond_stage_model.wrapped.transformer, model.model.diffusion_model
    delta = 0.05 * torch.randn(text.proj.weight.shape, generator=torch.Generator().manual_seed(0))

    class TextEncoderLora(extra_networks.ExtraNetwork):  # as the built-in Lora's TE half
        on = False

        def activate(self, p, params_list):
            if bool(params_list) != self.on:
                with torch.no_grad():
                    text.proj.weight.add_(delta if params_list else -delta)
                self.on = bool(params_list)

        def deactivate(self, p):
            pass

    path = webui_dirs["unhype"] / "erase_cat.safetensors"
    save_hypernet(path, sd1_net, "sd1", concepts=[{"target": "cat", "anchor": ""}])
    te_lora = TextEncoderLora("telora")
    extra_networks.register_extra_network(te_lora)
    try:
        base = model.pooled(["a cat"])[0]
        te_lora.activate(None, ["x"])
        with_lora = model.pooled(["a cat"])[0]
        before = model.get_learned_conditioning(["a cat"])
        te_lora.activate(None, [])
        assert (before - model.get_learned_conditioning(["a cat"])).norm() / before.norm() > 0.05
        p, _ = run(model, script, ["a cat"], enable_hr=True, hr_prompt="a cat <telora:1>",
                   steps=2)
    finally:
        te_lora.activate(None, [])
        extra_networks.extra_network_registry.pop("telora")
    loaded = load_hypernet(path)
    refs = {"first": merged(unet, loaded, base, 1.0), "hires": merged(unet, loaded, with_lora, 1.0)}
    # check_rows re-runs each call's rows on the UNet alone: the conds are in the record
    assert check_rows(p, unet, lambda c, r: None if r else ("first" if c < 2 else "hires"),
                      refs) > 1e-3
    assert hooks_left(unet) == 0


def test_hires_pass_erased_when_the_web_ui_makes_its_conds_elsewhere(sd1, hyper_file, script):
    # a web UI whose sample_hr_pass does not go through p.calculate_hr_conds: the session built
    # at the start of the pass applies (it used to be the only one)
    from modules.processing import StableDiffusionProcessingTxt2Img, process_images

    class CondsElsewhere(StableDiffusionProcessingTxt2Img):
        def sample_hr_pass(self, *args, **kwargs):
            self.is_hr_pass = True
            StableDiffusionProcessingTxt2Img.calculate_hr_conds(self)  # not the instance's
            return self._run(args[0], self.hr_c, self.hr_uc, self._hr_steps)

    unet = sd1.model.diffusion_model
    p = CondsElsewhere(sd_model=sd1, prompt=["a cat"], batch_size=1, negative_prompt="ugly",
                       scripts=[(script, [True, "erase_cat", 1.0, True])], enable_hr=True,
                       hr_prompt="a dog", steps=2)
    process_images(p)
    refs = refs_for(sd1, unet, hyper_file, ["a cat", "a dog"])
    assert check_rows(p, unet, lambda c, r: None if r else ("a cat" if c < 2 else "a dog"),
                      refs) > 1e-3
    assert hooks_left(unet) == 0


def calls(p, a, b):
    from types import SimpleNamespace

    return SimpleNamespace(unet_calls=p.unet_calls[a:b])


@pytest.mark.parametrize("same_unet", [False, True], ids=["new_unet", "weights_in_place"])
def test_hires_pass_on_its_own_checkpoint_runs_unhype_from_that_model(sd1, hyper_file, script,
                                                                     same_unet):
    """A1111 / Forge load the hires checkpoint before sample_hr_pass: a new UNet (Forge, or
    A1111 keeping several models), or new weights in the same modules (A1111 with one model
    kept). Either way the hires rows get the LoRA from the hires model's own text encoder, on
    the hires UNet; before, they ran without UnHype."""
    import fake_models

    unet = sd1.model.diffusion_model
    hr_unet = unet if same_unet else fake_models.tiny_ldm_unet(seed=5)
    hr_model = fake_models.A1111SD1(unet=hr_unet, text=fake_models.TinyTextModel(seed=7))
    p, _ = run(sd1, script, ["a cat"], enable_hr=True, hr_prompt="a dog", steps=2,
               hr_checkpoint_name="other_sd15.safetensors", hr_sd_model=hr_model)
    first = refs_for(sd1, unet, hyper_file, ["a cat"])
    hires = refs_for(hr_model, hr_unet, hyper_file, ["a dog"])
    assert check_rows(calls(p, 0, 2), unet, lambda c, r: None if r else "a cat", first) > 1e-3
    assert check_rows(calls(p, 2, 4), hr_unet, lambda c, r: None if r else "a dog",
                      hires) > 1e-3
    assert hooks_left(unet) == 0 and hooks_left(hr_unet) == 0
    assert [s.unet for s in p.unhype_state.sessions] == [unet, hr_unet]
    assert not any("without UnHype" in c for c in p.comments)
    assert "sample_hr_pass" not in p.__dict__


def test_hires_checkpoint_in_forge_and_a_failure_in_the_hires_pass(sd1, hyper_file, script):
    import fake_models

    forge = fake_models.ForgeSD1(unet=sd1.model.diffusion_model,
                                 text=sd1.cond_stage_model.wrapped.transformer)
    hr_forge = fake_models.ForgeSD1(unet=fake_models.tiny_ldm_unet(seed=5),
                                    text=fake_models.TinyTextModel(seed=7))
    unet, hr_unet = forge.unet_for_sampling(), hr_forge.unet_for_sampling()
    kw = dict(enable_hr=True, hr_prompt="a dog", steps=2, layout="forge",
              hr_checkpoint_name="other_sd15.safetensors", hr_sd_model=hr_forge)
    p, _ = run(forge, script, ["a cat"], **kw)
    hires = refs_for(hr_forge, hr_unet, hyper_file, ["a dog"])
    assert check_rows(calls(p, 2, 4), hr_unet, lambda c, r: "a dog" if r else None,
                      hires) > 1e-3  # Forge: the uncond row first
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(forge, script, ["a cat"], fail_at_call=3, **kw)
    assert hooks_left(unet) == 0 and hooks_left(hr_unet) == 0


@pytest.mark.parametrize("switch", ["hires", "refiner"])
def test_switch_to_another_family_stops_or_runs_without_unhype(sd1, hyper_file, script, switch):
    """Found at the switch (no checkpoint file to read in advance): the steps before it ran."""
    from modules import shared

    import fake_models

    unet, xl = sd1.model.diffusion_model, fake_models.A1111SDXL()
    name = f"xl_{switch}.safetensors"
    kw, first_calls = (dict(enable_hr=True, hr_prompt="a dog", hr_checkpoint_name=name,
                            hr_sd_model=xl), 2) if switch == "hires" else \
        (dict(refiner_checkpoint=name, refiner_switch_at=0.5, refiner_sd_model=xl), 1)
    label = f"[{switch} checkpoint {name}]"
    with pytest.raises(UnHypeError, match=r"loaded model is sdxl.*" + re.escape(label)):
        run(sd1, script, ["a cat"], steps=2, **kw)
    assert hooks_left(unet) == 0 and hooks_left(xl.model.diffusion_model) == 0
    shared.opts.unhype_on_family_mismatch = "Generate without UnHype"
    p, _ = run(sd1, script, ["a cat"], steps=2, **kw)
    first = refs_for(sd1, unet, hyper_file, ["a cat"])
    assert check_rows(calls(p, 0, first_calls), unet, lambda c, r: None if r else "a cat",
                      first) > 1e-3
    check_rows(calls(p, first_calls, None), xl.model.diffusion_model, lambda c, r: None, {})
    assert any(label in c for c in p.comments)


def test_forge_objects_and_pooled_from_its_text_engine(hyper_file, script, sd1):
    import fake_models

    forge = fake_models.ForgeSD1(unet=sd1.model.diffusion_model,
                                 text=sd1.cond_stage_model.wrapped.transformer)
    unet = forge.forge_objects.unet.model.diffusion_model
    p, _ = run(forge, script, ["a cat", "a car"], layout="forge")
    refs = refs_for(forge, unet, hyper_file, ["a cat", "a car"])
    check_rows(p, unet, lambda c, r: None if r < 2 else ["a cat", "a car"][r - 2], refs)
    assert forge.text_processing_engine.return_pooled is False  # restored
    assert hooks_left(unet) == 0


def test_forge_unet_stored_in_fp8_gets_each_lora_at_full_precision(hyper_file, script, sd1):
    """A UNet whose weights are stored in fp8 and cast per layer (Forge's fp8 UNets): each row
    is what the fp32 UNet holding the same fp8-valued weights gives with its prompt's LoRA."""
    import fake_models

    fp8 = fake_models.tiny_ldm_unet(weight_dtype=torch.float8_e4m3fn)
    assert {p.dtype for p in fp8.parameters()} == {torch.float8_e4m3fn}
    upcast = fake_models.tiny_ldm_unet()
    upcast.load_state_dict({k: v.float() for k, v in fp8.state_dict().items()})
    before = {k: v.clone() for k, v in fp8.state_dict().items()}
    forge = fake_models.ForgeSD1(unet=fp8, text=sd1.cond_stage_model.wrapped.transformer)
    p, _ = run(forge, script, ["a cat", "a car"], layout="forge")
    refs = refs_for(forge, upcast, hyper_file, ["a cat", "a car"])
    worst = check_rows(p, upcast, lambda c, r: None if r < 2 else ["a cat", "a car"][r - 2],
                       refs)
    assert worst > 1e-3  # the LoRA did change the cond rows
    assert hooks_left(fp8) == 0
    assert all(torch.equal(v.view(torch.uint8), before[k].view(torch.uint8))
               for k, v in fp8.state_dict().items())


@pytest.fixture
def a1111_fp8(monkeypatch):
    """A1111's "FP8 weight" option with full-precision inference (--no-half): devices.fp8 on a
    GPU machine, so devices.autocast() is manual_cast(float32)."""
    from modules import devices

    monkeypatch.setattr(devices, "fp8", True)
    monkeypatch.setattr(devices, "device", torch.device("cuda"))  # only read, never used
    return devices


def test_a1111_fp8_weight_option_gets_each_lora_at_full_precision(hyper_file, script, sd1,
                                                                   a1111_fp8):
    """sd_models.load_model_weights with FP8 weight: every Linear / Conv2d of the UNet stored in
    float8_e4m3fn, cast by manual_cast during sampling. Each row must be what the fp32 UNet
    holding the same fp8-valued weights gives with its prompt's LoRA; the weights stay fp8."""
    import fake_models

    unet, upcast = fake_models.a1111_fp8_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    a1111 = fake_models.A1111SD1(unet=unet, text=sd1.cond_stage_model.wrapped.transformer)
    p, _ = run(a1111, script, ["a cat", "a car"])
    refs = refs_for(a1111, upcast, hyper_file, ["a cat", "a car"])
    worst = check_rows(p, upcast, lambda c, r: ["a cat", "a car"][r] if r < 2 else None, refs)
    assert worst > 1e-3
    assert hooks_left(unet) == 0 and not hasattr(torch.nn.Linear, "org_forward")
    assert all(v.dtype == before[k].dtype and
               torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                           before[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                           else before[k])
               for k, v in unet.state_dict().items())


def test_a1111_fp8_weight_option_on_the_cpu_runs_in_bf16_autocast(hyper_file, script, sd1,
                                                                   monkeypatch):
    """FP8 weight on a CPU machine: devices.autocast() is torch's bf16 CPU autocast. The LoRA is
    then added in bf16 too: each cond row is within bf16 rounding of the reference (fp8-valued
    weights + LoRA, same autocast), far below the LoRA's own effect; uncond rows are the base's."""
    import fake_models
    from modules import devices

    monkeypatch.setattr(devices, "fp8", True)
    unet, upcast = fake_models.a1111_fp8_unet()
    a1111 = fake_models.A1111SD1(unet=unet, text=sd1.cond_stage_model.wrapped.transformer)
    prompts = ["a cat", "a car"]
    p, _ = run(a1111, script, prompts)
    refs = refs_for(a1111, upcast, hyper_file, prompts)
    for x, t, ctx, out in p.unet_calls:
        assert out.dtype == torch.bfloat16
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            base = upcast(x, t, context=ctx).float()
            want = torch.stack([refs[q](x, t, context=ctx)[i] for i, q in enumerate(prompts)])
        effect = float((want.float() - base[:2]).abs().max())
        assert effect > 1e-3
        assert float((out[:2].float() - want.float()).abs().max()) < 0.2 * effect
        torch.testing.assert_close(out[2:].float(), base[2:], atol=0, rtol=0)
    assert hooks_left(unet) == 0


def test_sdxl_reads_clip_g_from_the_vector(webui_dirs, script):
    import fake_models
    from tests.helpers import hypernet_for

    sdxl = fake_models.A1111SDXL()
    net = hypernet_for(fake_models.tiny_diffusers_twin(2048), family="sdxl", rank=2, hidden=16,
                       perturb=0.05)
    path = webui_dirs["unhype"] / "xl.safetensors"
    save_hypernet(path, net, "sdxl", concepts=[{"target": "cat"}])
    unet = sdxl.model.diffusion_model
    p, _ = run(sdxl, script, ["a cat", "a car"], args=(True, "xl", 1.0, True))
    loaded = load_hypernet(path)
    refs = {t: merged(unet, loaded, sdxl.pooled([t])[0], 1.0) for t in ("a cat", "a car")}
    assert check_rows(p, unet, lambda c, r: ["a cat", "a car"][r] if r < 2 else None,
                      refs) > 1e-4


def test_sdxl_prompt_with_break_is_also_read_whole(webui_dirs, script):
    """A1111 / Forge end a chunk at BREAK, and SDXL's vector is the first chunk's pooled
    output: "score_9, masterpiece BREAK a photo of a cat" pools as "score_9, masterpiece". The
    prompt is also read without BREAK (as SD1 / SD2 prompts are) and keeps the stronger update:
    with a concept-selective network, the whole prompt's, which names the cat."""
    import fake_models
    from tests.helpers import gate_between, hypernet_for
    from unhype_webui import files

    sdxl = fake_models.A1111SDXL()
    net = hypernet_for(fake_models.tiny_diffusers_twin(2048), family="sdxl", rank=2, hidden=16,
                       perturb=0.05)
    path = webui_dirs["unhype"] / "xl.safetensors"
    save_hypernet(path, net, "sdxl", concepts=[{"target": "cat"}])
    loaded = files.load(str(path))  # the instance the extension uses (its cache)
    prompt = "score_9, masterpiece BREAK a photo of a cat"
    # the first chunk alone would get almost nothing
    whole, first = gate_between(loaded, sdxl.pooled, plain_text(prompt),
                                "score_9, masterpiece", "a photo of a cat")
    assert torch.equal(sdxl.get_learned_conditioning([prompt])["vector"][0, :1280], first)
    unet = sdxl.model.diffusion_model
    p, _ = run(sdxl, script, [prompt, "a red car"], args=(True, "xl", 1.0, True))
    refs = {"whole": merged(unet, loaded, whole, 1.0),
            "car": merged(unet, loaded, sdxl.pooled(["a red car"])[0], 1.0)}
    assert check_rows(p, unet, lambda c, r: ["whole", "car", None, None][r], refs) > 1e-4


# --- refusals and failures -------------------------------------------------------------
@pytest.fixture
def sdxl_file(webui_dirs):
    import fake_models
    from tests.helpers import hypernet_for

    net = hypernet_for(fake_models.tiny_diffusers_twin(2048), family="sdxl", rank=1, hidden=8)
    path = webui_dirs["unhype"] / "xl_file.safetensors"
    save_hypernet(path, net, "sdxl", concepts=[{"target": "cat"}])
    return path


def test_sdxl_file_on_sd1_model_is_refused_unless_settings_allow(sd1, sdxl_file, script):
    from modules import shared

    unet = sd1.model.diffusion_model
    with pytest.raises(UnHypeError, match=r"is for sdxl, but the loaded model is sd1"):
        run(sd1, script, ["a cat"], args=(True, "xl_file", 1.0, True))
    assert hooks_left(unet) == 0
    shared.opts.unhype_on_family_mismatch = "Generate without UnHype"
    p, res = run(sd1, script, ["a cat"], args=(True, "xl_file", 1.0, True))
    check_rows(p, unet, lambda c, r: None, {})
    assert any("is for sdxl" in c for c in p.comments)
    # the image's parameters do not claim an erasure that did not happen
    from modules import infotext_utils

    assert "UnHype" not in infotext_utils.parse_generation_parameters(res.infotexts[0])


def test_missing_file_and_bad_tag_stop_the_generation_with_a_message(sd1, hyper_file, script):
    with pytest.raises(UnHypeError, match="no hypernetwork named 'nope'"):
        run(sd1, script, ["a cat"], args=(True, "nope", 1.0, True))
    with pytest.raises(UnHypeError, match="not a number"):
        run(sd1, script, ["a cat <unhype:erase_cat:lots>"], args=(False, None, 1.0, True))
    with pytest.raises(UnHypeError, match="no hypernetwork is selected"):
        run(sd1, script, ["a cat"], args=(True, None, 1.0, True))



@pytest.mark.parametrize("args,needle", [
    (("false", "erase_cat", 1.0, True), None),  # API callers: "false" is off (bool() said on)
    (("maybe", "erase_cat", 1.0, True), "'enabled' must be true or false, got 'maybe'"),
    ((True, "erase_cat", 1.0, "nope"), "'cond only' must be true or false"),
    ((True, 7, 1.0, True), "'hypernetwork' must be a name, got 7")])
def test_api_script_arguments_are_read_strictly(sd1, hyper_file, script, args, needle):
    if needle is None:
        p, res = run(sd1, script, ["a cat"], args=args)
        assert "UnHype" not in res.infotexts[0]
        return
    with pytest.raises(UnHypeError, match=needle):
        run(sd1, script, ["a cat"], args=args)


def test_a_bare_name_two_subfolders_share_is_refused(sd1, hyper_file, script, webui_dirs):
    import shutil

    for sub in ("a", "b"):
        (webui_dirs["unhype"] / sub).mkdir()
        shutil.copy(hyper_file, webui_dirs["unhype"] / sub / "twin.safetensors")
    try:
        with pytest.raises(UnHypeError, match="'twin' names 2 hypernetworks.*a/twin, b/twin"):
            run(sd1, script, ["a cat <unhype:twin>"], args=(False, None, 1.0, True))
        p, res = run(sd1, script, ["a cat <unhype:b/twin>"], args=(False, None, 1.0, True))
        assert "b/twin" in res.infotexts[0]  # the subfolder names one of them
    finally:
        for sub in ("a", "b"):
            shutil.rmtree(webui_dirs["unhype"] / sub)


def test_an_unexpected_error_in_process_stops_the_generation(sd1, hyper_file, script,
                                                             monkeypatch):
    """The web UI only logs what a script's process raises (scripts.py L840-846) and goes on:
    an error there (a file that cannot be read to hash it, say) must not leave a generation
    that silently erases nothing; it stops at sampling with the cause."""
    from unhype import infotext

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(infotext, "short_hash", unreadable)
    with pytest.raises(UnHypeError, match="erase_cat: PermissionError"):
        run(sd1, script, ["a cat"])
    assert hooks_left(sd1.model.diffusion_model) == 0


@pytest.mark.parametrize("fail_at", [0, 1])
def test_nothing_stays_hooked_after_an_exception_in_sampling(sd1, hyper_file, script, fail_at):
    from unhype_webui import runner

    unet = sd1.model.diffusion_model
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(sd1, script, ["a cat"], fail_at_call=fail_at)
    assert hooks_left(unet) == 0
    assert runner.remove_all() == 0
    p, _ = run(sd1, script, ["a cat"])  # the next generation is normal
    refs = refs_for(sd1, unet, hyper_file, ["a cat"])
    check_rows(p, unet, lambda c, r: "a cat" if r == 0 else None, refs)


# --- infotext --------------------------------------------------------------------------
def test_infotext_round_trip_restores_the_panel(sd1, hyper_file, script):
    from modules import infotext_utils, script_callbacks

    from unhype_webui import files, runner

    p, res = run(sd1, script, ["a cat, on a mat"], args=(True, "erase_cat", 0.65, False))
    params = infotext_utils.parse_generation_parameters(res.infotexts[0])
    assert params["Prompt"].startswith("a cat, on a mat")
    values = runner.paste_values(params, files.list_files())
    assert values == {"enabled": True, "name": "erase_cat", "strength": 0.65, "cond_only": False}
    # the host's paste: on_infotext_pasted callbacks run, then each panel component reads the
    # key it is registered under (infotext_utils.connect_paste)
    script_callbacks.infotext_pasted_callback(res.infotexts[0], params)
    assert {k: params.get(name) for k, name in runner.PASTE_FIELDS.items()} == values
    hyper_file.rename(hyper_file.with_name("renamed.safetensors"))  # found again by hash
    assert runner.paste_values(params, files.list_files())["name"] == "renamed"
    # an unusable pasted strength leaves the slider as it is, the panel on; a hash alone finds
    # the file
    edited = {**params, "UnHype strength": "1e9"}
    assert runner.paste_values(edited, files.list_files()) == \
        {"enabled": True, "name": "renamed", "strength": None, "cond_only": False}
    hash_only = {**params, "UnHype": "[" + params["UnHype"].split("[")[1]}
    assert runner.paste_values(hash_only, files.list_files())["name"] == "renamed"
    p, res = run(sd1, script, ["a cat"], args=(False, None, 1.0, True))
    params = infotext_utils.parse_generation_parameters(res.infotexts[0])
    assert "UnHype" not in params
    assert runner.paste_values(params, files.list_files())["enabled"] is False


def test_pasted_tags_follow_their_file_by_hash(sd1, hyper_file, script, webui_dirs):
    # a tagged prompt pasted back after its file was renamed: the tag gets the new name from
    # "UnHype hashes" (as the built-in Lora does with "Lora hashes"), so it generates again
    from modules import infotext_utils, script_callbacks

    p, res = run(sd1, script, ["a cat <unhype:erase_cat:0.5>"], args=(False, None, 1.0, True),
                 enable_hr=True, hr_prompt="a dog <unhype:erase_cat>", steps=1)
    params = infotext_utils.parse_generation_parameters(res.infotexts[0])
    params.setdefault("Hires prompt", "a dog <unhype:erase_cat>")  # processing.py L1307
    (webui_dirs["unhype"] / "v2").mkdir()
    hyper_file.rename(webui_dirs["unhype"] / "v2" / "erase_cat_v2.safetensors")
    script_callbacks.infotext_pasted_callback(res.infotexts[0], params)
    assert params["Prompt"].startswith("a cat <unhype:v2/erase_cat_v2:0.5>")
    assert params["Hires prompt"].startswith("a dog <unhype:v2/erase_cat_v2>")
    p, _ = run(sd1, script, [params["Prompt"]], args=(False, None, 1.0, True), steps=1)
    assert [t.strength for t in p.unhype_tags] == [0.5]
    refs = refs_for(sd1, sd1.model.diffusion_model,
                    webui_dirs["unhype"] / "v2" / "erase_cat_v2.safetensors", ["a cat"], 0.5)
    check_rows(p, sd1.model.diffusion_model, lambda c, r: "a cat" if r == 0 else None, refs)


# --- tab and cards ---------------------------------------------------------------------
def test_tab_lists_probes_and_bakes(sd1, hyper_file, webui_dirs):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from unhype import infotext
    from unhype_webui import tab_logic

    rows = tab_logic.file_rows()
    assert rows[0][:3] == ["erase_cat", "sd1", "cat"]
    details = tab_logic.details_md("erase_cat")  # the summary ComfyUI's Inspect shows too
    assert "- concept: erase &#x27;cat&#x27; -&gt; anchor" in details
    assert "- gate floor: none" in details
    assert f"- sha256: {infotext.file_sha256(hyper_file)}" in details
    assert tab_logic.details_md("nope").startswith("**UnHype: no hypernetwork named")
    table, status = tab_logic.probe_ui("erase_cat", "cat\na car on a road", sd_model=sd1)
    assert table[0][0] == "cat" and table[0][2] == "cat" and table[0][4] == pytest.approx(1.0)
    assert "prompt(s) switch it on" in status
    msg = tab_logic.bake_ui("erase_cat", "a (cat:1.2)", 0.5, "baked", sd_model=sd1)
    assert "baked.safetensors" in msg
    lora = load_file(str(webui_dirs["lora"] / "baked.safetensors"))
    loaded = load_hypernet(hyper_file)
    with torch.no_grad():
        a, b = next(iter(loaded.hypernet(sd1.pooled(["a cat"])).values()))
    name = next(iter(loaded.hypernet.config.targets)).name
    torch.testing.assert_close(lora[f"{name}.lora_up.weight"], 0.5 * b[0])
    assert "**" in tab_logic.bake_ui("erase_cat", "", 1.0, "x", sd_model=sd1)
    # an existing file is kept unless the user says to replace it
    before = (webui_dirs["lora"] / "baked.safetensors").read_bytes()
    msg = tab_logic.bake_ui("erase_cat", "a dog", 1.0, "baked", sd_model=sd1)
    assert "exists" in msg and (webui_dirs["lora"] / "baked.safetensors").read_bytes() == before
    msg = tab_logic.bake_ui("erase_cat", "a dog", 1.0, "baked", True, sd_model=sd1)
    assert "saved" in msg and (webui_dirs["lora"] / "baked.safetensors").read_bytes() != before
    # what an API caller may send: a message each, nothing written
    assert "exists" in tab_logic.bake_ui("erase_cat", "a dog", 1.0, "baked", "false",
                                         sd_model=sd1)
    for args, needle in ((("erase_cat", "a cat", None, "x"), "strength must be a number"),
                         (("erase_cat", "a cat", "abc", "x"), "strength must be a number"),
                         (("erase_cat", 5, 1.0, "x"), "prompt must be a text"),
                         (("erase_cat", "a cat", 1.0, 5), "output name must be a text")):
        assert needle in tab_logic.bake_ui(*args, sd_model=sd1)
    assert "hypernetwork must be a text" in tab_logic.probe_ui(["x"], "a cat", sd_model=sd1)[1]
    before = set(webui_dirs["lora"].iterdir())
    msg = tab_logic.bake_ui("erase_cat", "a cat", 1.0, "..", sd_model=sd1)  # not a hidden file
    msg = tab_logic.bake_ui("erase_cat", "a cat", 1.0, "y" * 300, sd_model=sd1)
    made = sorted(p.name for p in set(webui_dirs["lora"].iterdir()) - before)
    assert made == sorted(["unhype_erase_cat_a_cat.safetensors", "y" * 120 + ".safetensors"])
    # the message and the LoRA's metadata say what the prompt fires; a prompt at 0.3 of the
    # file's reference is weak for it (the old tab noted only an exactly zero update)
    msg = tab_logic.bake_ui("erase_cat", "a cat", 1.0, "fires", sd_model=sd1)
    assert "(fires cat; nearest concept cat at cosine" in msg and "weak" not in msg
    meta = safe_open(str(webui_dirs["lora"] / "fires.safetensors"), "pt").metadata()
    assert "for prompt 'a cat': fires cat;" in meta["modelspec.description"]
    from unhype.fileformat import save_with_training
    from unhype.hypernet import delta_norm

    with torch.no_grad():
        norm = float(delta_norm(loaded.hypernet(sd1.pooled(["a cat"])))[0])
    weak = save_with_training(loaded, webui_dirs["unhype"] / "weak_cat.safetensors",
                              gate_reference=norm / 0.3, gate_floor=0.03)
    try:
        msg = tab_logic.bake_ui("weak_cat", "a cat", 1.0, "weak", sd_model=sd1)
    finally:
        weak.unlink()
    assert "**this LoRA is weak for this prompt (fires nothing; nearest concept cat at " \
           "cosine" in msg and "0.30 of cat&#x27;s reference, under the firing threshold 0.5" in msg


def test_extra_networks_card_inserts_the_tag_and_shows_metadata(hyper_file, script):
    from modules import script_callbacks, ui_extra_networks

    ui_extra_networks.pages.clear()
    script_callbacks.before_ui_callback()
    page = ui_extra_networks.pages[0]
    item = next(page.list_items())
    assert item["name"] == "erase_cat"
    assert item["prompt"] == '"<unhype:erase_cat:" + opts.extra_networks_default_multiplier + ">"'
    assert item["metadata"]["unhype.family"] == "sd1"


def test_refiner_steps_get_unhype_from_the_refiner_model(sd1, hyper_file, script):
    """apply_refiner loads the refiner checkpoint mid-sampling and calls p.setup_conds(): the
    steps after the switch get the LoRA from the refiner's own text encoder, on its UNet;
    before, they ran without UnHype (with a note)."""
    import fake_models

    unet = sd1.model.diffusion_model
    refiner = fake_models.A1111SD1(unet=fake_models.tiny_ldm_unet(seed=9),
                                   text=fake_models.TinyTextModel(seed=11))
    ref_unet = refiner.model.diffusion_model
    p, _ = run(sd1, script, ["a cat", "a car"], steps=4, refiner_checkpoint="fine_tune.safetensors",
               refiner_switch_at=0.5, refiner_sd_model=refiner)
    first = refs_for(sd1, unet, hyper_file, ["a cat", "a car"])
    after = refs_for(refiner, ref_unet, hyper_file, ["a cat", "a car"])
    rows = lambda c, r: ["a cat", "a car", None, None][r]  # noqa: E731
    assert check_rows(calls(p, 0, 2), unet, rows, first) > 1e-3
    assert check_rows(calls(p, 2, 4), ref_unet, rows, after) > 1e-3
    assert hooks_left(unet) == 0 and hooks_left(ref_unet) == 0
    assert [s.unet for s in p.unhype_state.sessions] == [unet, ref_unet]
    assert not p.comments and "setup_conds" not in p.__dict__


@pytest.mark.parametrize("switch", ["refiner", "hires"])
def test_a_switch_to_another_family_stops_before_the_first_step(sd1, hyper_file, script,
                                                                 tmp_path, switch):
    """The checkpoint's safetensors header says its family before sampling starts: an SDXL
    refiner under an SD1 file stops the generation with no step run; with the setting to go
    on, the note is there from the start (once, though the switch checks again)."""
    from types import SimpleNamespace

    from modules import shared
    from modules.processing import StableDiffusionProcessingTxt2Img, process_images
    from safetensors.torch import save_file

    import fake_models

    xl = fake_models.A1111SDXL(refiner=True)  # what the switch loads; its file:
    path = tmp_path / "sd_xl_refiner.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous()
               for k, v in xl.model.diffusion_model.state_dict().items()}, str(path))
    info = SimpleNamespace(filename=str(path))
    kw = dict(refiner_checkpoint="sd_xl_refiner.safetensors", refiner_switch_at=0.5,
              refiner_sd_model=xl, refiner_checkpoint_info=info) if switch == "refiner" else \
        dict(enable_hr=True, hr_prompt="a dog", hr_checkpoint_name="sd_xl_refiner.safetensors",
             hr_sd_model=xl, hr_checkpoint_info=info)
    label = f"[{switch} checkpoint sd_xl_refiner.safetensors]"
    p = StableDiffusionProcessingTxt2Img(sd_model=sd1, prompt=["a cat"], batch_size=1, steps=2,
                                         scripts=[(script, [True, "erase_cat", 1.0, True])], **kw)
    with pytest.raises(UnHypeError, match="not a Stable Diffusion.*" + re.escape(label)):
        process_images(p)
    assert p.unet_calls == [] and hooks_left(sd1.model.diffusion_model) == 0
    shared.opts.unhype_on_family_mismatch = "Generate without UnHype"
    p, _ = run(sd1, script, ["a cat"], steps=2, **kw)
    notes = [c for c in p.comments if label in c]
    assert len(notes) == 1 and "not a Stable Diffusion" in notes[0]


def test_a_long_prompt_gets_the_strongest_update_of_its_windows(sd1, hyper_file, script,
                                                                webui_dirs):
    """"cat" comes after the first 75 tokens, which are all the pooled embedding sees: the
    truncated prompt gets almost no update. The prompt is also read through its word windows
    (each embedded by the model's own encoder) and the row gets the strongest one's LoRA, the
    window that holds "a photo of a cat". A short prompt in the same batch is read as before."""
    from tests.helpers import ConceptGate
    from unhype.prompt_windows import prompt_windows
    from unhype_webui import files

    loaded = files.load(str(hyper_file))  # the instance the extension uses (its cache)
    loaded.hypernet = ConceptGate(loaded.hypernet, sd1.pooled(["a photo of a cat"])[0])
    long = "masterpiece, best quality, " * 20 + "a photo of a cat"
    texts = [plain_text(long)] + prompt_windows(plain_text(long))
    emb = sd1.pooled(texts)
    with torch.no_grad():
        f = loaded.generate(emb)
    norms = [sum(float(delta_weight(a[n], b[n]).pow(2).sum()) for a, b in f.values())
             for n in range(len(texts))]
    best = max(range(len(texts)), key=lambda n: norms[n])
    assert texts[best].endswith("a photo of a cat") and norms[best] > 10 * norms[0]
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, [long, "a red car"])
    refs = {"long": merged(unet, loaded, emb[best], 1.0),
            "car": merged(unet, loaded, sd1.pooled(["a red car"])[0], 1.0)}
    assert check_rows(p, unet, lambda c, r: ["long", "car", None, None][r], refs) > 1e-3
    # two tags (two strengths: two files to apply), each on its own prompt
    p, _ = run(sd1, script, [long + " <unhype:erase_cat:0.5>", "a red car <unhype:erase_cat:0.8>"],
               args=(False, None, 1.0, True))
    refs = {"long": merged(unet, loaded, emb[best], 0.5),
            "car": merged(unet, loaded, sd1.pooled(["a red car"])[0], 0.8)}
    check_rows(p, unet, lambda c, r: ["long", "car", None, None][r], refs)
    # the tab reads it the same way: Probe reports that update, Bake writes it
    from safetensors.torch import load_file

    from unhype_webui import tab_logic

    table, _ = tab_logic.probe_ui("erase_cat", long, sd_model=sd1)
    assert table[0][1] == pytest.approx(norms[best] ** 0.5, rel=1e-4)
    assert "baked_long" in tab_logic.bake_ui("erase_cat", long, 1.0, "baked_long", sd_model=sd1)
    lora = load_file(str(webui_dirs["lora"] / "baked_long.safetensors"))
    for name, (a, b) in f.items():
        torch.testing.assert_close(lora[f"{name}.lora_up.weight"], b[best], rtol=1e-5, atol=1e-6)


def test_a_long_prompt_naming_two_erased_concepts_far_apart_gets_both_updates(sd1, hyper_file,
                                                                              script, webui_dirs):
    """A file that erases a cat and a dog, a prompt that names the cat first and the dog after
    80 tokens of tags: no one reading holds both, so each concept's strongest reading is
    applied, summed (it used to get the stronger one only, and the other concept was drawn).
    The file's signatures (training["concept_embeddings"]) name the readings' concepts."""
    from tests.helpers import two_concepts
    from unhype.prompt_windows import prompt_windows
    from unhype_webui import files

    long = "a photo of a cat, " + "masterpiece, best quality, " * 20 + "a photo of a dog"
    windows = prompt_windows(plain_text(long))
    texts = [plain_text(long)] + windows
    holds = windows[:1] + windows  # the prompt's own embedding reads its first 75 tokens
    loaded = files.load(str(hyper_file))  # the instance the extension uses (its cache)
    file_concepts = loaded.meta.concepts
    emb = two_concepts(loaded, sd1.pooled, texts, {"cat": "a photo of a cat",
                                                    "dog": "a photo of a dog"}, holds=holds)
    with torch.no_grad():
        f = loaded.generate(emb)
    norms = [sum(float(delta_weight(a[n], b[n]).pow(2).sum()) for a, b in f.values())
             for n in range(len(texts))]
    cat = max((n for n, t in enumerate(holds) if "a photo of a cat" in t), key=norms.__getitem__)
    dog = max((n for n, t in enumerate(holds) if "a photo of a dog" in t), key=norms.__getitem__)
    assert not any("a photo of a cat" in t and "a photo of a dog" in t for t in holds)
    unet = sd1.model.diffusion_model
    both = copy.deepcopy(unet)
    with torch.no_grad():
        for name, hp in host_paths(loaded.meta, "ldm").items():
            a, b = f[name]
            both.get_submodule(hp.path).weight += delta_weight(a[cat], b[cat]) + \
                delta_weight(a[dog], b[dog])
    p, _ = run(sd1, script, [long])
    assert check_rows(p, unet, lambda c, r: ["both", None][r], {"both": both}) > 1e-3
    # the tab reads it the same way: Probe reports the summed update, Bake writes it
    from safetensors.torch import load_file

    from unhype_webui import tab_logic

    deltas = {name: delta_weight(a[cat], b[cat]) + delta_weight(a[dog], b[dog])
              for name, (a, b) in f.items()}
    table, _ = tab_logic.probe_ui("erase_cat", long, sd_model=sd1)
    assert table[0][1] == pytest.approx(
        sum(float(d.pow(2).sum()) for d in deltas.values()) ** 0.5, rel=1e-4)
    assert "baked_two" in tab_logic.bake_ui("erase_cat", long, 1.0, "baked_two", sd_model=sd1)
    lora = load_file(str(webui_dirs["lora"] / "baked_two.safetensors"))
    for name, d in deltas.items():
        torch.testing.assert_close(lora[f"{name}.lora_up.weight"] @
                                   lora[f"{name}.lora_down.weight"], d, rtol=1e-4, atol=1e-6)
    # without the signatures: the strongest reading only, as before
    del loaded.meta.training["concept_embeddings"]
    loaded.__dict__.pop("_signatures", None)  # made again from the file's (now none)
    one = max((cat, dog), key=norms.__getitem__)
    p, _ = run(sd1, script, [long])
    check_rows(p, unet, lambda c, r: ["one", None][r], {"one": merged(unet, loaded, emb[one], 1.0)})
    loaded.meta.concepts = file_concepts


def test_textual_inversion_in_the_prompt_gets_the_lora_of_its_vectors(sd1, hyper_file, script):
    import fake_models

    model = fake_models.A1111SD1(unet=sd1.model.diffusion_model)
    ccm = model.cond_stage_model
    ids = ccm.wrapped.tokenizer("tabby cat", add_special_tokens=False)["input_ids"]
    ccm.add_embedding("zorblax", ccm.wrapped.transformer.emb.wrapped.weight[ids].clone())
    unet = model.model.diffusion_model
    p, _ = run(model, script, ["a photo of (zorblax:1.1)", "a red car"])
    loaded = load_hypernet(hyper_file)
    refs = {"ti": merged(unet, loaded, model.pooled(["a photo of tabby cat"])[0], 1.0),
            "car": merged(unet, loaded, model.pooled(["a red car"])[0], 1.0)}
    assert check_rows(p, unet, lambda c, r: ["ti", "car", None, None][r], refs) > 1e-3
    assert hooks_left(unet) == 0 and ccm.hijack.fixes is None


def test_forge_hires_pass_on_a_reloaded_model_is_erased(sd1, hyper_file, script):
    """Forge reloads the same checkpoint as a new model object for the hires pass when its
    'Hires VAE / Text Encoder' differ from the first pass's (processing.py L1402-1419:
    forge_model_reload, then model_loaded_callback, which takes UnHype's hooks off). The hires
    pass still gets the LoRA, on the new UNet."""
    import copy
    from dataclasses import dataclass

    import fake_models
    from modules import processing, script_callbacks

    @dataclass(repr=False)
    class ForgeTxt2Img(processing.StableDiffusionProcessingTxt2Img):
        reloaded_model: object = None

        def sample(self, conditioning, unconditional_conditioning, seeds, subseeds,
                   subseed_strength, prompts):
            x = torch.randn(len(prompts), 4, 4, 4, generator=torch.Generator().manual_seed(0))
            x = self._run(x, conditioning, unconditional_conditioning, self.steps)
            self.sd_model = self.reloaded_model  # forge_model_reload(): a new model object
            script_callbacks.model_loaded_callback(self.sd_model)
            return self.sample_hr_pass(x, None, seeds, subseeds, subseed_strength, prompts)

    text = sd1.cond_stage_model.wrapped.transformer
    forge = fake_models.ForgeSD1(unet=sd1.model.diffusion_model, text=text)
    reloaded = fake_models.ForgeSD1(unet=copy.deepcopy(sd1.model.diffusion_model), text=text)
    p = ForgeTxt2Img(sd_model=forge, prompt=["a cat"], batch_size=1, negative_prompt="ugly",
                     scripts=[(script, [True, "erase_cat", 1.0, True])], layout="forge",
                     enable_hr=True, hr_prompt="a cat", steps=2,
                     hr_checkpoint_name="Use same checkpoint", reloaded_model=reloaded)
    processing.process_images(p)
    first_unet, hr_unet = forge.unet_for_sampling(), reloaded.unet_for_sampling()
    first = refs_for(forge, first_unet, hyper_file, ["a cat"])
    hires = refs_for(reloaded, hr_unet, hyper_file, ["a cat"])
    assert check_rows(calls(p, 0, 2), first_unet, lambda c, r: "a cat" if r else None,
                      first) > 1e-3
    assert check_rows(calls(p, 2, 4), hr_unet, lambda c, r: "a cat" if r else None,
                      hires) > 1e-3
    assert hooks_left(first_unet) == 0 and hooks_left(hr_unet) == 0



@pytest.mark.parametrize("case", ["hires_edit", "second_order"])
def test_prompt_edits_are_scheduled_as_the_web_ui_schedules_them(sd1, hyper_file, script, case):
    """The web UI schedules prompt editing over a sampler's model calls (twice the steps for a
    second-order sampler: processing.py L494-496) and a hires pass with (first pass's total
    steps, its own), so a ``when`` between 1 and 2 falls in the hires pass (L1584-1592,
    prompt_parser.py L59-73). UnHype reads the same texts: the rows after the switch get the
    LoRA of "a photo of a cat", not the base model."""
    unet = sd1.model.diffusion_model
    if case == "hires_edit":  # first pass 2 calls (dog), hires 4: steps 0-2 dog, 3 cat
        p, _ = run(sd1, script, ["a photo of a [dog:cat:1.5]"], steps=2, enable_hr=True,
                   hr_second_pass_steps=4)
        switch, n = 5, 6
    else:  # Heun: 2 steps are 4 model calls; the edit at 2 switches at the fourth
        p, _ = run(sd1, script, ["a photo of a [dog:cat:2]"], steps=2, sampler_name="Heun")
        switch, n = 3, 4
    assert len(p.unet_calls) == n
    refs = refs_for(sd1, unet, hyper_file, ["a photo of a dog", "a photo of a cat"])
    check_rows(calls(p, 0, switch), unet, lambda c, r: None if r else "a photo of a dog", refs)
    assert check_rows(calls(p, switch, n), unet,
                      lambda c, r: None if r else "a photo of a cat", refs) > 1e-3


@pytest.mark.parametrize("where", ["hires_prompt", "first_prompt"])
def test_a_tag_applies_to_the_pass_whose_prompt_carries_it(sd1, hyper_file, script, where):
    """The web UI activates the hires prompt's extra networks for the hires pass only and the
    first prompt's for the first pass (processing.py L952-955, L1512-1514, L1624-1633): so does
    an <unhype:...> tag, even where both passes' prompts read the same once the tag is gone."""
    unet = sd1.model.diffusion_model
    tag = " <unhype:erase_cat>"
    first, hires = ("a cat", "a cat" + tag) if where == "hires_prompt" else \
        ("a cat" + tag, "a cat")
    p, _ = run(sd1, script, [first], args=(False, None, 1.0, True), enable_hr=True,
               hr_prompt=hires, steps=2)
    assert len(p.unet_calls) == 4  # 2 first-pass calls, 2 hires
    refs = refs_for(sd1, unet, hyper_file, ["a cat"])
    tagged, plain = ((2, 4), (0, 2)) if where == "hires_prompt" else ((0, 2), (2, 4))
    assert check_rows(calls(p, *tagged), unet, lambda c, r: None if r else "a cat", refs) > 1e-3
    check_rows(calls(p, *plain), unet, lambda c, r: None, {})  # the base model
    assert p.extra_generation_params["UnHype hashes"].startswith("erase_cat: ")


def test_tags_of_both_passes_are_all_in_the_hashes(sd1, hyper_file, script, webui_dirs):
    import shutil

    shutil.copy(hyper_file, webui_dirs["unhype"] / "erase_dog.safetensors")
    p, _ = run(sd1, script, ["a cat <unhype:erase_cat>"], args=(False, None, 1.0, True),
               enable_hr=True, hr_prompt="a dog <unhype:erase_dog>", steps=2)
    hashes = p.extra_generation_params["UnHype hashes"]
    assert "erase_cat: " in hashes and "erase_dog: " in hashes


def test_uncond_rows_split_from_their_cond_rows_get_their_own_items_lora(sd1, hyper_file,
                                                                         script):
    """'Apply to conditional branch only' off, A1111 without batch_cond_uncond: the UNet is
    called on chunks of batch_size rows of [cond rows (one per AND part), uncond rows], so an
    uncond row can sit alone in a later call; it still gets its own item's LoRA (recognised by
    its latent, which CFG gives the item's cond rows too), not item 0's."""
    prompts = ["a cat AND a dog", "a car"]
    unet = sd1.model.diffusion_model
    p, _ = run(sd1, script, prompts, args=(True, "erase_cat", 1.0, False),
               layout="a1111_split", steps=1)
    refs = refs_for(sd1, unet, hyper_file, ["a cat", "a dog", "a car"])
    # calls of 2 rows: [c0 'a cat', c0 'a dog'], [c1 'a car', u0], [u1]
    want = [["a cat", "a dog"], ["a car", "a cat"], ["a car"]]
    assert len(p.unet_calls) == 3
    for c in range(3):
        check_rows(calls(p, c, c + 1), unet, lambda _c, r, c=c: want[c][r], refs)
