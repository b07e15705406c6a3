"""The trainer on the embedded toy model (skipped until the toy weights are built)."""

import pytest
import torch

from unhype.trainer import evaluate, loop
from unhype.trainer.config import resolve
from unhype.fileformat import load_hypernet
from unhype.toy.model import weights_dir

pytestmark = pytest.mark.skipif(not (weights_dir() / "unet" / "config.json").is_file(),
                                reason="toy weights not built (unhype toy build)")


def test_toy_run_writes_hypernet_grid_and_metrics(tmp_path):
    retain = tmp_path / "retain.txt"
    retain.write_text("a red square\na blue star\nsomething green\n")
    cfg = resolve({"config_file": "unhype/trainer/configs/toy_demo.toml", "output_dir": str(tmp_path),
                   "retain_prompts": str(retain),
                   "max_train_steps": 3, "ddim_steps": 3, "sample_steps": 2, "sample_seeds": 1,
                   "train_batch_size": 2, "retain_batch_size": 16, "log_every": 1,
                   "eval_images": 1})
    cfg.concept_entries = [{"target": "circle", "templates": ["a red {}", "a {}"]}]
    session = loop.prepare(cfg, quiet=True)
    assert session.backend.prediction_type == "sample"
    assert session.concepts[0].synonyms == ["disk", "round shape", "dot"]
    toy_retain = session.backend.default_retain_prompts(session.concepts)
    assert len(toy_retain) > 1000
    assert not [p for p in toy_retain if "circle" in p or "disk" in p or "dot" in p]
    assert loop.train(session, progress=False) == 0
    loaded = load_hypernet(tmp_path / "erase_circle.safetensors")
    assert loaded.meta.family == "toy" and loaded.meta.concepts[0]["synonyms"][0] == "disk"
    assert loaded.meta.training["esd_space"].startswith("native model output (sample)")
    assert loaded.gate_reference == pytest.approx(loop.gate_reference(session), rel=1e-5)
    assert loaded.gate_reference > 0
    # `unhype train --eval`: scored with the floor the written file applies
    run_metrics = evaluate.evaluate_run(session)
    assert (tmp_path / "metrics.json").is_file() and run_metrics["erased"] == ["circle"]
    assert set(run_metrics["unhype"]["per_concept"]["circle"]) == {"acc_e", "acc_g"}
    assert run_metrics["bars_on"]["erased<=10%"]["concept"] == "circle"
    assert loaded.meta.training["concept_references"] == {"circle": loaded.gate_reference}
    grid = list((tmp_path / "samples").glob("circle-step*.png"))
    assert grid
    images = session.backend.decode(torch.zeros(2, *session.backend.latent_shape))
    assert images.shape == (2, 3, 16, 16)
    metrics = evaluate.evaluate(session.backend, session.hypernet, session.lora,
                                session.concepts, per_class=1)
    for side in ("base", "unhype"):
        assert all(0.0 <= metrics[side][k] <= 1.0 for k in ("acc_e", "acc_s", "acc_g", "h_o"))
    assert metrics["erased"] == ["circle"]
    assert 0.0 <= metrics["unhype"]["kept_s"] <= 1.0 and metrics["unhype"]["change_s"] >= 0

    def no_update(emb):  # the LoRA of every layer, scaled to nothing
        return {k: (a * 0, b * 0) for k, (a, b) in session.hypernet(emb).items()}

    def doubled(emb):
        return {k: (a * 2, b + 0.05) for k, (a, b) in session.hypernet(emb).items()}

    # the base images come back from the cache of the run above: an update of zero leaves
    # every other-shape image as it was, a large one moves them
    same = evaluate.evaluate(session.backend, no_update, session.lora, session.concepts, 1)
    assert (same["unhype"]["kept_s"], same["unhype"]["change_s"]) == (1.0, 0.0)
    moved = evaluate.evaluate(session.backend, doubled, session.lora, session.concepts, 1)
    assert moved["unhype"]["kept_s"] < 1.0 and moved["unhype"]["change_s"] > 0.1
    assert "within 1 of 255 levels" in evaluate.format_metrics(moved)


def test_toy_prompt_sets_cover_classes():
    sets = evaluate.prompt_sets(["circle", "star"], per_class=3)
    assert len(sets["erased"][0]) == 6 and len(sets["synonyms"][0]) == 6
    assert len(sets["others"][0]) == 8 * 3
    assert not [p for p in sets["synonyms"][0] if "circle" in p]
    assert sorted(set(sets["synonyms"][1].tolist())) == [0, 6]  # circle, star


def test_eval_of_concepts_that_are_no_toy_shape_is_refused_before_training(tmp_path):
    from unhype.errors import UnHypeError

    cfg = resolve({"pretrained_model_name_or_path": "toy", "output_dir": str(tmp_path),
                   "concepts": "circle,dog", "eval": True, "max_train_steps": 1})
    with pytest.raises(UnHypeError, match="'dog' is not a toy shape"):
        loop.prepare(cfg, quiet=True)
    assert not list(tmp_path.iterdir())
