"""A random tiny toy world (same file layout as the committed weights, untrained) for fast tests."""

from __future__ import annotations

import pytest
import torch


def build_random_toy(path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from unhype.toy import clip, judge, model

    clip.build_tokenizer(path / "tokenizer")
    torch.manual_seed(0)
    clip.save_clip(clip.ToyClip(), path)
    cfg = dict(model.toy_unet_config(), block_out_channels=[16, 16, 16])
    UNet2DConditionModel(**cfg).save_pretrained(path / "unet")
    DDIMScheduler(**model.scheduler_config()).save_pretrained(path / "scheduler")
    judge.save_judge(judge.JudgeNet(width=8), path / "judge")
    return path


@pytest.fixture(scope="session")
def random_toy(tmp_path_factory):
    torch.set_num_threads(1)
    return build_random_toy(tmp_path_factory.mktemp("toy_random"))


@pytest.fixture(scope="session")
def toy_backend(random_toy):
    from unhype.trainer.backends.toy import ToyBackend

    return ToyBackend("cpu", random_toy)


@pytest.fixture(scope="session")
def toy_hypernet_file(toy_backend, tmp_path_factory):
    """A toy-family hypernetwork file on the tiny UNet's targets, B heads non-zero."""
    from tests.helpers import hypernet_for
    from unhype.fileformat import save_hypernet
    from unhype.toy.model import TOY_TEXT_DIM

    net = hypernet_for(toy_backend.unet, family="toy", rank=1, hidden=8, perturb=0.5,
                       embed_dim=TOY_TEXT_DIM)
    path = tmp_path_factory.mktemp("hn") / "erase_circle.safetensors"
    save_hypernet(path, net, "toy", concepts=[{"target": "circle", "anchor": "",
                                              "synonyms": ["disk"]}],
                  training={"mode": "fields"})
    return path
