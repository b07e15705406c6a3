"""NudeNet counts and FID (offline feature extractors) of `unhype eval`, and both in a smoke run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import tiny_open_clip
from unhype.errors import UnHypeError
from unhype.evaluation import extras


def _toy_images(shape: str, n: int, seed: int) -> torch.Tensor:
    from unhype.toy import data

    rng = np.random.default_rng(seed)
    imgs = [data.render(shape, data.COLOURS[i % len(data.COLOURS)], rng) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _folder(tmp_path: Path, name: str, images: torch.Tensor) -> Path:
    extras._save_pngs(images, tmp_path / name)
    return tmp_path / name


def test_exposed_names_are_the_installed_nudenets_labels():
    import nudenet

    source = (Path(nudenet.__file__).parent / "nudenet.py").read_text()
    labels = re.findall(r'"([A-Z_]+)"', source.split("__labels = [", 1)[1].split("]", 1)[0])
    assert len(labels) == 18
    assert set(extras.EXPOSED) == {lab for lab in labels if lab.endswith("_EXPOSED")}


def test_nudenet_detector_runs_on_plain_and_noise_images():
    measure, note = extras.nudenet_extra()
    assert measure is not None and "0.6" in note
    g = torch.Generator().manual_seed(0)
    images = {"erased": torch.cat([torch.rand(2, 3, 64, 64, generator=g),
                                   torch.full((1, 3, 64, 64), 0.5)]),
              "others": torch.zeros(1, 3, 16, 16), "synonyms": torch.empty(0, 3, 16, 16)}
    out = measure(images, {})
    assert out["nudenet_erased"] == 0 and out["nudenet_others"] == 0
    assert out["nudenet_erased_by_class"] == {} and "nudenet_synonyms" not in out


def test_nudenet_counts_exposed_parts_at_the_threshold():
    per_image = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.61}, {"class": "FEET_EXPOSED", "score": 0.6},
         {"class": "BELLY_EXPOSED", "score": 0.599}, {"class": "FEMALE_BREAST_COVERED", "score": 0.9}],
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.95}, {"class": "FACE_FEMALE", "score": 0.99}],
        [],
    ]
    calls = []

    class FakeDetector:
        def detect(self, path):
            calls.append(path)
            return per_image[(len(calls) - 1) % 3]

    measure, _ = extras.nudenet_extra(detector=FakeDetector())
    out = measure({"erased": torch.rand(3, 3, 8, 8), "others": torch.rand(3, 3, 8, 8)}, {})
    assert len(calls) == 6 and all(c.endswith(".png") for c in calls)
    assert out["nudenet_erased"] == out["nudenet_others"] == 3
    assert out["nudenet_erased_by_class"] == {"FEET_EXPOSED": 1, "FEMALE_BREAST_EXPOSED": 2}
    assert extras.count_exposed(per_image[0], 0.5) == {"FEMALE_BREAST_EXPOSED": 1,
                                                       "FEET_EXPOSED": 1, "BELLY_EXPOSED": 1}
    assert extras.count_exposed(per_image[0], 0.7) == {}


def test_real_nudenet_with_the_real_detect_is_monkeypatchable(monkeypatch):
    """The real detector class, its `detect` replaced: the path through NudeDetector() works."""
    import nudenet

    monkeypatch.setattr(nudenet.NudeDetector, "detect",
                        lambda self, path: [{"class": "BUTTOCKS_EXPOSED", "score": 0.6}])
    measure, _ = extras.nudenet_extra()
    assert measure({"erased": torch.rand(2, 3, 8, 8)}, {})["nudenet_erased"] == 2


def test_fid_toy_clip_same_class_small_other_class_large(tmp_path):
    torch.manual_seed(0)
    features = extras.toy_clip_features()
    circles_a = _folder(tmp_path, "circles_a", _toy_images("circle", 48, 1))
    circles_b = _folder(tmp_path, "circles_b", _toy_images("circle", 48, 2))
    squares = _folder(tmp_path, "squares", _toy_images("square", 48, 3))
    self_fid = extras.fid_folders(circles_a, circles_a, features)
    same = extras.fid_folders(circles_a, circles_b, features)
    other = extras.fid_folders(circles_a, squares, features)
    print(f"toy_clip FID: self {self_fid:.4g}, circles/circles {same:.3f}, "
          f"circles/squares {other:.3f}")
    assert abs(self_fid) < 1e-3
    assert other > 3 * same > 0
    # the extra on generated tensors equals the folder computation (8-bit quantised)
    measure, note = extras.fid_extra(str(circles_b), "toy_clip", features)
    assert "toy CLIP" in note
    out = measure({"others": _toy_images("circle", 48, 1)}, {})
    assert out["fid_others"] == pytest.approx(same, rel=1e-6)
    assert measure({"others": torch.rand(1, 3, 16, 16)}, {})["fid_others"] is None


def _tiny_open_clip(tmp_path: Path) -> tuple[Path, Path]:
    """(config .json, local .safetensors weights) of a tiny random open_clip model."""
    return tiny_open_clip(tmp_path, "tiny-clip-fid", "w.safetensors", seed=0)


def test_fid_open_clip_tower_from_local_safetensors(tmp_path):
    config, weights = _tiny_open_clip(tmp_path)
    features = extras.open_clip_features(str(config), str(weights))
    assert features.num_features == 16
    a = _folder(tmp_path, "a", _toy_images("circle", 24, 1))
    b = _folder(tmp_path, "b", _toy_images("square", 24, 2))
    self_fid, other = extras.fid_folders(a, a, features), extras.fid_folders(a, b, features)
    print(f"open_clip (tiny, random) FID: self {self_fid:.3g}, circles/squares {other:.4g}")
    assert abs(self_fid) < 1e-3 and other > 0


def test_fid_clean_fid_default_path(tmp_path, monkeypatch):
    """clean-fid (not installed in tests: it downloads Inception) called as its API expects;
    a failure (no network) leaves fid_others None with the reason, not a crash."""
    import importlib.machinery
    import sys
    import types

    calls = []

    def compute_fid(fdir1, fdir2, **kw):
        calls.append((fdir1, fdir2, kw, len(list(Path(fdir1).glob("*.png")))))
        if len(calls) > 1:
            raise OSError("no network")
        return 12.5

    module = types.ModuleType("cleanfid")
    module.__spec__ = importlib.machinery.ModuleSpec("cleanfid", None)
    module.fid = types.SimpleNamespace(compute_fid=compute_fid)
    monkeypatch.setitem(sys.modules, "cleanfid", module)
    ref = _folder(tmp_path, "ref", torch.rand(3, 3, 8, 8))
    measure, note = extras.fid_extra(str(ref), "inception")
    assert "clean-fid" in note
    assert measure({"others": torch.rand(4, 3, 8, 8)}, {}) == {"fid_others": 12.5}
    fdir1, fdir2, kw, n = calls[0]
    assert fdir2 == str(ref) and n == 4
    # keyword names of cleanfid.fid.compute_fid (clean-fid 0.1.35)
    assert kw == {"mode": "clean", "num_workers": 0, "verbose": False,
                  "device": torch.device("cpu")}
    out = measure({"others": torch.rand(4, 3, 8, 8)}, {})
    assert out["fid_others"] is None and "no network" in out["fid_error"]

    from unhype.evaluation.cli import default_fid_extractor

    assert default_fid_extractor(True) == "inception"
    monkeypatch.delitem(sys.modules, "cleanfid")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert default_fid_extractor(True) == "toy_clip" and default_fid_extractor(False) == "open_clip"
    assert extras.fid_extra(str(ref), "inception")[0] is None


def test_fid_reference_errors(tmp_path):
    with pytest.raises(UnHypeError, match="no such folder"):
        extras.fid_extra(str(tmp_path / "missing"), "toy_clip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UnHypeError, match="at least 2 reference images.*found 0"):
        extras.fid_extra(str(tmp_path / "empty"), "toy_clip")
    one = _folder(tmp_path, "one", torch.rand(1, 3, 8, 8))
    with pytest.raises(UnHypeError, match="found 1"):
        extras.reference_images(one)
    bad = _folder(tmp_path, "bad", torch.rand(2, 3, 8, 8))
    (bad / "00001.png").write_bytes(b"not a png")
    with pytest.raises(UnHypeError, match="not a readable image"):
        extras.load_images(extras.reference_images(bad))
    assert extras.fid_extra(None) == (None, None)


def test_unhype_eval_with_nudenet_and_offline_fid(random_toy, tmp_path, capsys):
    from unhype.cli import main

    ref = _folder(tmp_path, "ref", _toy_images("square", 8, 0))
    out = tmp_path / "eval"
    args = ["eval", "--model", "toy", "--erase", "circle", "--toy_weights", str(random_toy),
            "--per_class", "1", "--steps", "2", "--batch_size", "16", "--classifier", "judge",
            "--nudenet", "--fid_reference", str(ref), "--fid_extractor", "toy_clip",
            "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    row = data["methods"]["base model"]
    assert row["nudenet_erased"] == 0 and row["nudenet_others"] == 0
    assert isinstance(row["fid_others"], float) and row["fid_others"] > 0
    assert any("NudeNet" in n for n in data["notes"]) and any("FID" in n for n in data["notes"])
    assert data["settings"]["fid_extractor"] == "toy_clip"
    md = (out / "results.md").read_text()
    assert "FID (others)" in md and "NudeNet exposed (erased)" in md
    capsys.readouterr()
    # a bad reference folder stops the run before any image is made
    bad = list(args)
    bad[bad.index(str(ref))], bad[-1] = str(tmp_path / "nope"), str(tmp_path / "eval2")
    assert main(bad) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "eval2").exists()
    i = args.index("toy_clip")
    assert main(args[:i] + ["open_clip"] + args[i + 1:]) == 2  # the judge is no open_clip
    assert "needs an open_clip --classifier" in capsys.readouterr().err


def test_unhype_eval_fid_with_the_classifiers_open_clip_tower(random_toy, tmp_path, capsys):
    from unhype.cli import main

    config, weights = _tiny_open_clip(tmp_path)
    ref = _folder(tmp_path, "ref", _toy_images("square", 8, 0))
    out = tmp_path / "eval"
    assert main(["eval", "--model", "toy", "--erase", "circle", "--toy_weights", str(random_toy),
                 "--per_class", "1", "--steps", "2", "--batch_size", "16",
                 "--classifier", str(config), "--clip_weights", str(weights),
                 "--fid_reference", str(ref), "--fid_extractor", "open_clip",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["methods"]["base model"]["fid_others"] > 0
    assert any("open_clip" in n and "FID" in n for n in data["notes"])
