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
