"""Memory options of the trainer (unhype/trainer/memory.py): fp8 base weights, text encoders on the CPU."""

import types

import numpy as np
import pytest
import torch

from tests.trainer.conftest import flux_cfg, inline_cfg, removal_gradient
from unhype.trainer import loop, memory
from unhype.trainer.config import resolve
from unhype.errors import UnHypeError
from unhype.fileformat import load_hypernet

FP8 = torch.float8_e4m3fn


def fp8_rounded_copy(run_fp8, run_full):
    """Give `run_full`'s denoiser the fp8 run's weights, upcast: the model fp8 storage computes."""
    stored = dict(run_fp8.backend.unet.named_parameters())
    with torch.no_grad():
        for name, p in run_full.backend.unet.named_parameters():
            p.copy_(stored[name].to(p.dtype))


def config_for(model, request):
    return request.getfixturevalue(model), flux_cfg if model == "tiny_flux" else inline_cfg


# one linear target layer, one norm-modulation layer (the model's skip list), one convolution
LAYERS = {"tiny_flux": ("transformer_blocks.0.attn.to_v.weight",
                        "transformer_blocks.0.norm1.linear.weight", None),
          "tiny_sdxl": ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
                        "down_blocks.0.attentions.0.norm.weight",
                        "down_blocks.0.resnets.0.conv1.weight")}


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl"])
def test_fp8_base_stores_linear_weights_in_fp8_and_trains_the_rounded_model(model, request,
                                                                          tmp_path):
    """The gradients with fp8 storage are those of the fp8-rounded model, not the original
    (fp32 compute: a convolution stored in fp8 failed here, "found Float8_e4m3fn")."""
    folder, make = config_for(model, request)
    runs = {name: loop.prepare(make(folder, tmp_path / name, mode="direct", **over), quiet=True)
            for name, over in (("full", {}), ("fp8", {"fp8_base": True}), ("rounded", {}))}
    denoiser = runs["fp8"].backend.unet
    dtypes = {name: p.dtype for name, p in denoiser.named_parameters()}
    linear, norm, conv = LAYERS[model]
    assert dtypes[linear] == FP8 and dtypes[norm] == torch.float32
    if conv:
        assert dtypes[conv] == torch.float32
    assert memory.weight_bytes(denoiser) < 0.6 * memory.weight_bytes(runs["full"].backend.unet)
    fp8_rounded_copy(runs["fp8"], runs["rounded"])
    grads = {name: removal_gradient(run) for name, run in runs.items()}
    torch.testing.assert_close(grads["fp8"], grads["rounded"], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(grads["fp8"], grads["full"], rtol=1e-3, atol=1e-9)
    cos = torch.nn.functional.cosine_similarity(grads["fp8"], grads["full"], dim=0)
    assert cos > 0.95  # rounding the weights to fp8 moves the gradient, it does not scramble it


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl"])
def test_fp8_base_with_gradient_checkpointing_gives_the_same_gradients(model, request, tmp_path):
    """bf16, as on a GPU (a convolution stored in fp8 broke the recomputation here)."""
    folder, make = config_for(model, request)
    grads = [removal_gradient(loop.prepare(make(
        folder, tmp_path / str(ck), mode="direct", fp8_base=True, gradient_checkpointing=ck,
        mixed_precision="bf16"), quiet=True)) for ck in (False, True)]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl"])
def test_training_with_both_options_in_bf16(model, request, tmp_path):
    folder, make = config_for(model, request)
    run = loop.prepare(make(folder, tmp_path, max_train_steps=3, mixed_precision="bf16",
                            fp8_base=True, cache_text_encoder_outputs=True), quiet=True)
    frozen = {n: p.clone() for n, p in run.backend.unet.named_parameters()}
    assert {p.dtype for p in frozen.values()} == {FP8, torch.bfloat16}
    assert run.backend.text_offloaded
    assert loop.train(run, progress=False) == 0
    assert np.isfinite(run.log[-1]["remove"])
    for name, p in run.backend.unet.named_parameters():  # frozen, and still stored in fp8
        assert p.dtype == frozen[name].dtype and torch.equal(p.float(), frozen[name].float())
    meta = load_hypernet(tmp_path / "erase.safetensors").meta
    assert meta.training["fp8_base"] is True
    assert meta.training["cache_text_encoder_outputs"] is True


def dequantised_copy(run_nf4, run_full):
    """Give `run_full`'s denoiser the NF4 run's weights, dequantised: the model NF4 computes."""
    from bitsandbytes.functional import dequantize_4bit

    quantised = dict(run_nf4.backend.unet.named_modules())
    with torch.no_grad():
        for name, module in run_full.backend.unet.named_modules():
            weight = getattr(quantised[name], "weight", None)
            if getattr(weight, "quant_state", None) is not None:
                module.weight.copy_(dequantize_4bit(weight, quant_state=weight.quant_state))


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sdxl"])
def test_nf4_base_trains_the_4bit_model(model, request, tmp_path):
    """--nf4_base: linear layers become bitsandbytes NF4 layers (norm / modulation layers and
    convolutions stay); the gradients are those of the model holding the dequantised weights."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    folder, make = config_for(model, request)
    runs = {name: loop.prepare(make(folder, tmp_path / name, mode="direct", **over), quiet=True)
            for name, over in (("full", {}), ("nf4", {"nf4_base": True}), ("rounded", {}))}
    modules = dict(runs["nf4"].backend.unet.named_modules())
    linear, norm, conv = (name.rsplit(".", 1)[0] if name else None for name in LAYERS[model])
    assert isinstance(modules[linear], bnb.nn.Linear4bit)
    assert type(modules[norm]) is not bnb.nn.Linear4bit
    if conv:
        assert isinstance(modules[conv], torch.nn.Conv2d)
    stored = memory.weight_bytes(runs["nf4"].backend.unet)
    assert stored < 0.6 * memory.weight_bytes(runs["full"].backend.unet)
    # the estimate the memory table uses for full-size models on the meta device
    assert stored == pytest.approx(memory.nf4_weight_bytes(runs["full"].backend.unet), rel=1e-2)
    # the trainer hooked the NF4 layers themselves (NF4 replaced them before the hooks came)
    assert modules[linear]._forward_hooks
    dequantised_copy(runs["nf4"], runs["rounded"])
    grads = {name: removal_gradient(run) for name, run in runs.items()}
    torch.testing.assert_close(grads["nf4"], grads["rounded"], rtol=1e-4, atol=1e-8)
    assert not torch.allclose(grads["nf4"], grads["full"], rtol=1e-3, atol=1e-9)


def test_nf4_training_in_bf16_with_the_encoders_offloaded(tiny_flux, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = loop.prepare(flux_cfg(tiny_flux, tmp_path, max_train_steps=3, mixed_precision="bf16",
                                nf4_base=True, cache_text_encoder_outputs=True,
                                gradient_checkpointing=True), quiet=True)
    frozen = {n: p.clone() for n, p in run.backend.unet.named_parameters()}
    assert torch.uint8 in {p.dtype for p in frozen.values()}
    assert loop.train(run, progress=False) == 0
    assert np.isfinite(run.log[-1]["remove"])
    for name, p in run.backend.unet.named_parameters():
        assert torch.equal(p, frozen[name])
    assert load_hypernet(tmp_path / "erase.safetensors").meta.training["nf4_base"] is True


def test_fp8_and_nf4_together_are_refused(tiny_flux, tmp_path):
    with pytest.raises(UnHypeError, match="fp8_base and nf4_base"):
        flux_cfg(tiny_flux, tmp_path, fp8_base=True, nf4_base=True)


def test_nf4_without_bitsandbytes_is_refused_before_loading(tiny_flux, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UnHypeError, match="nf4_base needs bitsandbytes: pip install"):
        flux_cfg(tiny_flux, tmp_path, nf4_base=True)


class MoveLog:
    """Records every `.to(device)` of a module (there is no second device on a CPU machine, so
    the offloading is checked by what was asked of each text encoder)."""

    def __init__(self, modules: dict):
        self.calls = []
        for name, module in modules.items():
            real = module.to

            def to(*args, _real=real, _name=name, **kwargs):
                self.calls.append((_name, str(args[0]) if args else str(kwargs.get("device"))))
                return _real(*args, **kwargs)
            module.to = to

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def test_text_encoders_wait_on_the_cpu_and_come_back_for_each_encoding(tiny_flux, tmp_path):
    from unhype.trainer.backends import load_backend

    cfg = flux_cfg(tiny_flux, tmp_path, cache_text_encoder_outputs=True, device="cpu")
    backend = load_backend(cfg)
    log = MoveLog({"clip": backend.pipe.text_encoder, "t5": backend.pipe.text_encoder_2})
    run = loop.prepare(cfg, quiet=True, backend=backend)
    assert run.backend.text_offloaded
    # every prompt was encoded before the encoders left; then each went to the CPU once
    assert log.take() == [("clip", "cpu"), ("t5", "cpu")]
    reference = loop.prepare(flux_cfg(tiny_flux, tmp_path / "ref"), quiet=True).backend
    vec = backend.embed(["a photo of a dog"])  # CLIP-L only: T5 stays where it is
    assert log.take() == [("clip", "cpu"), ("clip", "cpu")]
    torch.testing.assert_close(vec, reference.embed(["a photo of a dog"]))
    cond = backend.encode(["a photo of a dog"])
    assert log.take() == [("clip", "cpu"), ("t5", "cpu"), ("clip", "cpu"), ("t5", "cpu")]
    torch.testing.assert_close(cond.hidden, reference.encode(["a photo of a dog"]).hidden)


def test_the_denoiser_reaches_the_device_only_after_fp8_and_the_encoders_left(tiny_flux,
                                                                              tmp_path):
    """With the memory options the models are built on the CPU: the text encoders go to the
    device for the up-front encoding, then leave; the transformer is stored in fp8 on the CPU
    and only then moved, so the device never holds it in full precision (on a 24 GB card the
    bf16 FLUX.1-dev transformer plus its encoders, 31 GiB, would not fit while loading)."""
    from unhype.trainer.backends import load_backend

    cfg = flux_cfg(tiny_flux, tmp_path, cache_text_encoder_outputs=True, fp8_base=True,
                   mixed_precision="bf16", device="cpu")
    backend = load_backend(cfg)
    assert backend.staged
    log = MoveLog({"clip": backend.pipe.text_encoder, "t5": backend.pipe.text_encoder_2,
                   "transformer": backend.transformer})
    qkv = backend.transformer.transformer_blocks[0].attn.to_q
    real_to = backend.transformer.to
    dtypes = []
    backend.transformer.to = lambda *a, **k: (dtypes.append(qkv.weight.dtype), real_to(*a, **k))[1]
    run = loop.prepare(cfg, quiet=True, backend=backend)
    assert not run.backend.staged and run.backend.text_offloaded
    assert log.take() == [("clip", "cpu"), ("t5", "cpu"), ("transformer", "cpu")]
    assert dtypes == [torch.float8_e4m3fn]  # already fp8 when it moved

    plain = load_backend(flux_cfg(tiny_flux, tmp_path / "plain", device="cpu"))
    assert not plain.staged  # without the options: built on the device, as before


def test_sdxl_text_encoders_come_back_together(tiny_sdxl, tmp_path):
    """SDXL reads both encoders for its conditioning and the second one's pooled vector."""
    from unhype.trainer.backends import load_backend

    cfg = inline_cfg(tiny_sdxl, tmp_path, cache_text_encoder_outputs=True, device="cpu")
    backend = load_backend(cfg)
    assert backend.staged
    assert backend.vae is None  # the tiny pipeline has none; a real one moves after the UNet
    log = MoveLog({"clip_l": backend.text_encoders[0], "bigg": backend.text_encoders[1],
                   "unet": backend.unet})
    loop.prepare(cfg, quiet=True, backend=backend)
    # the encoders leave, then the UNet that staging kept off the device arrives
    assert log.take() == [("clip_l", "cpu"), ("bigg", "cpu"), ("unet", "cpu")]
    reference = loop.prepare(inline_cfg(tiny_sdxl, tmp_path / "ref"), quiet=True).backend
    torch.testing.assert_close(backend.embed(["a dog"]), reference.embed(["a dog"]))
    assert log.take() == [("clip_l", "cpu"), ("bigg", "cpu")] * 2


def test_toy_models_ignore_the_options_and_say_so(tmp_path, capsys):
    cfg = resolve({"pretrained_model_name_or_path": "toy", "output_dir": str(tmp_path),
                   "concepts": "circle", "template_set": "toy", "fp8_base": True,
                   "cache_text_encoder_outputs": True, "max_train_steps": 1})
    run = loop.prepare(cfg, quiet=True)
    assert "the toy models are tiny" in capsys.readouterr().err
    assert {p.dtype for p in run.backend.unet.parameters()} == {torch.float32}
    assert not run.backend.text_offloaded


def test_fp8_base_errors_change_nothing():
    unet = torch.nn.Linear(4, 4)  # not a diffusers model: no layerwise casting (diffusers < 0.33)
    with pytest.raises(UnHypeError, match=r"diffusers >= 0.33"):
        memory.store_in_fp8(unet, torch.bfloat16)
    assert unet.weight.dtype == torch.float32
    backend = types.SimpleNamespace(family=types.SimpleNamespace(name="sd1"), unet=unet,
                                    device=torch.device("mps"), dtype=torch.float16,
                                    shrunk=None)
    cfg = types.SimpleNamespace(values={"fp8_base": True}, fp8_base=True,
                                cache_text_encoder_outputs=False)
    with pytest.raises(UnHypeError, match="mps"):
        memory.apply(cfg, backend)
    assert unet.weight.dtype == torch.float32


def test_memory_table_counts_the_published_full_size_models():
    """benchmarks/bench_training_memory.py's FLUX rows (docs/training.md): the components have
    the published parameter counts, and the options take off what they should."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_training_memory import rows_for

    gib = 2 ** 30
    rows = {(r["fp8_base"], r["nf4_base"], r["cache_text_encoder_outputs"]): r
            for r in rows_for("flux")}
    plain, both, nf4 = rows[(False, False, False)], rows[(True, False, True)], \
        rows[(False, True, True)]
    # FLUX.1-dev transformer 11,901,408,320 parameters; CLIP-L text 123,060,480 + T5-XXL
    # encoder 4,762,310,656; FLUX VAE 83,821,011 (bf16: 2 bytes each; buffers add a few bytes)
    exact = pytest.approx
    assert plain["denoiser_gib"] * gib == exact(2 * 11_901_408_320, rel=1e-6)
    assert plain["text_gib"] * gib == exact(2 * (123_060_480 + 4_762_310_656), rel=1e-6)
    assert plain["vae_gib"] * gib == exact(2 * 83_821_011, rel=1e-6)
    # fp8: 1 byte for the linear weights outside the skip list, 2 for the rest
    assert 14.0 < both["denoiser_gib"] < 14.2 and both["text_gib"] == plain["text_gib"]
    # NF4: the same layers at ~0.52 bytes a weight: 16.1 GiB of bf16 weights -> 4.2 (fp8 also
    # stores their biases in one byte, NF4 keeps them: 3 MB apart)
    fp8_saved = plain["denoiser_gib"] - both["denoiser_gib"]  # = half the layers' bf16 bytes
    assert nf4["denoiser_gib"] == pytest.approx(
        plain["denoiser_gib"] - fp8_saved * (2 - memory.NF4_BYTES_PER_WEIGHT), rel=1e-3)
    assert 10.1 < nf4["denoiser_gib"] < 10.3
    assert both["on_device_gib"] == pytest.approx(both["denoiser_gib"] + both["vae_gib"])
    assert plain["on_device_gib"] == pytest.approx(
        plain["denoiser_gib"] + plain["text_gib"] + plain["vae_gib"])
