"""Erasure metrics as the literature reports them (METHOD.md, "Evaluation protocols").

Objects (MACE protocol): Acc_e = share of images prompted with the erased class that the judge
classifies as that class (lower is better), Acc_s = accuracy on the other classes, Acc_g = share
of synonym-prompted images classified as the erased class (lower is better);
H_o = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)). Celebrities: H_c = harmonic mean of
(1-Acc_e, Acc_s). A zero term makes the harmonic mean zero.

Beside the classifier, `paired_change` says how far a method moved the images it should have
left alone: each other-class image against the unmodified model's image of the same prompt and
seed (a classifier only notices a change that flips the class).
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


def h_o_ceiling(base_acc_s: float) -> float:
    """The H_o of a method that erases fully (Acc_e = Acc_g = 0) and leaves every other-class
    image as the base model draws it (Acc_s = the base model's): the most a method that leaves
    unrelated images alone can score. Only a method that changes other-class images, and so
    happens to fix some the classifier got wrong, can be above it."""
    return h_o(0.0, base_acc_s, 0.0)


def h_c(acc_e: float, acc_s: float) -> float:
    _check_unit(acc_e=acc_e, acc_s=acc_s)
    return harmonic_mean(1.0 - acc_e, acc_s)


def paired_change(images, reference) -> dict:
    """How much `images` [N, C, H, W] in [0, 1] differ from `reference` (the unmodified model's
    images of the same prompts and seeds): `change_s`, the mean absolute difference in 8-bit
    levels (0-255), and `kept_s`, the share of images in which no pixel, saved as 8-bit, moves
    by more than one level (a float change too small to see still flips some roundings by one)."""
    import torch

    if images.shape != reference.shape or not len(images):
        raise UnHypeError(f"paired change needs images of one non-empty shape, got "
                          f"{tuple(images.shape)} and {tuple(reference.shape)}")
    if not (torch.isfinite(images).all() and torch.isfinite(reference).all()):
        raise UnHypeError("paired change: the images hold NaN or inf")
    a, b = images.float().clamp(0, 1), reference.float().clamp(0, 1).to(images.device)
    levels = ((a * 255).round() - (b * 255).round()).abs().flatten(1).amax(1)
    return {"change_s": float((a - b).abs().mean() * 255),
            "kept_s": float((levels <= 1).float().mean())}


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


def rate_interval(k: int, n: int, level: float = 0.95, draws: int = 20000,
                  seed: int = 0) -> tuple[float, float]:
    """Jeffreys interval of a rate seen k times in n (e.g. an attack success rate): quantiles of
    draws from Beta(k + 1/2, n - k + 1/2) as in `h_o_interval`, with the lower end 0 at k = 0
    and the upper 1 at k = n (Brown, Cai & DasGupta 2001). Two methods whose intervals overlap
    are not told apart."""
    import numpy as np

    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise UnHypeError(f"a rate needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p = np.random.default_rng(seed).beta(k + 0.5, n - k + 0.5, draws)
    tail = (1 - level) / 2
    lo = 0.0 if k == 0 else float(np.quantile(p, tail))
    hi = 1.0 if k == n else float(np.quantile(p, 1 - tail))
    return lo, hi


def h_o_interval(settings: list[dict], level: float = 0.95, draws: int = 4000,
                 seed: int = 0) -> tuple[float, float]:
    """Credible interval of the mean H_o over `settings` (e.g. the three single-concept targets).

    Each setting: {"acc_e", "n_e", "acc_s", "n_s", "acc_g", "n_g"} (accuracies and image
    counts). Every accuracy is drawn from its Jeffreys posterior Beta(k + 1/2, n - k + 1/2),
    which, unlike resampling the counts, is not a point when 0 of n images show the concept; H_o
    is computed per draw and averaged over the settings. As with Jeffreys intervals at 0 of n or
    n of n (Brown, Cai & DasGupta 2001), the interval is widened to contain the observed H_o,
    which a posterior draw can only fall below when every image was right. With 10 images per
    class one image moves an accuracy by 10 points: two methods whose intervals overlap are not
    told apart."""
    import numpy as np

    if not settings:
        raise UnHypeError("no settings to compute an H_o interval over")
    rng = np.random.default_rng(seed)
    total, observed = np.zeros(draws), 0.0
    for s in settings:
        terms = []
        for key, flip in (("e", True), ("s", False), ("g", True)):
            acc, n = float(s[f"acc_{key}"]), int(s[f"n_{key}"])
            _check_unit(**{f"acc_{key}": acc})
            if n < 1:
                raise UnHypeError(f"n_{key} must be >= 1, got {n}")
            k = round(acc * n)
            p = rng.beta(k + 0.5, n - k + 0.5, draws)
            terms.append(1 - p if flip else p)
        total += 3 / sum(1 / np.maximum(t, 1e-12) for t in terms)
        observed += h_o(float(s["acc_e"]), float(s["acc_s"]), float(s["acc_g"]))
    total /= len(settings)
    observed /= len(settings)
    tail = (1 - level) / 2
    lo, hi = float(np.quantile(total, tail)), float(np.quantile(total, 1 - tail))
    return min(lo, observed), max(hi, observed)
