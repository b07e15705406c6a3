"""FLUX in Forge: the extension on a BFL-layout FLUX transformer called as Forge calls it.

The stand-in transformer (bfl_flux.py) must first give diffusers' FluxTransformer2DModel's
velocity from the same weights. Each row of a generation is then compared with the diffusers
twin whose weights have that row's prompt LoRA merged at the file's own (diffusers) target
paths: the reference never goes through UnHype's BFL map of fused q|k|v slices.
"""

from __future__ import annotations

import copy

import pytest
import torch

from unhype.errors import UnHypeError
from unhype.fileformat import host_paths, load_hypernet, save_hypernet
from unhype.hypernet import delta_weight
from unhype.model_check import detect_family, weight_shape
from unhype.prompt_tags import plain_text

pytestmark = pytest.mark.needs_unet  # the CLIP tokenizer files come from ComfyUI's copy
torch.set_num_threads(1)
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture
def script(webui_dirs):
    from modules import scripts

    loader = str(ROOT / "scripts" / "unhype_a1111.py")
    return scripts.load_extension_scripts(str(ROOT), [loader])[0]()


@pytest.fixture(scope="module")
def forge_flux():
    import fake_models

    return fake_models.ForgeFlux()


def flux_file(folder, reference, name="erase_flux", preset="attn_all"):
    """attn_all: every q/k/v slice of the fused qkv / linear1 layers is a target."""
    from tests.helpers import hypernet_for

    net = hypernet_for(reference, family="flux", rank=2, hidden=16, perturb=0.05,
                       preset=preset)
    path = folder / f"{name}.safetensors"
    save_hypernet(path, net, "flux", concepts=[{"target": "cat", "anchor": ""}])
    return path


def merged_reference(model, path, text, strength=1.0, loaded=None):
    """The diffusers twin with the LoRA of `text` merged at the file's diffusers paths (from
    `loaded` when given: a file whose network a test replaced)."""
    loaded = loaded or load_hypernet(path)
    ref = copy.deepcopy(model.reference)
    emb = model.pooled([plain_text(text)])[0]
    with torch.no_grad():
        factors = loaded.hypernet(emb.reshape(1, -1))
        for target in loaded.meta.config.targets:
            a, b = factors[target.name]
            ref.get_submodule(target.path).weight += strength * delta_weight(a[0], b[0])
    return ref


def run(sd_model, script, prompts, args=(True, "erase_flux", 1.0, True), **kw):
    from modules.processing import StableDiffusionProcessingTxt2Img, process_images

    p = StableDiffusionProcessingTxt2Img(sd_model=sd_model, prompt=list(prompts),
                                         batch_size=len(prompts), negative_prompt="ugly",
                                         layout="forge", scripts=[(script, list(args))], **kw)
    return p, process_images(p)


def check_rows(p, model, expected, refs, atol=2e-5):
    """expected(call, row) -> key into refs (None: the base diffusers twin). Returns the
    largest change a LoRA made to any row."""
    import bfl_flux

    assert p.unet_calls, "the sampler never called the transformer"
    worst = 0.0
    for c, (x, t, cond, out) in enumerate(p.unet_calls):
        keys = [expected(c, r) for r in range(x.shape[0])]
        args = (x, t, cond["crossattn"], cond["vector"], cond["guidance"])
        with torch.no_grad():
            outs = {None: bfl_flux.diffusers_call(model.reference, *args)}
            for key in set(keys) - {None}:
                outs[key] = bfl_flux.diffusers_call(refs[key], *args)
        for r, key in enumerate(keys):
            worst = max(worst, float((outs[key][r] - outs[None][r]).abs().max()))
            torch.testing.assert_close(out[r], outs[key][r], atol=atol, rtol=1e-4,
                                       msg=f"call {c} row {r} expected {key}")
    return worst


def hooks_left(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_stand_in_is_diffusers_flux_in_bfl_layout(forge_flux):
    import bfl_flux

    transformer = forge_flux.unet_for_sampling()
    assert detect_family(transformer) == "flux"
    assert transformer.single_blocks[0].linear1.weight.shape == (3 * 32 + 128, 32)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 9, 32, generator=gen)
    y, t, g = torch.randn(2, 768, generator=gen), torch.tensor([0.9, 0.2]), torch.tensor([3.5, 1.])
    with torch.no_grad():
        ours = transformer(x, t, context=ctx, y=y, guidance=g)
        theirs = bfl_flux.diffusers_call(forge_flux.reference, x, t, ctx, y, g)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert float(ours.abs().mean()) > 0.1


@pytest.mark.parametrize("preset, cond_only", [("attn_all", True), ("paper", False)])
def test_forge_flux_each_row_gets_its_prompts_lora(webui_dirs, script, forge_flux, preset,
                                                   cond_only):
    path = flux_file(webui_dirs["unhype"], forge_flux.reference, preset=preset)
    prompts = ["a photo of a cat", "a red (car) at night"]
    p, _ = run(forge_flux, script, prompts, args=(True, "erase_flux", 1.0, cond_only))
    transformer = forge_flux.unet_for_sampling()
    assert hooks_left(transformer) == 0
    refs = {t: merged_reference(forge_flux, path, t) for t in prompts}
    n = len(prompts)  # forge layout: uncond rows first, then one cond row per prompt

    def expected(call, row):
        if row < n:
            return prompts[row] if not cond_only else None
        return prompts[row - n]
    worst = check_rows(p, forge_flux, expected, refs)
    assert worst > 1e-3, "the LoRA changed nothing: the check would pass without UnHype"
    assert p.extra_generation_params["UnHype"].startswith("erase_flux [")


def test_forge_flux_at_cfg_1_runs_the_cond_rows_alone(webui_dirs, script, forge_flux):
    """FLUX.1-dev's usual setting: CFG scale 1, the distilled guidance only; Forge then skips
    the unconditional rows, and every row of each call is a prompt's."""
    path = flux_file(webui_dirs["unhype"], forge_flux.reference)
    prompts = ["a photo of a cat", "a dog on grass"]
    p, _ = run(forge_flux, script, prompts, cfg_scale=1.0)
    assert all(x.shape[0] == len(prompts) for x, *_ in p.unet_calls)
    refs = {t: merged_reference(forge_flux, path, t) for t in prompts}
    assert check_rows(p, forge_flux, lambda call, row: prompts[row], refs) > 1e-3
    assert hooks_left(forge_flux.unet_for_sampling()) == 0


def test_forge_flux_prompt_with_break_is_also_read_whole(webui_dirs, script, forge_flux):
    """Forge's CLIP-L engine ends a chunk at BREAK and FLUX's vector is the first chunk's
    pooled output; the prompt is also read without BREAK and keeps the stronger update (with a
    concept-selective network, the whole prompt's, which names the cat)."""
    from tests.helpers import gate_between
    from unhype_webui import files

    path = flux_file(webui_dirs["unhype"], forge_flux.reference)
    loaded = files.load(str(path))  # the instance the extension uses (its cache)
    prompt = "masterpiece, best quality BREAK a photo of a cat"
    # the first chunk alone would get almost nothing
    whole, first = gate_between(loaded, forge_flux.pooled, plain_text(prompt),
                                "masterpiece, best quality", "a photo of a cat")
    p, _ = run(forge_flux, script, [prompt], cfg_scale=1.0)
    refs = {"whole": merged_reference(forge_flux, path, prompt, loaded=loaded)}
    assert check_rows(p, forge_flux, lambda call, row: "whole", refs) > 1e-4


def test_forge_flux_long_prompt_reads_windows_without_t5(webui_dirs, script, forge_flux,
                                                         monkeypatch):
    """A concept named after CLIP-L's first 75 tokens: the prompt's word windows are read for
    their vector from Forge's CLIP-L engine alone (the T5 engine, the costly half, encodes only
    the host's own conditioning), and the row gets the window that names the cat."""
    from tests.helpers import gate_between
    from unhype.prompt_windows import prompt_windows
    from unhype_webui import files

    path = flux_file(webui_dirs["unhype"], forge_flux.reference)
    loaded = files.load(str(path))  # the instance the extension uses (its cache)
    long = "masterpiece, best quality, " * 20 + "a photo of a cat"
    windows = prompt_windows(long)
    best, truncated = gate_between(loaded, forge_flux.pooled, windows[-1], long,
                                   "a photo of a cat")
    t5_texts = []
    t5 = forge_flux.text_processing_engine_t5
    monkeypatch.setattr(forge_flux, "text_processing_engine_t5",
                        lambda texts: t5_texts.extend(texts) or t5(texts))
    p, _ = run(forge_flux, script, [long], cfg_scale=1.0)
    assert set(t5_texts) <= {long, "ugly"}  # the prompt and the negative, never a window
    ref = copy.deepcopy(forge_flux.reference)
    with torch.no_grad():
        factors = loaded.hypernet(best.reshape(1, -1))
        for target in loaded.meta.config.targets:
            a, b = factors[target.name]
            ref.get_submodule(target.path).weight += delta_weight(a[0], b[0])
    assert check_rows(p, forge_flux, lambda call, row: "best", {"best": ref}) > 1e-4


def test_forge_flux_strength_and_prompt_tag(webui_dirs, script, forge_flux):
    path = flux_file(webui_dirs["unhype"], forge_flux.reference)
    prompts = ["a cat on a sofa <unhype:erase_flux:0.5>", "a dog on a sofa"]
    p, _ = run(forge_flux, script, prompts, args=(False, None, 1.0, True))
    shown = [plain_text(x) for x in p.prompts]
    refs = {shown[0]: merged_reference(forge_flux, path, shown[0], strength=0.5)}

    def expected(call, row):
        return shown[0] if row == 2 else None  # only the tagged prompt's cond row
    assert check_rows(p, forge_flux, expected, refs) > 1e-4


def test_family_mismatch_in_both_directions(webui_dirs, script, forge_flux):
    import fake_models
    from tests.helpers import hypernet_for

    flux_file(webui_dirs["unhype"], forge_flux.reference)
    sd1 = fake_models.A1111SD1()
    with pytest.raises(UnHypeError, match="erase_flux is for flux, but the loaded model is "
                                          "sd1.*FLUX models run in Forge"):
        run(sd1, script, ["a cat"])
    assert hooks_left(sd1.model.diffusion_model) == 0

    net = hypernet_for(fake_models.tiny_diffusers_twin(), family="sd1", rank=1, hidden=8)
    save_hypernet(webui_dirs["unhype"] / "erase_cat.safetensors", net, "sd1",
                  concepts=[{"target": "cat"}])
    with pytest.raises(UnHypeError, match="erase_cat is for sd1, but the loaded model is flux"):
        run(forge_flux, script, ["a cat"], args=(True, "erase_cat", 1.0, True))
    assert hooks_left(forge_flux.unet_for_sampling()) == 0


def test_tab_probe_and_bake_on_forge_flux(webui_dirs, forge_flux):
    from safetensors.torch import load_file
    from unhype_webui import host, tab_logic

    path = flux_file(webui_dirs["unhype"], forge_flux.reference)
    texts = ["a cat", "a dog"]
    torch.testing.assert_close(host.pooled_embeddings(forge_flux, "flux", texts),
                               forge_flux.pooled(texts))
    table, status = tab_logic.probe_ui("erase_flux", "cat\na car", sd_model=forge_flux)
    assert table[0][0] == "cat" and table[0][4] == pytest.approx(1.0)
    assert "prompt(s) switch it on" in status

    msg = tab_logic.bake_ui("erase_flux", "a (cat)", 0.5, "baked_flux", sd_model=forge_flux)
    assert "baked_flux.safetensors" in msg
    lora = load_file(str(webui_dirs["lora"] / "baked_flux.safetensors"))
    loaded = load_hypernet(path)
    with torch.no_grad():
        factors = loaded.hypernet(forge_flux.pooled(["a cat"]))
    # sd-scripts' fused BFL names, which every Forge reads (older ones lack lora_transformer_*)
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
               for k in lora)
    for name, hp in host_paths(loaded.meta, "ldm").items():
        key = "lora_unet_" + hp.path.replace(".", "_")
        fused = lora[f"{key}.lora_up.weight"] @ lora[f"{key}.lora_down.weight"]
        rows = slice(*hp.out_slice) if hp.out_slice else slice(None)
        a, b = factors[name]
        torch.testing.assert_close(fused[rows], 0.5 * delta_weight(a[0], b[0]),
                                   rtol=1e-5, atol=1e-6)

    no_vector = copy.copy(forge_flux)  # and no CLIP-L engine to read the vector from instead
    no_vector.text_processing_engine_l = None
    no_vector.get_learned_conditioning = lambda t: {"crossattn": torch.zeros(1, 4, 32)}
    with pytest.raises(UnHypeError, match="FLUX model's conditioning has no 'vector'"):
        host.pooled_embeddings(no_vector, "flux", texts)


# --- Forge's low-bit FLUX models: NF4 ("flux1-dev-bnb-nf4"), GGUF, fp8 -----------------------
# img_attn.qkv's data as stored
STORED = {"nf4": ((96 * 32 // 2, 1), torch.uint8), "gguf_q8_0": ((96, 34), torch.uint8),
          "fp8": ((96, 32), torch.float8_e4m3fn)}


@pytest.mark.parametrize("kind", sorted(STORED))
def test_forge_quantised_flux_rows_equal_the_dequantized_model_plus_lora(webui_dirs, script,
                                                                         kind):
    from tests.quantised_layers import LAYERS, quantise_linears

    pytest.importorskip(LAYERS[kind][0])
    import fake_models

    from unhype.fileformat import host_paths

    model = fake_models.ForgeFlux()
    transformer = model.unet_for_sampling()
    plain = quantise_linears(transformer, kind, lambda path: "blocks" in path)
    qkv = transformer.double_blocks[0].img_attn.qkv.weight
    assert (tuple(qkv.data.shape), qkv.dtype) == STORED[kind]
    assert weight_shape(qkv) == (96, 32)

    path = flux_file(webui_dirs["unhype"], model.reference)
    prompts = ["a photo of a cat"]
    p, _ = run(model, script, prompts)
    assert hooks_left(transformer) == 0
    loaded = load_hypernet(path)
    ref = copy.deepcopy(plain)  # the LoRA merged in BFL names (the map the tests above check)
    with torch.no_grad():
        factors = loaded.hypernet(model.pooled(prompts))
        for name, hp in host_paths(loaded.meta, "ldm").items():
            a, b = factors[name]
            rows = slice(*hp.out_slice) if hp.out_slice else slice(None)
            ref.get_submodule(hp.path).weight[rows] += delta_weight(a[0], b[0])
    worst = 0.0
    for x, t, cond, out in p.unet_calls:
        kw = {"context": cond["crossattn"], "y": cond["vector"], "guidance": cond["guidance"]}
        with torch.no_grad():
            base, lora = plain(x, t, **kw), ref(x, t, **kw)
        torch.testing.assert_close(out[:1], base[:1], atol=1e-4, rtol=1e-4)  # uncond row
        torch.testing.assert_close(out[1:], lora[1:], atol=1e-4, rtol=1e-4)
        worst = max(worst, float((lora[1:] - base[1:]).abs().max()))
    assert worst > 1e-3


def test_chroma_is_not_taken_for_flux(webui_dirs, script, forge_flux, monkeypatch):
    """Chroma has FLUX's blocks but reads no pooled CLIP vector (Forge backend/nn/chroma.py: no
    vector_in; its conditioning is T5's alone): a FLUX file is refused as on any model UnHype
    does not know (the family rule, whose 'Generate without UnHype' setting then applies), not
    with a missing-'vector' error mid-generation."""
    flux_file(webui_dirs["unhype"], forge_flux.reference)
    transformer = forge_flux.unet_for_sampling()
    monkeypatch.delattr(transformer, "vector_in")
    assert detect_family(transformer) == "unknown"
    with pytest.raises(UnHypeError, match="not a Stable Diffusion 1.x/2.x/XL UNet or FLUX"):
        run(forge_flux, script, ["a cat"])
    assert hooks_left(transformer) == 0
