"""FLUX trainer backend on a tiny random FLUX folder: training, velocity target, loading, memory."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.trainer.conftest import flux_cfg, removal_gradient
from unhype.trainer import losses, loop
from unhype.trainer.backends import load_backend
from unhype.trainer.backends.tiny_flux import build_flux_folder
from unhype.trainer.config import resolve
from unhype.errors import UnHypeError
from unhype.fileformat import check_targets_in_model, load_hypernet


def test_train_flux_paper_preset_writes_a_loadable_hypernet(tiny_flux, tmp_path):
    cfg = flux_cfg(tiny_flux, tmp_path, max_train_steps=3, target_preset="paper",
                   latent_cache=1, resolution=32)
    run = loop.prepare(cfg, quiet=True)
    assert run.backend.family.name == "flux" and run.backend.distilled
    assert run.guidance == 3.5  # FLUX.1-dev's distilled guidance input by default
    assert run.cond_t.added["pooled_projections"].shape[1] == 768
    assert loop.train(run, progress=False) == 0
    loaded = load_hypernet(tmp_path / "erase.safetensors")
    meta = loaded.meta
    assert meta.family == "flux" and meta.embedding["source"] == "clip_l_pooled"
    assert meta.training["prediction_type"] == "flow_velocity"
    # 1 double block x (to_v, add_v_proj, to_out.0) + 1 single block x to_v
    assert sorted(t.name for t in meta.config.targets) == [
        "lora_transformer_single_transformer_blocks_0_attn_to_v",
        "lora_transformer_transformer_blocks_0_attn_add_v_proj",
        "lora_transformer_transformer_blocks_0_attn_to_out_0",
        "lora_transformer_transformer_blocks_0_attn_to_v"]
    check_targets_in_model(loaded, run.backend.unet)
    # the cache recorded every flow step: 3 steps x 2 prompts of the concept
    # 32 px / VAE factor 8 = 4x4 latent of 4 channels -> 2x2 packed tokens of 16 values
    assert run.cache["z"].shape == (6, 4, 16)
    assert torch.isfinite(run.cache["e_a"]).all()
    assert run.log[-1]["delta_target"] > 0


def test_esd_velocity_target_on_known_tensors():
    v_p = torch.tensor([[1.0, -2.0, 0.5]])
    v_a = torch.tensor([[0.0, 1.0, 0.5]])
    target = losses.esd_target(v_p, v_a, eta=1.0)
    assert torch.equal(target, torch.tensor([[-1.0, 4.0, 0.5]]))  # v_a - eta (v_p - v_a)
    # the same target in x0 space: x0 = z - sigma v is affine in v with coefficients summing
    # to one, so the velocity target maps to the x0 target (ESD is space-independent)
    z, sigma, eta = torch.randn(1, 3), 0.7, 0.6
    x0 = lambda v: z - sigma * v  # noqa: E731
    t_v = losses.esd_target(v_p, v_a, eta)
    assert torch.allclose(x0(t_v), losses.esd_target(x0(v_p), x0(v_a), eta), atol=1e-6)
    loss = losses.esd_loss_per_prompt(t_v, v_p, v_a, eta)
    assert float(loss) == 0.0


def test_flow_convention_euler_reaches_x0(tiny_flux):
    """v = noise - x0 integrated by the backend's FlowMatch Euler schedule ends at x0."""
    backend = load_backend(resolve({"pretrained_model_name_or_path": str(tiny_flux),
                                    "resolution": 32, "device": "cpu"}))
    gen = torch.Generator().manual_seed(0)
    noise = backend.initial_noise(2, gen)
    x0 = torch.randn_like(noise)
    scheduler = backend.make_scheduler(5)
    assert float(scheduler.sigmas[0]) == 1.0 and float(scheduler.sigmas[-1]) == 0.0
    z = noise.clone()
    for t in scheduler.timesteps:
        z = scheduler.step(noise - x0, t, z, return_dict=False)[0]
    assert torch.allclose(z, x0, atol=1e-5)
    # packing round trip through diffusers' own helpers
    lat = torch.randn(2, *backend.latent_shape)
    assert torch.equal(backend.unpack(backend.pack(lat)), lat)


def test_single_file_transformer_with_and_without_config(tiny_flux, tmp_path):
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    single = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(single))
    cfg = resolve({"pretrained_model_name_or_path": str(single), "model_config": str(tiny_flux),
                   "resolution": 16, "device": "cpu"})
    backend = load_backend(cfg)
    assert backend.family.name == "flux" and "single-file" in backend.description
    for (k, a), (_, b) in zip(ref.state_dict().items(), backend.unet.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(UnHypeError, match="--model_config"):
        load_backend(resolve({"pretrained_model_name_or_path": str(single)}))
    with pytest.raises(UnHypeError, match="transformer/config.json"):
        load_backend(resolve({"pretrained_model_name_or_path": str(single),
                              "model_config": str(tmp_path), "model_family": "flux"}))


def test_gradient_checkpointing_and_bf16(tiny_flux, tmp_path):
    cfg = flux_cfg(tiny_flux, tmp_path, max_train_steps=2, gradient_checkpointing=True,
                   mixed_precision="bf16")
    run = loop.prepare(cfg, quiet=True)
    transformer = run.backend.unet
    assert transformer.gradient_checkpointing
    assert next(transformer.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in run.hypernet.parameters())
    calls = {"n": 0}
    real = transformer._gradient_checkpointing_func

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    transformer._gradient_checkpointing_func = counted
    assert loop.train(run, progress=False) == 0
    assert calls["n"] > 0  # the backward through the transformer recomputed its blocks
    assert np.isfinite(run.log[-1]["remove"]) and np.isfinite(run.log[-1]["esd_T"])


def test_gradient_checkpointing_gives_the_gradients_without_it(tiny_flux, tmp_path):
    """Direct mode: the hooks are cleared before the backward that recomputes the blocks."""
    grads = {}
    for checkpointing in (False, True):
        run = loop.prepare(flux_cfg(tiny_flux, tmp_path / str(checkpointing), mode="direct",
                                    gradient_checkpointing=checkpointing), quiet=True)
        grads[checkpointing] = removal_gradient(run)
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-8)


def test_cfg_model_without_guidance_embedding(tmp_path):
    folder = build_flux_folder(tmp_path / "schnell_like", guidance_embeds=False)
    run = loop.prepare(flux_cfg(folder, tmp_path / "out", max_train_steps=2, mode="direct"),
                       quiet=True)
    assert not run.backend.distilled and run.guidance == 1.0
    assert loop.train(run, progress=False) == 0


def test_flux_dev_example_config_prepares(tiny_flux, tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "unhype/trainer/configs/flux_dev_erase_nudity.toml"
    cfg = resolve({"config_file": str(config), "pretrained_model_name_or_path": str(tiny_flux),
                   "output_dir": str(tmp_path), "resolution": 16, "max_train_steps": 1,
                   "network_hidden": 8})
    run = loop.prepare(cfg, quiet=True)
    assert run.backend.family.name == "flux" and run.guidance == 3.5
    assert run.hypernet.config.rank == 4 and run.hypernet.config.hyper_steps == 300
    assert run.concepts[0].anchor == "a fully clothed person"
    assert next(run.backend.unet.parameters()).dtype == torch.bfloat16
