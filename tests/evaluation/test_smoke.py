"""Tiny end-to-end runs on a random toy world: the harness, every baseline and `unhype eval`."""

from __future__ import annotations

import json

import pytest
import torch

from unhype.cli import main


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_harness_runs_methods_and_restores_the_unet(random_toy, toy_backend, toy_hypernet_file):
    from unhype.baselines.negative_prompt import NegativePromptMethod
    from unhype.baselines.registry import build
    from unhype.evaluation.harness import ToyGenerator, evaluate, generate
    from unhype.evaluation.methods import Method, UnHypeMethod
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.fileformat import load_hypernet

    gen = ToyGenerator(toy_backend.toy, steps=2)
    ps = load_prompt_set("toy")
    before = _state(gen.unet)
    unhype = UnHypeMethod.from_loaded(load_hypernet(toy_hypernet_file))
    methods = [Method(), unhype, NegativePromptMethod(gen, ["circle"]),
               build("uce", gen, toy_backend, ["circle"], ps)]
    clf = load_classifier("toy", ps.class_names, ps.class_prompts(), toy_weights=random_toy)
    res = evaluate(gen, methods, ps, ["circle"], clf, per_class=1, batch_size=4,
                   clip_scorer=clf, progress=False)
    rows = res["methods"]
    assert list(rows) == ["base model", unhype.name, "negative prompt", "UCE"]
    for row in rows.values():
        assert 0 <= row["acc_e"] <= 1 and 0 <= row["h_o"] <= 1 and row["clip_score"] >= 0
        assert row["images"]["erased"].shape == (1, 3, 16, 16)
    # other-class images against the base model's, same prompts and seeds
    assert (rows["base model"]["change_s"], rows["base model"]["kept_s"]) == (0.0, 1.0)
    neg = rows["negative prompt"]  # a new unconditional half moves every image
    assert neg["change_s"] > 0 and neg["kept_s"] < 1
    assert all(torch.equal(v, before[k]) for k, v in gen.unet.state_dict().items())
    # seeded: the base model gives the same images twice; UnHype's LoRA changes the cond rows
    prompts = res["sets"]["erased"]
    a = generate(gen, Method(), prompts, 5, 4)
    assert torch.equal(a, generate(gen, Method(), prompts, 5, 4))
    unhype.attach(gen.unet)
    try:
        assert not torch.equal(a, generate(gen, unhype, prompts, 5, 4))
    finally:
        unhype.detach()
    assert torch.equal(a, generate(gen, Method(), prompts, 5, 4))


def test_given_reference_images_are_checked_and_used(random_toy, toy_backend):
    from unhype.errors import UnHypeError
    from unhype.evaluation.harness import ToyGenerator, evaluate
    from unhype.evaluation.methods import Method
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier

    gen = ToyGenerator(toy_backend.toy, steps=2)
    ps = load_prompt_set("toy")
    clf = load_classifier("toy", ps.class_names, ps.class_prompts(), toy_weights=random_toy)
    base = evaluate(gen, [Method()], ps, ["circle"], clf, per_class=1, batch_size=4,
                    progress=False, keep_images=100)["methods"]["base model"]
    others = base["images"]["others"]
    with pytest.raises(UnHypeError, match="not the same prompt sets"):
        evaluate(gen, [Method()], ps, ["circle"], clf, per_class=2, progress=False,
                 reference=others)
    shifted = (others + 10 / 255).clamp(0, 1)
    row = evaluate(gen, [Method()], ps, ["circle"], clf, per_class=1, batch_size=4,
                   progress=False, reference=shifted)["methods"]["base model"]
    assert row["kept_s"] < 1
    assert row["change_s"] == pytest.approx(float((shifted - others).abs().mean() * 255), abs=1e-3)


def test_gate_floor_leaves_unrelated_images_bit_identical(random_toy, toy_backend,
                                                           toy_hypernet_file):
    from unhype.evaluation.harness import ToyGenerator, evaluate
    from unhype.evaluation.methods import Method, UnHypeMethod
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.zero_shot import load_classifier
    from unhype.fileformat import load_hypernet

    gen = ToyGenerator(toy_backend.toy, steps=2)
    ps = load_prompt_set("toy")
    clf = load_classifier("toy", ps.class_names, ps.class_prompts(), toy_weights=random_toy)
    loaded = load_hypernet(toy_hypernet_file)
    raw = UnHypeMethod.from_loaded(loaded, name="raw")  # no reference stored: no floor
    # every prompt's update far under 3% of this reference: the floor switches all off
    floored = UnHypeMethod(loaded.hypernet, raw.paths, raw.dims, name="floored",
                           gate_reference=1e9, floor=0.03)
    rows = evaluate(gen, [Method(), raw, floored], ps, ["circle"], clf, per_class=1,
                    batch_size=4, progress=False)["methods"]
    assert rows["raw"]["kept_s"] < 1 or rows["raw"]["change_s"] > 0
    assert (rows["floored"]["kept_s"], rows["floored"]["change_s"]) == (1.0, 0.0)
    assert rows["floored"]["settings"]["gate_floor"] == 0.03
    assert raw.settings()["gate_floor"] is None


def test_unhype_eval_cli_with_every_baseline(random_toy, toy_hypernet_file, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--hypernet", str(toy_hypernet_file), "--toy_weights", str(random_toy),
                 "--baselines", "negative_prompt,uce,esd_x,esd_u,spm", "--baseline_steps", "2",
                 "--per_class", "1", "--steps", "2", "--batch_size", "8",
                 "--classifier", "judge", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    names = list(data["methods"])
    assert names[0] == "base model" and names[1].startswith("UnHype")
    assert {"negative prompt", "UCE", "SPM (gated rank-1)"} <= set(names)
    assert any(n.startswith("ESD-x") for n in names) and any(n.startswith("ESD-u") for n in names)
    assert data["erased"] == ["circle"] and len(data["sets"]["synonyms"]) == 1
    assert data["methods"]["base model"]["kept_s"] == 1.0
    assert data["methods"]["negative prompt"]["change_s"] > 0
    md = (out / "results.md").read_text()
    assert "| base model |" in md and "others within 1 level of base (8-bit)" in md
    assert len(list(out.glob("grid_*.png"))) == len(names)
    assert "H_o" in capsys.readouterr().out
    # a rerun into the same folder with fewer methods leaves no grid of the earlier run
    assert main(["eval", "--hypernet", str(toy_hypernet_file), "--toy_weights", str(random_toy),
                 "--per_class", "1", "--steps", "2", "--classifier", "judge", "--no_base",
                 "--out", str(out)]) == 0
    assert len(list(out.glob("grid_*.png"))) == 1


def test_unhype_eval_with_a_harder_generality_set(random_toy, toy_hypernet_file, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--hypernet", str(toy_hypernet_file), "--toy_weights", str(random_toy),
                 "--generality", "synonyms,paraphrases,misspellings", "--per_class", "3",
                 "--steps", "2", "--classifier", "judge", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["generality"] == ["synonyms", "paraphrases", "misspellings"]
    prompts = data["sets"]["synonyms"]
    assert len(prompts) == 3 and prompts[1] == "an illustration of a circle" and "cicle" in prompts[2]
    for row in data["methods"].values():  # one prompt of each kind: its accuracy is 0 or 1
        assert row["n_g"] == 3 and row["acc_g"] == pytest.approx(
            sum(row[f"acc_g_{k}"] for k in ("synonyms", "paraphrases", "misspellings")) / 3)
    md = (out / "results.md").read_text()
    assert "Acc_g (synonyms + paraphrases + misspellings, lower better)" in md
    assert "| Acc_g: synonyms | Acc_g: paraphrases | Acc_g: misspellings |" in md


def test_unhype_eval_bad_input(tmp_path, capsys):
    assert main(["eval", "--model", "toy", "--out", str(tmp_path)]) == 2
    assert "nothing to erase" in capsys.readouterr().err
    assert main(["eval", "--model", "toy", "--erase", "unicorn", "--prompt_set", "toy",
                 "--out", str(tmp_path)]) == 2
    assert "not a class or synonym" in capsys.readouterr().err
    assert main(["eval", "--model", "toy", "--erase", "circle", "--gate_floor", "0.7",
                 "--out", str(tmp_path)]) == 2
    assert "gate floor must be in [0, 0.5)" in capsys.readouterr().err
    assert main(["eval", "--model", "toy", "--erase", "circle", "--generality", "paraphrase",
                 "--out", str(tmp_path)]) == 2
    assert "'paraphrase' is not one of synonyms, paraphrases, misspellings" in \
        capsys.readouterr().err
    assert main(["eval", "--hypernet", str(tmp_path / "none.safetensors")]) == 2
    taken = tmp_path / "results"
    taken.write_text("mine")
    assert main(["eval", "--model", "toy", "--erase", "circle", "--out", str(taken)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err  # before any image is made
    assert taken.read_text() == "mine"
    assert main(["eval", "--model", "toy", "--erase", "circle", "--device", "foo",
                 "--out", str(tmp_path)]) == 2
    assert "--device must be auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    for extra, message in (
            (["--baselines", "esd_x,bogus"], "--baselines: unknown 'bogus'"),
            (["--baselines", "uce,uce"], "--baselines: a name is repeated"),
            (["--steps", "-1"], "--steps -1: the sampling steps must be >= 1"),
            (["--steps", "0"], "--steps 0: the sampling steps must be >= 1")):
        assert main(["eval", "--model", "toy", "--erase", "circle", "--out", str(tmp_path)]
                    + extra) == 2  # refused before the model loads or anything trains
        assert message in capsys.readouterr().err
    twice = tmp_path / "none.safetensors"
    assert main(["eval", "--hypernet", str(twice), "--hypernet", str(twice)]) == 2
    assert "is given twice" in capsys.readouterr().err


def test_a_trained_baseline_leaves_no_temporary_folder(toy_backend, tmp_path, monkeypatch):
    """ESD-x / SPM borrow the trainer's preparation, which wants an output folder; the scratch
    folder they give it is removed (each training once left an empty one in /tmp)."""
    import tempfile

    from unhype.baselines.registry import build
    from unhype.evaluation.harness import ToyGenerator
    from unhype.evaluation.prompts import load_prompt_set

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gen = ToyGenerator(toy_backend.toy, steps=2)
    for name in ("esd_x", "spm"):
        method = build(name, gen, toy_backend, ["circle"], load_prompt_set("toy"), 1, 0)
        assert method.info["settings"]["steps"] == 1
    assert list(tmp_path.iterdir()) == []
