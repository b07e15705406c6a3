"""UnHype Apply's merge and comfy-hooks paths on a model loaded as ComfyUI-GGUF loads one.

ComfyUI-GGUF's own GGMLOps layers hold real Q8_0 GGUF tensors (its GGMLTensor, quantised by the
``gguf`` package) under its GGUFModelPatcher, which patches a quantised weight by attaching the
patches to it and applying them each time the layer dequantises it. UnHype's merge and
comfy-hooks paths hand their LoRA to that machinery; here the result must equal the dequantised
model with the same LoRA, and the GGUF tensors must be unchanged and unpatched afterwards.

Needs ComfyUI-GGUF (``COMFYUI_GGUF_PATH``, e.g. from ``github:city96/ComfyUI-GGUF``) and the
``gguf`` package; skipped without them, as in CI.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from test_apply import apply, sample

GGUF_PATH = os.environ.get("COMFYUI_GGUF_PATH")
pytestmark = pytest.mark.skipif(not GGUF_PATH, reason="set COMFYUI_GGUF_PATH to a ComfyUI-GGUF "
                                                      "checkout to run these")
MERGE = "merge into weights (both branches)"
HOOKS = "comfy hooks (positive only)"


@pytest.fixture(scope="module")
def comfyui_gguf(pack):
    """The ComfyUI-GGUF node pack, imported as ComfyUI imports a custom node package."""
    pytest.importorskip("gguf")
    name = "comfyui_gguf_under_test"
    spec = importlib.util.spec_from_file_location(name, Path(GGUF_PATH) / "__init__.py",
                                                  submodule_search_locations=[GGUF_PATH])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def gguf_and_dequantised(comfyui_gguf):
    """(the tiny model in ComfyUI-GGUF's layers, Q8_0 in every transformer block's linear
    layers, under a GGUFModelPatcher; an fp32 twin holding the dequantised weights)."""
    import comfy.model_management
    import comfy.supported_models
    import gguf

    import tiny

    ops_module = sys.modules[comfyui_gguf.__name__ + ".ops"]
    nodes_module = sys.modules[comfyui_gguf.__name__ + ".nodes"]
    reference = tiny.tiny_model()
    plain = reference.model.diffusion_model.state_dict()
    stored, dequantised = {}, {}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for key, value in plain.items():
        if value.ndim == 2 and "transformer_blocks" in key and key.endswith(".weight"):
            data = torch.from_numpy(gguf.quants.quantize(value.float().numpy(), q8))
            stored[key] = ops_module.GGMLTensor(data, tensor_type=q8, tensor_shape=value.shape)
            dequantised[key] = torch.from_numpy(
                gguf.quants.dequantize(data.numpy(), q8)).reshape(value.shape)
        else:
            stored[key] = ops_module.GGMLTensor(
                value.clone(), tensor_type=gguf.GGMLQuantizationType.F32, tensor_shape=value.shape)
            dequantised[key] = value
    config = comfy.supported_models.SD15(dict(tiny.TINY_UNET))
    config.custom_operations = ops_module.GGMLOps()  # as UnetLoaderGGUF passes them
    base = config.get_model({})
    base.load_model_weights(stored, "")
    model = nodes_module.GGUFModelPatcher(base, load_device=torch.device("cpu"),
                                          offload_device=torch.device("cpu"))
    reference.model.diffusion_model.load_state_dict(dequantised)
    to_k = base.diffusion_model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn2.to_k")
    assert to_k.weight.dtype == torch.uint8 and tuple(to_k.weight.tensor_shape) == (32, 768)
    return model, reference


def stored(model) -> dict:
    """The parameters' stored data (GGMLTensor.clone returns the tensor itself)."""
    return {n: p.data.as_subclass(torch.Tensor).clone()
            for n, p in model.model.named_parameters()}


def test_gguf_model_gets_the_merged_lora_through_its_own_patching(pack, comfyui_gguf, loaded,
                                                                  prompts):
    model, twin = gguf_and_dequantised(comfyui_gguf)
    before = stored(model)
    pos, neg = prompts["a photo of a cat"], prompts["blurry, low quality"]
    patched, cond, info = apply(pack, model, pos, loaded, mode=MERGE)
    assert "quantised (NF4 / GGUF)" in info  # Apply says it hands the LoRA to the loader
    twin_patched, twin_cond, _ = apply(pack, twin, pos, loaded, mode=MERGE)
    ref = sample(twin, pos, neg, steps=2)
    want = sample(twin_patched, twin_cond, neg, steps=2)
    got = sample(patched, cond, neg, steps=2)
    base = sample(model, pos, neg, steps=2)
    # dequantising per call and the fp32 twin differ by float rounding alone (1e-5 per UNet
    # call, ~5e-4 after two CFG 5 steps); the LoRA moves the sample by far more
    assert (want - ref).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)
    import comfy.model_management

    comfy.model_management.unload_all_models()
    after = stored(model)  # the GGUF bytes, unchanged, and no patch left attached
    assert all(torch.equal(after[k], v) for k, v in before.items())
    left = [n for n, p in model.model.named_parameters() if getattr(p, "patches", [])]
    assert not left, f"patches left on {left[:3]}"
    torch.testing.assert_close(sample(model, pos, neg, steps=2), base, rtol=0, atol=0)


def test_comfy_hooks_on_gguf_weights_are_refused_before_sampling(pack, comfyui_gguf, loaded,
                                                                 prompts):
    """ComfyUI's hook patching writes into the stored tensor: on GGUF's packed bytes that is a
    shape error in the middle of sampling. Apply refuses it up front and changes nothing."""
    from unhype.errors import UnHypeError

    if pack.nodes.glue.comfy_hooks() is None:
        pytest.skip("this ComfyUI has no comfy/hooks.py")
    model, _ = gguf_and_dequantised(comfyui_gguf)
    before = stored(model)
    pos = prompts["a photo of a cat"]
    with pytest.raises(UnHypeError, match="target layers are stored quantised .* hooks cannot"):
        apply(pack, model, pos, loaded, mode=HOOKS)
    assert all(torch.equal(stored(model)[k], v) for k, v in before.items())
    assert "hooks" not in pos[0][1]
