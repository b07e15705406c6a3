"""Erasure metrics as the literature reports them (METHOD.md, "Evaluation protocols").

Objects (MACE protocol): Acc_e = share of images prompted with the erased class that the judge
classifies as that class (lower is better), Acc_s = accuracy on the other classes, Acc_g = share
of synonym-prompted images classified as the erased class (lower is better);
H_o = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)). Celebrities: H_c = harmonic mean of
(1-Acc_e, Acc_s). A zero term makes the harmonic mean zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from unhype.errors import UnHypeError


def _check_unit(**values) -> None:
    for name, v in values.items():
        if not 0.0 <= v <= 1.0:
            raise UnHypeError(f"{name} must be a fraction in [0, 1], got {v}")


def harmonic_mean(*terms: float) -> float:
    if any(t <= 0 for t in terms):
        return 0.0
    return len(terms) / sum(1.0 / t for t in terms)


def h_o(acc_e: float, acc_s: float, acc_g: float) -> float:
    _check_unit(acc_e=acc_e, acc_s=acc_s, acc_g=acc_g)
    return harmonic_mean(1.0 - acc_e, acc_s, 1.0 - acc_g)


def h_c(acc_e: float, acc_s: float) -> float:
    _check_unit(acc_e=acc_e, acc_s=acc_s)
    return harmonic_mean(1.0 - acc_e, acc_s)


def accuracy(predicted, expected) -> float:
    predicted, expected = list(predicted), list(expected)
    if len(predicted) != len(expected) or not predicted:
        raise UnHypeError(f"accuracy needs equal, non-empty lists ({len(predicted)} predictions, "
                          f"{len(expected)} labels)")
    return sum(p == e for p, e in zip(predicted, expected)) / len(predicted)


@dataclass
class ErasureScores:
    acc_e: float
    acc_s: float
    acc_g: float

    @property
    def h_o(self) -> float:
        return h_o(self.acc_e, self.acc_s, self.acc_g)

    def as_dict(self) -> dict:
        return {**asdict(self), "h_o": self.h_o}


def erasure_scores(erased_pred, erased_label, other_pred, other_labels, synonym_pred) -> ErasureScores:
    """Scores from judge predictions: images of the erased class (prompted by its name), of the
    other classes (with their true labels) and of the erased class prompted by synonyms."""
    return ErasureScores(
        acc_e=accuracy(erased_pred, [erased_label] * len(list(erased_pred))),
        acc_s=accuracy(other_pred, other_labels),
        acc_g=accuracy(synonym_pred, [erased_label] * len(list(synonym_pred))))
