"""An interrupted `unhype eval` keeps its finished rows (out/rows/) and a partial report, exits
130, and a rerun computes only the missing rows, with the numbers of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

import unhype.baselines.registry as registry
import unhype.evaluation.harness as harness
from unhype.cli import main
from unhype.evaluation.methods import Method, UnHypeMethod


@pytest.fixture
def counted(monkeypatch):
    """Names of the methods whose images are generated, and of the baselines built."""
    made, built = [], []
    real_generate, real_build = harness.generate, registry.build

    def generate(generator, method, *a, **k):
        made.append(method.name)
        return real_generate(generator, method, *a, **k)

    def build(name, *a, **k):
        built.append(name)
        return real_build(name, *a, **k)

    monkeypatch.setattr(harness, "generate", generate)
    monkeypatch.setattr(registry, "build", build)
    return made, built


def _args(random_toy, hypernet, out, *extra):
    return ["eval", "--hypernet", str(hypernet), "--toy_weights", str(random_toy),
            "--baselines", "uce", "--per_class", "1", "--steps", "2", "--batch_size", "8",
            "--classifier", "judge", "--out", str(out), *extra]


def _numbers(out):
    data = json.loads((out / "results.json").read_text())
    return {name: {k: v for k, v in row.items() if k != "seconds"}
            for name, row in data["methods"].items()}


def test_interrupt_keeps_rows_and_rerun_computes_only_the_missing(
        random_toy, toy_hypernet_file, tmp_path, monkeypatch, counted, capsys):
    made, built = counted
    full, out = tmp_path / "full", tmp_path / "out"
    assert main(_args(random_toy, toy_hypernet_file, full)) == 0
    expected = _numbers(full)
    names = list(expected)
    assert names[0] == "base model" and names[1].startswith("UnHype") and names[2] == "UCE"
    assert made == list(expected) and built == ["uce"]
    made.clear(), built.clear()

    real_attach = UnHypeMethod.attach

    def ctrl_c(self, unet):  # the second method starts: Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(UnHypeMethod, "attach", ctrl_c)
    capsys.readouterr()
    assert main(_args(random_toy, toy_hypernet_file, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "missing" in err
    assert made == ["base model"] and built == []  # the baseline is trained only at its turn
    rows = sorted(p.name for p in (out / "rows").iterdir())
    assert rows == ["base_model.json", "base_others.safetensors"]
    partial = json.loads((out / "results.json").read_text())
    unhype_name = list(expected)[1]
    assert list(partial["methods"]) == ["base model"]
    assert partial["missing"] == [unhype_name, "uce (baseline)"]
    assert partial["methods"]["base model"]["h_o"] == expected["base model"]["h_o"]
    assert "| base model |" in (out / "results.md").read_text()
    assert (out / "grid_base_model.png").is_file()
    grid = (out / "grid_base_model.png").read_bytes()

    monkeypatch.setattr(UnHypeMethod, "attach", real_attach)
    made.clear()
    assert main(_args(random_toy, toy_hypernet_file, out)) == 0
    err = capsys.readouterr().err
    assert "reused 1 finished row(s)" in err and "--force" in err
    assert made == [unhype_name, "UCE"] and built == ["uce"]  # the base row is not recomputed
    assert _numbers(out) == expected  # change_s / kept_s against the stored base images
    assert (out / "grid_base_model.png").read_bytes() == grid  # kept, not redrawn
    assert "missing" not in json.loads((out / "results.json").read_text())

    made.clear(), built.clear()  # everything finished: nothing is generated or trained
    assert main(_args(random_toy, toy_hypernet_file, out)) == 0
    assert made == [] and built == [] and _numbers(out) == expected
    assert "reused 3 finished row(s)" in capsys.readouterr().err
    assert main(_args(random_toy, toy_hypernet_file, out, "--force")) == 0
    assert made == list(expected) and built == ["uce"] and _numbers(out) == expected


def test_changed_settings_are_recomputed_never_mixed(random_toy, toy_hypernet_file, tmp_path,
                                                     counted, capsys):
    made, built = counted
    out = tmp_path / "out"
    assert main(_args(random_toy, toy_hypernet_file, out)) == 0
    unhype_name = made[1]
    made.clear(), built.clear()
    capsys.readouterr()
    # the strength is the hypernetwork's alone: the base and UCE rows stay valid
    assert main(_args(random_toy, toy_hypernet_file, out, "--strength", "0.5")) == 0
    err = capsys.readouterr().err
    assert made == [unhype_name] and built == []
    assert f"recomputing {unhype_name}: its settings changed (strength)" in err
    assert json.loads((out / "results.json").read_text())["methods"][unhype_name][
        "settings"]["strength"] == 0.5
    made.clear()
    # the seed makes other images for every method
    assert main(_args(random_toy, toy_hypernet_file, out, "--seed", "7")) == 0
    assert made == ["base model", unhype_name, "UCE"] and built == ["uce"]
    assert "settings changed (seed)" in capsys.readouterr().err
    made.clear(), built.clear()
    # a damaged row file: recomputed, with a word
    (out / "rows" / "baseline_uce.json").write_text("{not json")
    assert main(_args(random_toy, toy_hypernet_file, out, "--seed", "7")) == 0
    assert made == ["UCE"] and "not a readable row file" in capsys.readouterr().err
    made.clear()
    # the base row reused but its images gone: recomputed, as the others are compared with them
    (out / "rows" / "base_others.safetensors").unlink()
    (out / "rows" / "baseline_uce.json").unlink()
    assert main(_args(random_toy, toy_hypernet_file, out, "--seed", "7")) == 0
    assert made == ["base model", "UCE"]
    assert "its stored images" in capsys.readouterr().err


def test_harness_reports_the_finished_rows_on_ctrl_c(random_toy, toy_backend):
    from unhype.evaluation.harness import EvalInterrupted, ToyGenerator, evaluate
    from unhype.evaluation.prompts import load_prompt_set
    from unhype.evaluation.rows import Slot
    from unhype.evaluation.zero_shot import load_classifier

    gen = ToyGenerator(toy_backend.toy, steps=2)
    ps = load_prompt_set("toy")
    clf = load_classifier("judge", ps.class_names, ps.class_prompts(), toy_weights=random_toy)
    saved = []

    def never():
        raise KeyboardInterrupt

    class Named(Method):
        name = "other"

    with pytest.raises(EvalInterrupted) as stop:
        evaluate(gen, [Method(), Slot("x", {}, "later", never), Named()], ps, ["circle"], clf,
                 per_class=1, batch_size=8, progress=False,
                 on_row=lambda slot, name, row, others: saved.append((name, len(others))))
    assert isinstance(stop.value, KeyboardInterrupt)
    assert list(stop.value.result["methods"]) == ["base model"]
    assert stop.value.missing == ["later", "other"]
    assert saved == [("base model", len(stop.value.result["sets"]["others"]))]


def test_a_damaged_hypernetwork_is_refused_before_any_row(random_toy, toy_hypernet_file,
                                                          tmp_path, counted, capsys):
    # rows are computed one by one now: a file that cannot load must still stop the run before
    # the first image, not after the earlier rows
    made, _ = counted
    from safetensors.torch import load_file, save_file

    from unhype.fileformat import read_header

    damaged = tmp_path / "damaged.safetensors"  # its header is fine: NaN weights
    tensors = load_file(str(toy_hypernet_file))
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(damaged), read_header(toy_hypernet_file)[0])
    out = tmp_path / "out"
    assert main(_args(random_toy, toy_hypernet_file, out, "--hypernet", str(damaged))) == 2
    assert "NaN/Inf values" in capsys.readouterr().err
    assert made == [] and not (out / "rows").exists()
