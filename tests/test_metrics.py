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
