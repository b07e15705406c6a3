"""Shared fixtures: tiny random diffusers pipeline folders and a fast training config."""

import pytest
import torch

from unhype.trainer import loop
from unhype.trainer.backends.tiny import build_pipeline_folder
from unhype.trainer.backends.tiny_flux import build_flux_folder
from unhype.trainer.config import resolve

# 2 shared cores: one intra-op thread avoids OpenMP oversubscription stalls (50x on conv).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _config_cache(tmp_path_factory):
    """Built-in config folders (unhype.model_configs) go to a temporary cache, not ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("UNHYPE_CACHE", str(tmp_path_factory.mktemp("unhype_cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return build_pipeline_folder("sd1", tmp_path_factory.mktemp("tiny_sd1"))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return build_pipeline_folder("sd2", tmp_path_factory.mktemp("tiny_sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_pipeline_folder("sdxl", tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("tiny_flux"))


def fast_options(model, out, **over):
    """Options for a run of a few seconds on a tiny model."""
    opts = dict(
        pretrained_model_name_or_path=str(model), output_dir=str(out), output_name="erase",
        max_train_steps=4, train_batch_size=2, retain_batch_size=8, ddim_steps=3,
        sample_steps=2, sample_seeds=1, hyper_steps=10, fields_lambda=0.5, learning_rate=1e-3,
        network_hidden=16, log_every=1, seed=7)
    opts.update(over)
    return opts


INLINE_CONCEPTS = [{"target": "dog", "anchor": "cat", "synonyms": ["puppy"],
                    "templates": ["a photo of a {}", "a {}"]}]


def inline_cfg(model, out, **over):
    """A resolved `fast_options` config with the inline concept."""
    cfg = resolve(fast_options(model, out, **over))
    cfg.concept_entries = [dict(c) for c in INLINE_CONCEPTS]
    return cfg


def flux_cfg(model, out, **over):
    """`inline_cfg` for the tiny FLUX folder."""
    over = {"resolution": 16, "ddim_steps": 3, **over}  # 16 px / 8 = 2x2 latent: one token
    return inline_cfg(model, out, **over)


def removal_gradient(run) -> torch.Tensor:
    """The hypernetwork's gradient of one removal loss (the trainer's first batch)."""
    gen = torch.Generator().manual_seed(0)
    run.noise_gen = torch.Generator().manual_seed(1)
    loss, _ = loop.removal_loss(run, *loop.draw_batch(run, gen), gen)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in run.hypernet.parameters() if p.grad is not None])
