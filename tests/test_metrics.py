"""Erasure metrics: known inputs give known H_o / H_c."""

import pytest

from unhype.errors import UnHypeError
from unhype.evaluation.metrics import erasure_scores, h_c, h_o


def test_h_o_known_values():
    assert h_o(0.0, 1.0, 0.0) == pytest.approx(1.0)
    # 3 / (1/0.9 + 1/0.9 + 1/0.9) = 0.9
    assert h_o(0.1, 0.9, 0.1) == pytest.approx(0.9)
    # 3 / (1/0.5 + 1/1 + 1/0.75) = 3 / 4.3333 = 0.6923
    assert h_o(0.5, 1.0, 0.25) == pytest.approx(3 / (2 + 1 + 4 / 3))
    assert h_o(1.0, 1.0, 0.0) == 0.0  # nothing erased: the mean collapses
    assert h_c(0.2, 0.8) == pytest.approx(0.8)


def test_scores_from_predictions():
    s = erasure_scores(["circle", "square", "square", "square"], "circle",
                       ["square", "star", "star"], ["square", "star", "heart"],
                       ["circle", "oval"])
    assert (s.acc_e, s.acc_s, s.acc_g) == (0.25, pytest.approx(2 / 3), 0.5)
    assert s.as_dict()["h_o"] == pytest.approx(h_o(0.25, 2 / 3, 0.5))


def test_bad_values_refused():
    with pytest.raises(UnHypeError, match="fraction"):
        h_o(1.2, 0.5, 0.1)
    with pytest.raises(UnHypeError, match="equal"):
        erasure_scores([], "circle", ["a"], ["a"], ["a"])


def test_h_o_interval_covers_the_point_and_narrows_with_more_images():
    from unhype.evaluation.metrics import h_o_interval

    row = {"acc_e": 0.1, "acc_s": 0.9, "acc_g": 0.2}
    point = h_o(0.1, 0.9, 0.2)
    small = h_o_interval([{**row, "n_e": 10, "n_s": 90, "n_g": 10}])
    large = h_o_interval([{**row, "n_e": 1000, "n_s": 9000, "n_g": 1000}])
    assert small[0] < point < small[1] and large[0] < point < large[1]
    assert large[1] - large[0] < 0.25 * (small[1] - small[0])
    assert large[1] - large[0] < 0.05
    assert h_o_interval([{**row, "n_e": 10, "n_s": 90, "n_g": 10}]) == small  # seeded


def test_h_o_interval_is_not_a_point_at_zero_errors():
    """0 of 10 erased images showing the concept does not prove a rate of 0: the interval of a
    perfect score still reaches below 1, and below that of a perfect score on 100 images."""
    from unhype.evaluation.metrics import h_o_interval

    perfect = {"acc_e": 0.0, "acc_s": 1.0, "acc_g": 0.0}
    lo10, hi10 = h_o_interval([{**perfect, "n_e": 10, "n_s": 90, "n_g": 10}])
    lo100, _ = h_o_interval([{**perfect, "n_e": 100, "n_s": 900, "n_g": 100}])
    assert hi10 == 1.0 and lo10 < 0.97 and lo10 < lo100  # contains the observed 1.0


def test_h_o_interval_of_a_mean_over_settings():
    from unhype.evaluation.metrics import h_o_interval

    a = {"acc_e": 0.0, "acc_s": 1.0, "acc_g": 0.0, "n_e": 50, "n_s": 450, "n_g": 50}
    b = {"acc_e": 0.5, "acc_s": 0.5, "acc_g": 0.5, "n_e": 50, "n_s": 450, "n_g": 50}
    lo, hi = h_o_interval([a, b])
    assert lo < (h_o(0, 1, 0) + h_o(0.5, 0.5, 0.5)) / 2 < hi
    with pytest.raises(UnHypeError, match="n_e"):
        h_o_interval([{**a, "n_e": 0}])
    with pytest.raises(UnHypeError):
        h_o_interval([])


def test_paired_change_known_values():
    import torch

    from unhype.evaluation.metrics import paired_change

    ref = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert paired_change(ref.clone(), ref) == {"change_s": 0.0, "kept_s": 1.0}
    moved = ref.clone()
    moved[0] = (ref[0] + 0.9 / 255).clamp(0, 1)  # under a level: at most one 8-bit level away
    moved[1].fill_(0.5)
    moved[2, 0, 3, 3] = (ref[2, 0, 3, 3] + 3 / 255).clamp(max=1)  # one pixel, three levels
    ref2 = ref.clone()
    ref2[1].fill_(0.5 - 4 / 255)  # image 1 differs by exactly 4 levels everywhere
    out = paired_change(moved, ref2)
    assert out["kept_s"] == 0.5  # images 0 and 3; 2 has one pixel three levels away
    # mean |d| in levels over all four images
    d = [float((moved[i] - ref2[i]).abs().mean() * 255) for i in range(4)]
    assert d[1] == pytest.approx(4, abs=1e-4) and d[3] == 0
    assert out["change_s"] == pytest.approx(sum(d) / 4, abs=1e-4)
    with pytest.raises(UnHypeError, match="shape"):
        paired_change(ref[:2], ref)
    bad = ref.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(UnHypeError, match="NaN"):
        paired_change(bad, ref)


def test_h_o_ceiling_is_full_erasure_at_the_base_models_specificity():
    from unhype.evaluation.metrics import h_o_ceiling

    # base Acc_s 0.984 (the toy benchmark's): 3 / (1 + 1/0.984 + 1)
    assert h_o_ceiling(0.984) == pytest.approx(3 / (2 + 1 / 0.984))
    assert h_o_ceiling(0.984) == pytest.approx(0.99461, abs=1e-5)
    assert h_o_ceiling(1.0) == 1.0
    # any miss on an erased or synonym image puts a method below it
    assert h_o(0.02, 0.984, 0.0) < h_o_ceiling(0.984)


def test_goal_lines_name_the_baselines_at_the_ceiling():
    """compare_methods' goal line says when a baseline already sits at the ceiling, so "above
    every baseline" cannot be reached by a method that leaves other images alone."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_methods import goals

    def row(e, s, g):
        return {"acc_e": e, "acc_s": s, "acc_g": g, "h_o": h_o(e, s, g)}

    per_target = [{"base model": row(1.0, 0.98, 1.0), "SPM": row(0.0, 0.98, 0.0),
                   "UnHype x": row(0.02, 0.98, 0.0)},
                  {"base model": row(1.0, 0.96, 1.0), "SPM": row(0.04, 0.96, 0.0),
                   "UnHype x": row(0.0, 0.96, 0.0)}]
    single = {n: {k: sum(r[n][k] for r in per_target) / 2 for k in per_target[0][n]}
              for n in per_target[0]}
    (line,) = goals(single, None, per_target)
    assert "NOT above every baseline" not in line and "above every baseline" in line
    assert "ceiling" not in line  # SPM misses more: nobody sits at the ceiling
    per_target[1]["SPM"] = row(0.0, 0.96, 0.0)
    single["SPM"] = {k: (per_target[0]["SPM"][k] + per_target[1]["SPM"][k]) / 2
                     for k in per_target[0]["SPM"]}
    (line,) = goals(single, None, per_target)
    top = (h_o(0, 0.98, 0) + h_o(0, 0.96, 0)) / 2
    assert "NOT above every baseline" in line
    assert f"SPM at the ceiling H_o {100 * top:.1f}" in line
    gap = 100 * (top - single["UnHype x"]["h_o"])
    assert f"this row is {gap:.1f} below it" in line


def test_rate_interval_matches_the_jeffreys_quantiles_and_its_ends():
    """Attack success rates: Beta(k + 1/2, n - k + 1/2) quantiles (reference values from
    scipy.stats.beta.ppf), 0 as the lower end at k = 0, 1 as the upper at k = n."""
    from unhype.evaluation.metrics import rate_interval

    lo, hi = rate_interval(20, 48)
    assert lo == pytest.approx(0.2854, abs=0.004) and hi == pytest.approx(0.5576, abs=0.004)
    lo, hi = rate_interval(5, 10)
    assert lo == pytest.approx(0.2235, abs=0.005) and hi == pytest.approx(0.7765, abs=0.005)
    assert rate_interval(0, 48)[0] == 0.0 and 0.0 < rate_interval(0, 48)[1] < 0.06
    assert rate_interval(48, 48)[1] == 1.0 and 0.94 < rate_interval(48, 48)[0] < 1.0
    # more attacks, same rate: narrower
    small, large = rate_interval(20, 48), rate_interval(60, 144)
    assert large[1] - large[0] < small[1] - small[0]
    for k, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(UnHypeError, match="rate"):
            rate_interval(k, n)


def test_robustness_pools_attacks_over_targets():
    """benchmarks/robustness.py's table over targets: shares averaged, attacks summed with their
    interval, a method missing on one target left out."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from robustness import pooled

    from unhype.evaluation.metrics import rate_interval

    def row(name, asr_hits, attacked):
        return {"name": name, "paraphrase": 0.5, "typo": 0.0, "attacked": attacked,
                "adv_hits": asr_hits, "asr": asr_hits / attacked}
    rows = {"circle": {"spm": row(0.0, 24, 48), "esd": row(0.0, 0, 48)},
            "square": {"spm": row(0.5, 12, 40), "esd": row(0.0, 0, 40)},
            "triangle": {"spm": row(0.25, 0, 48)}}
    r = pooled(rows, "spm")
    assert r["name"] == pytest.approx(0.25) and r["paraphrase"] == pytest.approx(0.5)
    assert (r["adv_hits"], r["attacked"]) == (36, 136)
    assert r["asr"] == pytest.approx(36 / 136)
    assert r["asr_interval"] == rate_interval(36, 136)
    assert r["per_target"] == {"circle": 0.5, "square": 0.3, "triangle": 0.0}
    assert pooled(rows, "esd") is None


def test_compare_methods_keeps_two_generality_protocols_apart(tmp_path, capsys):
    """A folder of rows measured on synonyms (MACE) refuses a run with the harder generality
    set, before any model loads; an unknown kind is refused too."""
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_methods import main

    (tmp_path / "single-circle").mkdir()
    (tmp_path / "single-circle" / "base.json").write_text("{}")  # a legacy row: synonyms
    hard = ["--out", str(tmp_path), "--generality", "synonyms,paraphrases,misspellings"]
    with pytest.raises(SystemExit):
        main(hard)
    assert "holds rows measured with --generality synonyms" in capsys.readouterr().err
    (tmp_path / "settings.json").write_text('{"generality": ["synonyms", "paraphrases", '
                                            '"misspellings"]}')
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])  # now the folder is the harder protocol's
    assert "--generality synonyms,paraphrases,misspellings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "new"), "--generality", "typos"])
    assert "'typos' is not one of synonyms" in capsys.readouterr().err


def test_compare_methods_averages_acc_g_per_kind_only_where_every_target_has_it():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_methods import mean_rows

    def row(e, s, g, **kinds):
        return {"acc_e": e, "acc_s": s, "acc_g": g, "h_o": h_o(e, s, g),
                "n_e": 50, "n_s": 450, "n_g": 50, **kinds}

    per_target = [{"SPM": row(0, 0.98, 0.2, acc_g_paraphrases=0.4, acc_g_misspellings=0.2),
                   "old": row(0, 0.98, 0.1)},
                  {"SPM": row(0, 0.98, 0.3, acc_g_paraphrases=0.6, acc_g_misspellings=0.3),
                   "old": row(0, 0.98, 0.1, acc_g_paraphrases=0.0)}]
    out = mean_rows(per_target)
    assert out["SPM"]["acc_g_paraphrases"] == 0.5 and out["SPM"]["acc_g_misspellings"] == 0.25
    assert "acc_g_paraphrases" not in out["old"]  # one target lacks it: no mean of one


def test_compare_methods_names_a_multi_concept_run_of_the_harder_set(tmp_path):
    """--multi-also on a folder measured with the harder generality set says so, and gives
    Acc_g per kind; a MACE folder's section stays as it was."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_methods import multi_section

    def folder(name, generality, **kinds):
        out = tmp_path / name
        (out / "multi-5").mkdir(parents=True)
        (out / "settings.json").write_text(json.dumps(
            {"steps": 400, "per_class": 50, "generality": generality, "eval_seed": 1234}))
        for method, g in (("base model", 0.9), ("SPM", 0.3), ("UnHype", 0.05)):
            row = {"name": method, "acc_e": g, "acc_s": 0.98, "acc_g": g,
                   "h_o": h_o(g, 0.98, g), **{f"acc_g_{k}": g * v for k, v in kinds.items()}}
            (out / "multi-5" / f"{method}.json").write_text(json.dumps(row))
        return out

    hard = "\n".join(multi_section(folder("hard", ["synonyms", "composites"], synonyms=0.5,
                                          composites=1.5), 50, 10))
    assert "## Multi-concept, 400 steps for every trained method, harder generality set" in hard
    assert "prompted by synonyms (never trained on), the name beside a class not erased" in hard
    assert "| method | synonyms | composites |" in hard and "| SPM | 15.0 | 45.0 |" in hard
    mace = "\n".join(multi_section(folder("mace", ["synonyms"]), 50, 10))
    assert "harder" not in mace and "per kind" not in mace


def test_compare_methods_single_also_averages_over_that_runs_own_targets(tmp_path):
    """--single-also on a run over more targets than the main table's (e.g. every class) gives
    the mean over all of its targets, names them, and leaves out a method one of them lacks."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_methods import section_targets, single_section

    out = tmp_path / "all"
    (out).mkdir()
    (out / "settings.json").write_text(json.dumps(
        {"steps": 400, "per_class": 50, "generality": ["synonyms"], "eval_seed": 1234, "seed": 0}))
    leaks = {"circle": 0.0, "square": 0.0, "triangle": 0.0, "star": 0.4}
    for target, leak in leaks.items():
        folder = out / f"single-{target}"
        folder.mkdir()
        for method, e in (("base model", 1.0), ("SPM", leak), ("UnHype", 0.0)):
            row = {"name": method, "acc_e": e, "acc_s": 0.98, "acc_g": e, "h_o": h_o(e, 0.98, e)}
            (folder / f"{method}.json").write_text(json.dumps(row))
        if target != "star":  # a method without a row for every target
            (folder / "ESD.json").write_text(json.dumps(
                {"name": "ESD", "acc_e": 0.0, "acc_s": 0.5, "acc_g": 0.0, "h_o": h_o(0, 0.5, 0)}))
    main_targets = ["circle", "square", "triangle"]
    assert section_targets(out, main_targets) == ["circle", "square", "triangle", "star"]
    text = "\n".join(single_section(out, main_targets, 50, 10))
    assert "## Single concept, 400 steps for every trained method, 4 targets (all)" in text
    assert "Mean over circle, square, triangle, star;" in text
    # which seeds: a section on the validation seed or another training seed says so
    assert "eval seed 1234, training seed 0;" in text
    (out / "settings.json").write_text(json.dumps(
        {"steps": 400, "per_class": 50, "generality": ["synonyms"], "eval_seed": 777, "seed": 2}))
    assert "eval seed 777, training seed 2;" in "\n".join(single_section(out, main_targets, 50, 10))
    spm = next(line for line in text.splitlines() if line.startswith("| SPM |"))
    assert f"| {100 * sum(h_o(e, 0.98, e) for e in leaks.values()) / 4:.1f} |" in spm
    assert "| ESD |" not in text
    # a folder over the main table's targets keeps its heading as before
    for p in (out / "single-star").glob("*"):
        p.unlink()
    (out / "single-star").rmdir()
    text = "\n".join(single_section(out, main_targets, 50, 10))
    assert "every trained method (all)" in text and "| ESD |" in text


def test_compare_methods_over_seeds_tabulates_each_training_seed(tmp_path):
    """--over-seeds: per-seed means over the same targets, their mean and range, and in how many
    seeds an UnHype row is strictly above every baseline; runs evaluated differently are
    refused."""
    import json
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_methods import seeds_section

    leaks = {0: (0.0, 0.02), 1: (0.04, 0.02), 2: (0.0, 0.0)}  # seed: (UnHype's, SPM's Acc_e)
    dirs = []
    for seed, (mine, theirs) in leaks.items():
        out = tmp_path / f"seed{seed}"
        dirs.append(out)
        out.mkdir()
        (out / "settings.json").write_text(json.dumps(
            {"steps": 400, "per_class": 50, "generality": ["synonyms"], "eval_seed": 1234,
             "seed": seed}))
        for target in ("circle", "ring"):
            folder = out / f"single-{target}"
            folder.mkdir()
            for method, e in (("base model", 1.0), ("SPM", theirs), ("UnHype x", mine)):
                row = {"name": method, "acc_e": e, "acc_s": 0.98, "acc_g": e,
                       "h_o": h_o(e, 0.98, e)}
                (folder / f"{method}.json").write_text(json.dumps(row))
    text = "\n".join(seeds_section(dirs, ["circle", "ring"], 50, 10))
    assert "## Single concept over training seeds 0, 1, 2 (seed0, seed1, seed2)" in text
    assert "| method | H_o, seed 0 | H_o, seed 1 | H_o, seed 2 | mean | range |" in text
    row = next(line for line in text.splitlines() if line.startswith("| UnHype x |"))
    ours = [h_o(e, 0.98, e) for e, _ in leaks.values()]
    assert f"| {100 * sum(ours) / 3:.1f} | {100 * min(ours):.1f}-{100 * max(ours):.1f} |" in row
    # above SPM in seed 0 only: seed 1 below, seed 2 equal (not strictly above)
    assert row.endswith("| 1 of 3 |")
    assert next(line for line in text.splitlines() if line.startswith("| SPM |")).endswith("|  |")
    (dirs[2] / "settings.json").write_text(json.dumps(
        {"steps": 400, "per_class": 50, "generality": ["synonyms"], "eval_seed": 777, "seed": 2}))
    with pytest.raises(SystemExit, match="evaluated differently"):
        seeds_section(dirs, ["circle", "ring"], 50, 10)
