"""The committed toy flow model (unhype/toy/flow.py) and the trainer's FLUX path on it."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.trainer.conftest import fast_options
from unhype.trainer import loop
from unhype.trainer.config import resolve
from unhype.families import get_family
from unhype.fileformat import check_targets_in_model, load_hypernet
from unhype.toy import flow


@pytest.fixture(scope="module")
def toy_flow():
    return flow.load_toy_flow()


def test_committed_weights_load_small_fp16(toy_flow):
    folder = flow.flow_dir() / "transformer"
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in flow.toy_flow_config()} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in flow.toy_flow_config().items()}
    path = folder / "diffusion_pytorch_model.safetensors"
    assert path.stat().st_size < 5 * 2**20
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert next(toy_flow.transformer.parameters()).dtype == torch.float32  # loaded as fp32
    assert not toy_flow.transformer.config.guidance_embeds
    # trained against the committed toy text encoder (a retrained encoder needs a rebuild)
    build = json.loads((flow.flow_dir() / "build.json").read_text())
    assert build["text_encoder_sha256"] == flow.text_encoder_digest()


def test_sampling_is_deterministic_and_shared_with_the_trainer_backend(toy_flow, monkeypatch):
    from unhype.trainer.backends.toy_flux import ToyFluxBackend
    from unhype import flow_latents

    prompts = ["a red circle", "a blue star"]
    a = toy_flow.sample(prompts, seed=3, steps=4)
    assert a.shape == (2, 3, 16, 16) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, toy_flow.sample(prompts, seed=3, steps=4))
    assert not torch.equal(a, toy_flow.sample(prompts, seed=4, steps=4))
    # both samplers run the one Euler loop of unhype/flow_latents.py, each with its own CFG
    # batching, text encoding and decoding around it: they must give the same images
    runs = []
    euler = flow_latents.euler

    def spy(z, scheduler, velocity, stop=None):
        runs.append(len(scheduler.timesteps[:stop]))
        return euler(z, scheduler, velocity, stop)

    monkeypatch.setattr(flow_latents, "euler", spy)
    assert torch.equal(toy_flow.sample(prompts, seed=3, steps=4), a)
    backend = ToyFluxBackend()
    gen = torch.Generator().manual_seed(3)
    z = backend.sample(backend.encode(prompts), backend.encode(["", ""]), gen, 4,
                       flow.DEFAULT_GUIDANCE)
    assert runs == [4, 4]
    assert torch.allclose(backend.decode(z), a, atol=1e-4)


def test_targets_resolve_in_the_committed_model(toy_flow):
    family = get_family("toy_flux")
    meta_targets = family.targets()  # the architecture on the meta device
    real = family.targets(model=toy_flow.transformer)
    assert [t.as_dict() for t in meta_targets] == [t.as_dict() for t in real]
    cfg = flow.toy_flow_config()
    assert len(real) == 3 * cfg["num_layers"] + cfg["num_single_layers"]
    assert {t.module_type for t in real} == {"attn.to_v", "attn.add_v_proj", "attn.to_out.0"}


def test_trainer_writes_a_toy_flux_hypernet(tmp_path):
    opts = fast_options("toy_flux", tmp_path, max_train_steps=2, ddim_steps=3,
                        concepts="circle", template_set="toy", retain_prompts="toy")
    run = loop.prepare(resolve(opts), quiet=True)
    assert run.backend.family.name == "toy_flux" and run.guidance == flow.DEFAULT_GUIDANCE
    assert run.concepts[0].synonyms == ["disk", "round shape", "dot"]
    assert loop.train(run, progress=False) == 0
    loaded = load_hypernet(tmp_path / "erase.safetensors")
    assert loaded.meta.family == "toy_flux"
    assert loaded.meta.training["prediction_type"] == "flow_velocity"
    check_targets_in_model(loaded, run.backend.unet)


def test_sample_quality_on_canonical_prompts(toy_flow):
    from unhype.toy import judge, report

    prompts, shapes, colours = report.prompt_set("canonical", 3)
    images = toy_flow.sample(prompts, seed=0)
    ps, pc = judge.load_judge().classify(images)
    shape_acc = report.class_mean_accuracy(ps.numpy(), shapes)
    colour_acc = report.class_mean_accuracy(pc.numpy(), colours)
    assert colour_acc >= 0.9
    assert shape_acc >= SHAPE_BAR, f"shape accuracy {shape_acc:.1%}"
    assert np.isfinite(images.numpy()).all()


# measured on the committed weights: 93.3% (28 of 30); a retrained or broken model (a wrong
# packing, a wrong timestep scale) falls to ~10% (chance); margin for thread-count float noise
SHAPE_BAR = 0.8
