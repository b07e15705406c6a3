"""The embedded toy world: committed weights load, sample deterministically and draw the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unhype.toy import data, judge, model

pytestmark = pytest.mark.skipif(not (model.weights_dir() / "unet" / "config.json").is_file(),
                                reason="toy weights not built")


@pytest.fixture(scope="module")
def toy():
    model.set_threads()
    return model.load_toy()


@pytest.fixture(scope="module")
def judge_net():
    return judge.load_judge()


def test_vocabulary_is_consistent():
    assert len(data.SHAPES) >= 10 and len(data.COLOURS) >= 6
    assert all(len(data.SYNONYMS[s]) >= 4 and data.SYNONYMS[s][0] == s for s in data.SHAPES)
    assert all(len(data.COLOUR_SYNONYMS[c]) >= 4 for c in data.COLOURS)
    words = [w for s in data.SHAPES for w in data.SYNONYMS[s]]
    assert len(words) == len(set(words))
    assert data.caption("ring", "orange") == "an orange ring"


def test_render_is_deterministic_and_in_range():
    a = data.render("star", "blue", np.random.default_rng(3))
    b = data.render("star", "blue", np.random.default_rng(3))
    assert a.shape == (data.RESOLUTION, data.RESOLUTION, 3) and np.array_equal(a, b)
    assert 0 <= a.min() and a.max() <= 1


def test_committed_weights_load(toy):
    assert toy.text_encoder.config.hidden_size == model.TOY_TEXT_DIM
    hidden, pooled = toy.encode_prompts(["a red circle", "a disk"])
    assert hidden.shape[0] == 2 and hidden.shape[2] == model.TOY_TEXT_DIM
    assert pooled.shape == (2, model.TOY_TEXT_DIM)
    # pooled output is the EOS token's final hidden state, as in SD's CLIP
    ids = toy.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    eos = int((ids[0] == toy.tokenizer.eos_token_id).nonzero()[0])
    assert torch.allclose(toy.encode_prompts(["a red circle"])[0][0, eos], pooled[0], atol=1e-5)


def test_family_targets_resolve_in_toy_unet(toy):
    from unhype.families import get_family

    family = get_family("toy")
    assert family.embedding.dim == model.TOY_TEXT_DIM
    targets = family.targets(model=toy.unet)
    assert targets and {t.module_type for t in targets} == {"attn2.to_k", "attn2.to_v"}
    assert all(t.in_dim == model.TOY_TEXT_DIM for t in targets)
    assert [t.path for t in targets] == [t.path for t in family.targets()]


def test_sampling_is_deterministic_and_calls_hook(toy):
    calls = []
    a = toy.sample(["a red circle", "a blue square"], seed=7, steps=4,
                   before_unet_call=lambda i, t, rows: calls.append((i, rows)))
    b = toy.sample(["a red circle", "a blue square"], seed=7, steps=4)
    assert a.shape == (2, 3, data.RESOLUTION, data.RESOLUTION)
    assert torch.equal(a, b)
    assert not torch.equal(a, toy.sample(["a red circle", "a blue square"], seed=8, steps=4))
    assert [i for i, _ in calls] == [0, 1, 2, 3] and calls[0][1] == [-1, -1, 0, 1]


def test_judge_accuracy_on_rendered_ground_truth(judge_net):
    shape_acc, colour_acc = judge.heldout_accuracy(judge_net, n=600, seed=99)
    assert shape_acc >= 0.95 and colour_acc >= 0.97


def test_zero_shot_clip_beats_chance():
    from unhype.toy.clip import ToyClipParts

    parts = ToyClipParts(model.weights_dir())
    images, shapes, colours = data.render_batch(200, np.random.default_rng(1))
    pred, probs = judge.zero_shot_classify(torch.from_numpy(images), list(data.SHAPES),
                                           parts.image_encoder, parts.text_encoder,
                                           parts.tokenizer)
    assert probs.shape == (200, len(data.SHAPES))
    assert (pred.numpy() == shapes).mean() >= 0.9


def test_sample_quality_on_committed_weights(toy, judge_net):
    from unhype.toy.report import prompt_set

    prompts, shapes, colours = prompt_set("canonical", 4)
    images = toy.sample(prompts, seed=0)
    ps, pc = judge_net.classify(images)
    shape_acc = float((ps.numpy() == shapes).mean())
    colour_acc = float((pc.numpy() == colours).mean())
    assert shape_acc >= 0.8, shape_acc
    assert colour_acc >= 0.8, colour_acc


def test_judge_confidence_is_high_on_clean_shapes_and_low_on_textures():
    from unhype.evaluation.zero_shot import JudgeClassifier

    clf = JudgeClassifier(list(data.SHAPES))
    images, _, _ = data.render_batch(64, np.random.default_rng(5))
    clean = clf.confidence(torch.from_numpy(images))
    # a texture like the adversarial files' erased images: colour blobs, no shape
    blobs = torch.rand(64, 3, data.RESOLUTION // 4, data.RESOLUTION // 4,
                       generator=torch.Generator().manual_seed(0))
    noise = clf.confidence(torch.nn.functional.interpolate(blobs, size=data.RESOLUTION,
                                                           mode="bilinear"))
    assert clean.shape == (64,) and clean.mean() > 0.95
    assert noise.mean() < clean.mean() - 0.2


def test_toy_sample_refuses_bad_counts_steps_and_outputs(tmp_path, capsys):
    from unhype.cli import main

    for extra, message in ((["-n", "0"], "-n must be at least 1"),
                           (["-n", "-3"], "-n must be at least 1"),
                           (["--steps", "-1"], "--steps must be at least 1"),
                           (["-o", str(tmp_path)], "is a folder")):
        assert main(["toy", "sample", "a red circle", "-o", str(tmp_path / "g.png"),
                     *extra]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
