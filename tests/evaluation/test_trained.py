"""A trained baseline (ESD-x/u, SPM) is kept in out/trained/ as soon as its training ends: a Ctrl-C
during its images, or a run that changes only how it is evaluated, does not train it again; a
damaged or mismatched file is refused and the baseline trained again."""

from __future__ import annotations

import json

import pytest

import unhype.baselines.esd as esd
import unhype.evaluation.harness as harness
from unhype.cli import main


@pytest.fixture
def trainings(monkeypatch):
    """The settings of every static-LoRA training run (ESD-x/u, SPM)."""
    runs = []
    real = esd.train_static_lora

    def train(backend, concepts, dims, s, *a, **k):
        runs.append((s.rank, s.steps, s.seed))
        return real(backend, concepts, dims, s, *a, **k)

    monkeypatch.setattr(esd, "train_static_lora", train)
    return runs


def _args(random_toy, out, *extra, baselines="esd_x,spm"):
    return ["eval", "--model", "toy", "--erase", "circle", "--toy_weights", str(random_toy),
            "--baselines", baselines, "--baseline_steps", "2", "--per_class", "1",
            "--steps", "2", "--batch_size", "8", "--classifier", "judge", "--out", str(out),
            *extra]


def _numbers(out):
    data = json.loads((out / "results.json").read_text())
    return {name: {k: v for k, v in row.items() if k != "seconds"}
            for name, row in data["methods"].items()}


def test_ctrl_c_during_a_baselines_images_keeps_its_training(random_toy, tmp_path, monkeypatch,
                                                              trainings, capsys):
    full, out = tmp_path / "full", tmp_path / "out"
    assert main(_args(random_toy, full)) == 0
    expected = _numbers(full)
    assert list(expected)[2] == "SPM (gated rank-1)" and len(trainings) == 2
    trainings.clear()

    real_generate = harness.generate

    def ctrl_c_on_spm(generator, method, *a, **k):  # SPM trained, its images under way
        if isinstance(method, esd.SPMMethod):
            raise KeyboardInterrupt
        return real_generate(generator, method, *a, **k)

    monkeypatch.setattr(harness, "generate", ctrl_c_on_spm)
    capsys.readouterr()
    assert main(_args(random_toy, out)) == 130
    err = capsys.readouterr().err
    assert len(trainings) == 2  # both trained in this run
    assert sorted(p.name for p in (out / "trained").iterdir()) == ["esd_x.safetensors",
                                                                  "spm.safetensors"]
    assert "missing: spm (baseline)" in err and "not trained again: spm" in err
    partial = json.loads((out / "results.json").read_text())
    assert partial["missing"] == ["spm (baseline)"]
    assert "trained weights of spm are kept" in (out / "results.md").read_text()

    monkeypatch.setattr(harness, "generate", real_generate)
    trainings.clear()
    assert main(_args(random_toy, out)) == 0
    err = capsys.readouterr().err
    assert trainings == []  # SPM loaded, not trained; ESD-x's row reused
    assert "spm: loaded its trained weights" in err
    assert _numbers(out) == expected  # the very numbers of the uninterrupted run
    assert "not trained again: spm" in (out / "results.md").read_text()

    assert main(_args(random_toy, out, "--force")) == 0  # --force trains everything again
    assert len(trainings) == 2 and "loaded its trained weights" not in capsys.readouterr().err
    assert _numbers(out) == expected


def test_only_training_settings_train_again(random_toy, tmp_path, trainings, capsys):
    out = tmp_path / "out"
    args = lambda *extra: _args(random_toy, out, *extra, baselines="esd_x")  # noqa: E731
    assert main(args()) == 0 and trainings == [(4, 2, 1234)]
    trainings.clear()
    capsys.readouterr()
    # evaluation settings only: the row is made again, with the stored weights
    assert main(args("--per_class", "2")) == 0
    err = capsys.readouterr().err
    assert "recomputing esd_x (baseline): its settings changed (per_class)" in err
    assert "esd_x: loaded its trained weights" in err and trainings == []
    # the eval seed is the training seed unless --baseline_seed fixes it
    assert main(args("--seed", "7", "--baseline_seed", "1234")) == 0
    assert trainings == [] and "loaded its trained weights" in capsys.readouterr().err
    assert main(args("--seed", "7")) == 0
    assert trainings == [(4, 2, 7)]
    assert "trained with other settings (settings.seed)" in capsys.readouterr().err
    trainings.clear()
    assert main(args("--seed", "7", "--baseline_steps", "3")) == 0
    assert trainings == [(4, 3, 7)]
    assert "trained with other settings (settings.steps)" in capsys.readouterr().err


def _tensors(path):
    from safetensors.torch import load_file

    return {k: v.tolist() for k, v in load_file(str(path)).items()}


def test_a_damaged_trained_file_is_refused_and_trained_again(random_toy, tmp_path, trainings,
                                                               capsys):
    out = tmp_path / "out"
    args = _args(random_toy, out, baselines="esd_x")
    assert main(args) == 0
    expected = _numbers(out)
    path, row = out / "trained" / "esd_x.safetensors", out / "rows" / "baseline_esd_x.json"
    good = path.read_bytes()
    (out / "good.safetensors").write_bytes(good)
    trainings.clear()

    def rerun():
        row.unlink()  # the row must be made again, so its weights are wanted
        capsys.readouterr()
        assert main(args) == 0
        assert _numbers(out) == expected
        return capsys.readouterr().err

    damaged = bytearray(good)
    damaged[-3] ^= 0xFF  # one weight's bits
    path.write_bytes(bytes(damaged))
    err = rerun()
    assert "training esd_x again" in err and "do not match their SHA-256" in err
    assert len(trainings) == 1 and _tensors(path) == _tensors(out / "good.safetensors")
    path.write_bytes(good[:100])  # cut short
    assert "cannot be read" in rerun() and len(trainings) == 2
    meta_flip = good.replace(b'"kind":"static"', b'"kind":"spm"   ')  # same size, other method
    assert meta_flip != good
    path.write_bytes(meta_flip)
    err = rerun()
    assert "do not match their SHA-256" in err and len(trainings) == 3
    assert "loaded its trained weights" in rerun() and len(trainings) == 3  # intact again


def test_stored_factors_must_fit_the_model(random_toy, toy_backend):
    from unhype.baselines.esd import StaticSettings, esd as train_esd
    from unhype.baselines.saved import from_tensors, to_tensors

    method = train_esd(toy_backend, ["circle"], "x", StaticSettings(steps=1))
    tensors, meta = to_tensors(method)
    again = from_tensors(tensors, meta, method.dims)
    assert again.name == method.name and again.settings() == method.settings()
    assert all((a == b).all() for a, b in zip(again.bank.parameters(), method.bank.parameters()))
    fewer = dict(list(method.dims.items())[1:])
    with pytest.raises(ValueError, match="layers"):
        from_tensors(tensors, meta, fewer)
    wider = {k: (i + 1, o) for k, (i, o) in method.dims.items()}
    with pytest.raises(ValueError, match="this model needs"):
        from_tensors(tensors, meta, wider)


def _compare(random_toy, out, *extra, baselines="esd_x"):
    """benchmarks/compare_methods.py on one target, baselines only, tiny settings."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from compare_methods import main as compare

    compare(["--targets", "circle", "--multi", "", "--variants", "", "--baselines", baselines,
             "--steps", "2", "--per-class", "1", "--batch-size", "8", "--threads", "1",
             "--toy-weights", str(random_toy), "--out", str(out), "--docs", "", *extra])


def _row(out, key="esd_x"):
    row = json.loads((out / "single-circle" / f"{key}.json").read_text())
    return {k: v for k, v in row.items() if k not in ("seconds", "train_seconds")}


def test_compare_methods_keeps_its_trained_baselines(random_toy, tmp_path, monkeypatch,
                                                     trainings, capsys):
    full, out = tmp_path / "full", tmp_path / "out"
    _compare(random_toy, full)
    expected = _row(full)
    assert len(trainings) == 1
    trainings.clear()

    real_evaluate = harness.evaluate

    def ctrl_c_on_esd(generator, methods, *a, **k):  # ESD-x trained, its images under way
        if isinstance(methods[0], esd.StaticLoraMethod):
            raise KeyboardInterrupt
        return real_evaluate(generator, methods, *a, **k)

    monkeypatch.setattr(harness, "evaluate", ctrl_c_on_esd)
    with pytest.raises(KeyboardInterrupt):
        _compare(random_toy, out)
    assert len(trainings) == 1 and not (out / "single-circle" / "esd_x.json").exists()
    assert (out / "single-circle" / "trained" / "esd_x.safetensors").is_file()

    monkeypatch.setattr(harness, "evaluate", real_evaluate)
    trainings.clear()
    capsys.readouterr()
    _compare(random_toy, out, baselines="esd_x,esd_x@2")  # another strength: the same weights
    err = capsys.readouterr().err
    assert trainings == [] and err.count("esd_x: loaded its trained weights") == 1
    assert _row(out) == expected  # the numbers of the uninterrupted run
    assert _row(out, "esd_x-x2")["name"] == "ESD-x (LoRA r4), strength 2"

    _compare(random_toy, out, "--per-class", "2")  # evaluation settings only: not trained
    err = capsys.readouterr().err
    assert "recomputing esd_x: its settings changed (per_class)" in err
    assert "esd_x: loaded its trained weights" in err and trainings == []

    _compare(random_toy, out, "--steps", "3")  # a training setting: trained again
    assert trainings == [(4, 3, 0)]
    assert "trained with other settings (settings.steps)" in capsys.readouterr().err
    page = tmp_path / "page.md"
    _compare(random_toy, out, "--steps", "3", "--force", "--docs", str(page),
             "--title", "Every class as the target")
    assert len(trainings) == 2 and "loaded its trained weights" not in capsys.readouterr().err
    text = page.read_text()  # a page of its own: its heading, not the main page's
    assert text.startswith("# Every class as the target\n") and '"title"' not in text


def test_compare_methods_keeps_its_unhype_files(random_toy, tmp_path, monkeypatch, capsys):
    """An UnHype variant is trained once per setting: its strength-2 row and a rerun evaluated
    another way load the file; a training setting (steps) trains it again."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import compare_methods

    calls = []
    real = compare_methods.train_unhype

    def counting(backend, concepts, spec, *a, **k):
        calls.append(spec)
        return real(backend, concepts, spec, *a, **k)

    monkeypatch.setattr(compare_methods, "train_unhype", counting)
    out, variants = tmp_path / "out", ["--variants", "per_layer/direct,per_layer/direct@2"]
    _compare(random_toy, out, *variants, baselines="")
    assert calls == ["per_layer/direct"]
    one = json.loads((out / "single-circle" / "unhype-per_layer-direct.json").read_text())
    two = json.loads((out / "single-circle" / "unhype-per_layer-direct-x2.json").read_text())
    assert two["name"] == one["name"] + ", strength 2"
    assert two["settings"]["per_class"] == 1

    capsys.readouterr()
    _compare(random_toy, out, *variants, "--per-class", "2", baselines="")
    assert calls == ["per_layer/direct"]  # evaluated again, not trained again
    assert "per_layer/direct: loaded" in capsys.readouterr().err
    again = json.loads((out / "single-circle" / "unhype-per_layer-direct.json").read_text())
    assert again["settings"]["per_class"] == 2

    _compare(random_toy, out, *variants, "--steps", "3", baselines="")
    assert calls == ["per_layer/direct"] * 2
    assert "was trained with other settings" in capsys.readouterr().err


def test_robustness_attacks_the_files_compare_methods_trained(random_toy, tmp_path, monkeypatch,
                                                              capsys):
    """benchmarks/robustness.py --trained-from: the baselines and UnHype files of a
    compare_methods run, single-concept and (--together) multi-concept, are attacked without
    training anything; other training settings train again and keep the result there."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import compare_methods
    import robustness

    import benchmarks.compare_methods  # the module robustness.py imports it as
    import unhype.baselines.registry as registry

    compare, calls = tmp_path / "compare", []
    real_build, real_train = registry.build, compare_methods.train_unhype

    def counting_build(name, *a, **k):
        calls.append(name)
        return real_build(name, *a, **k)

    def counting_train(backend, concepts, spec, *a, **k):
        calls.append(spec)
        return real_train(backend, concepts, spec, *a, **k)

    monkeypatch.setattr(registry, "build", counting_build)
    for module in (compare_methods, benchmarks.compare_methods):
        monkeypatch.setattr(module, "train_unhype", counting_train)
    _compare(random_toy, compare, "--variants", "per_layer/direct", "--multi", "circle,square")
    assert calls == ["esd_x", "per_layer/direct"] * 2  # single-circle, then multi-2
    calls.clear()

    def attack(out, *extra, steps="2"):
        robustness.main(["--steps", steps, "--baselines", "esd_x,esd_x@2",
                         "--variants", "per_layer/direct,per_layer/direct@2",
                         "--trained-from", str(compare), "--attack-prompts", "1",
                         "--attack-steps", "1", "--threads", "1",
                         "--toy-weights", str(random_toy), "--out", str(out), *extra])
        return json.loads((out / "robustness.json").read_text())["rows"]

    capsys.readouterr()
    single = attack(tmp_path / "single", "--target", "circle")
    assert calls == []  # every method loaded from the compare_methods run
    err = capsys.readouterr().err
    assert "per_layer/direct: loaded" in err and "esd_x: loaded" in err
    assert set(single) == {"base model", "ESD-x (LoRA r4)", "ESD-x (LoRA r4), strength 2",
                           "UnHype per_layer/direct (2 steps)",
                           "UnHype per_layer/direct (2 steps), strength 2"}

    together = attack(tmp_path / "multi", "--target", "circle,square", "--together",
                      "--h-o-from", str(compare / "summary.json"))
    assert calls == []  # the multi-2 files, loaded once for both targets
    assert set(together) == {"circle", "square"}
    assert set(together["circle"]) == set(single)
    table = (tmp_path / "multi" / "robustness.md").read_text()
    assert "all erased by one model" in table and "multi-concept H_o" in table

    attack(tmp_path / "three", "--target", "circle", steps="3")
    assert calls == ["esd_x", "per_layer/direct"]  # other steps: trained once, at both strengths
    kept = compare / "single-circle" / "unhype-per_layer-direct" / "trained-with.json"
    assert json.loads(kept.read_text())["steps"] == 3


def test_compare_methods_variant_with_its_own_steps(random_toy, tmp_path, monkeypatch, capsys):
    """'+sN' trains that variant for N steps whatever --steps says (a recipe such as
    toy_robust_attn needs more than the others): the file, its row name and its kept-file record
    say N, a rerun loads it, and robustness.py finds its H_o under either way of naming it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import compare_methods
    from robustness import main_table_names

    from unhype.fileformat import read_meta

    assert compare_methods.parse_variant("per_layer/direct+r4+sat+s800").steps == 800
    assert compare_methods.parse_variant("per_layer/direct+sat").steps == 0  # 'sat' is no steps
    calls = []
    real = compare_methods.train_unhype

    def counting(backend, concepts, spec, steps, *a, **k):
        calls.append((spec, steps))
        return real(backend, concepts, spec, steps, *a, **k)

    monkeypatch.setattr(compare_methods, "train_unhype", counting)
    out = tmp_path / "out"
    _compare(random_toy, out, "--variants", "per_layer/direct+s3", baselines="")
    folder = out / "single-circle" / "unhype-per_layer-direct-s3"
    assert read_meta(folder / "hypernet.safetensors").training["steps_done"] == 3
    assert json.loads((folder / "trained-with.json").read_text())["steps"] == 3
    row = json.loads((out / "single-circle" / "unhype-per_layer-direct-s3.json").read_text())
    assert row["name"] == "UnHype per_layer/direct, 3 steps"

    capsys.readouterr()
    _compare(random_toy, out, "--variants", "per_layer/direct+s3", "--per-class", "2",
             baselines="")
    assert len(calls) == 1 and "per_layer/direct+s3: loaded" in capsys.readouterr().err
    assert main_table_names("UnHype per_layer/direct (3 steps), strength 2") == [
        "UnHype per_layer/direct, strength 2", "UnHype per_layer/direct, 3 steps, strength 2"]


def test_robustness_together_trains_one_file_for_every_target(random_toy, tmp_path):
    """benchmarks/robustness.py --together without --trained-from: one hypernetwork erasing every
    target is trained (in --out/multi-<n>/) and attacked on each."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import robustness

    from unhype.fileformat import read_meta

    out = tmp_path / "out"
    robustness.main(["--target", "circle,square", "--together", "--steps", "2", "--baselines", "",
                     "--variants", "per_layer/direct", "--attack-prompts", "1",
                     "--attack-steps", "1", "--threads", "1", "--toy-weights", str(random_toy),
                     "--out", str(out)])
    files = sorted(out.rglob("hypernet.safetensors"))
    assert files == [out / "multi-2" / "unhype-per_layer-direct" / "hypernet.safetensors"]
    assert [c["target"] for c in read_meta(files[0]).concepts] == ["circle", "square"]
    rows = json.loads((out / "robustness.json").read_text())["rows"]
    assert set(rows) == {"circle", "square"}
    assert "UnHype per_layer/direct (2 steps)" in rows["square"]


def test_erased_quality_judges_the_files_compare_methods_trained(random_toy, tmp_path,
                                                                  monkeypatch, capsys):
    """benchmarks/erased_quality.py --trained-from: the erased images of the very files behind
    a compare_methods run's rows (their H_o the same, nothing trained or built), and a rerun
    that reads the saved rows instead of drawing again."""
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import erased_quality

    import benchmarks.compare_methods  # the module robustness.py imports it as
    import unhype.baselines.registry as registry
    import unhype.evaluation.harness as harness

    compare = tmp_path / "compare"
    _compare(random_toy, compare, "--variants", "per_layer/direct")
    calls = []
    monkeypatch.setattr(registry, "build", lambda name, *a, **k: calls.append(name))
    monkeypatch.setattr(benchmarks.compare_methods, "train_unhype",
                        lambda backend, concepts, spec, *a, **k: calls.append(spec))
    real_evaluate = harness.evaluate

    def counting_evaluate(gen, methods, *a, **k):
        calls.extend(m.name for m in methods)
        return real_evaluate(gen, methods, *a, **k)

    monkeypatch.setattr(harness, "evaluate", counting_evaluate)
    out = tmp_path / "quality"
    argv = ["--target", "circle", "--trained-from", str(compare), "--baselines",
            "esd_x,esd_x@2", "--variants", "per_layer/direct", "--steps", "2", "--per-class", "1",
            "--batch-size", "8", "--eval-seed", "1234", "--threads", "1",
            "--toy-weights", str(random_toy), "--out", str(out)]
    erased_quality.main(argv)
    names = ["base model", "ESD-x (LoRA r4)", "ESD-x (LoRA r4), strength 2",
             "UnHype per_layer/direct (2 steps)"]
    assert calls == names  # evaluated only: no baseline built, nothing trained
    rows = json.loads((out / "erased_quality.json").read_text())["rows"]["circle"]
    assert list(rows) == names
    for name, key in (("ESD-x (LoRA r4)", "esd_x"), ("base model", "base"),
                      ("UnHype per_layer/direct (2 steps)", "unhype-per_layer-direct")):
        kept = json.loads((compare / "single-circle" / f"{key}.json").read_text())
        assert rows[name]["h_o"] == pytest.approx(kept["h_o"])  # same files, same seed
    assert all(0 <= r["confidence"] <= 1 and r["n"] == 2 for r in rows.values())
    table = (out / "erased_quality.md").read_text()
    assert "| UnHype per_layer/direct (2 steps) |" in table
    assert (out / "erased-circle.png").stat().st_size > 0

    calls.clear()
    erased_quality.main(argv)  # every row saved: nothing drawn again, the same table
    assert calls == [] and (out / "erased_quality.md").read_text() == table
    erased_quality.main([*argv, "--eval-seed", "777"])  # rows of another seed: drawn again
    assert calls == names and "eval seed 777" in (out / "erased_quality.md").read_text()

    with pytest.raises(SystemExit):
        erased_quality.main(["--variants", "per_layer/direct", "--out", str(out)])
    assert "need --trained-from" in capsys.readouterr().err


def test_erased_quality_means_over_targets_leave_out_a_method_one_lacks():
    import sys
    from argparse import Namespace
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from erased_quality import mean_table

    def row(conf, share, e=0.0):
        return {"h_o": 0.99, "acc_e": e, "acc_g": 0.0, "confidence": conf, "confident": share}

    rows = {"circle": {"base model": row(0.998, 1.0, 1.0), "SPM": row(0.9, 0.5)},
            "square": {"base model": row(0.996, 1.0, 1.0), "SPM": row(0.7, 0.25),
                       "ESD": row(0.5, 0.0)}}
    table = mean_table(Namespace(eval_seed=1234, per_class=50, steps=400), rows)
    assert "Erased images over circle, square (one model per target)" in table
    assert "| SPM | 99.0 | 0 | 0 | 0.800 | 38% |" in table
    assert "| base model | 99.0 | 100 | 0 | 0.997 | 100% |" in table
    assert "ESD" not in table
