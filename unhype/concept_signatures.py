"""Which of a file's erased concepts a prompt's update belongs to, named by its direction.

A file that erases several concepts gives each its own kind of update: on the five-concept toy
file the updates of two prompts of one concept point the same way (cosine 0.95-0.99) and those
of two concepts mostly apart (0.04-0.6; triangle / crescent 0.9). The trainer stores, per
concept, the mean pooled embedding of its own training prompts (training["concept_embeddings"]:
{target: [D numbers]}); the file's own network turns them into each concept's update once, and a
prompt is that concept whose update points most its way (the Frobenius cosine over all layers,
unhype.hypernet.update_gram), if it does clearly: a cosine of at least MIN_COSINE (0.8), MARGIN
(0.05) above the next concept's. Two uses:

* saturation (unhype.gate_floor) raises a prompt of a clear concept to that concept's own
  reference (training["concept_references"]), not to the smallest over the concepts; as the
  direction grows unclear (cosine down to SOFT_FROM, or no margin) the target falls linearly
  to the smallest, as before;
* a long prompt whose windows name different concepts gets each of those updates, not only
  the strongest window's (unhype.prompt_windows.combined_rows).

Two concepts whose updates point nearly the same way (cosine above SAME_WAY) are never told
apart: even a prompt whose update is exactly one's is not MARGIN nearer it than the other, so
prompts of either are unnamed. The pairwise cosines are computed once with the signatures;
`unhype inspect` and the hosts' summaries name such pairs, and the load logs a warning.

Files without the entry (trained before it existed), or of one concept, keep the old
behaviour: saturation to gate_reference, the strongest window only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from unhype.errors import UnHypeError
from unhype.hypernet import LoraFactors, update_gram, update_size_sq

# a prompt is named a concept only when its update points clearly that way: prompts of a concept
# score 0.89-0.99 with it on the five-concept toy file, while a long tag window naming a circle
# scored 0.41-0.57 with every concept (saturating it to the largest reference would multiply an
# update of no clear direction by 9)
MIN_COSINE = 0.8
MARGIN = 0.05     # ... and more than the next concept (triangle / crescent point 0.9 alike)
SOFT_FROM = 0.5   # saturation blends towards the smallest reference from MIN_COSINE down to this
COVER_COSINE = 0.5  # a reading picked for a long prompt that points this much a concept's way
                    # erases it (in part): no second reading of that concept is added
SAME_WAY = 1 - MARGIN  # above it, a concept's own update is within MARGIN of the other's
KEY = "concept_embeddings"


def read_embeddings(training: dict, dim: int) -> dict[str, Tensor]:
    """{target: [dim] embedding} of a file's training["concept_embeddings"] ({} when absent);
    a malformed entry is an error (a file with wrong signatures would name wrong concepts)."""
    raw = (training or {}).get(KEY)
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise UnHypeError(f"training.{KEY} must be a non-empty {{concept: [numbers]}} table")
    out = {}
    for target, values in raw.items():
        ok = isinstance(values, list) and len(values) == dim and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values)
        if not ok:
            raise UnHypeError(f"training.{KEY}[{target!r}] must be {dim} finite numbers (the "
                              "file's embedding width)")
        out[str(target)] = torch.tensor(values, dtype=torch.float32)
    return out


def mean_embeddings(embed, concepts) -> dict[str, list[float]]:
    """What the trainer stores: {target: the mean embedding of that concept's own training
    prompts (`unhype.trainer.concepts.Concept.prompts`)}, as JSON numbers."""
    out = {}
    with torch.no_grad():
        for c in concepts:
            prompts = [p for p, _ in c.prompts()]
            if prompts:
                mean = embed(prompts).float().mean(0).cpu()
                out[c.target] = [float(v) for v in mean.tolist()]
    return out


def _norms(factors: LoraFactors) -> Tensor:
    return update_size_sq({k: (a.double(), b.double()) for k, (a, b) in factors.items()}
                          ).clamp_min(0).sqrt()


def names(cosines: Tensor) -> Tensor:
    """[N] each row's concept from its cosines [N, K]: the largest, if at least MIN_COSINE and
    MARGIN above the next concept's (-1: no update, or no clear concept)."""
    best, index, second = _top_two(cosines)
    clear = (best >= MIN_COSINE) & (best - second >= MARGIN)
    return torch.where(clear, index, torch.full_like(index, -1))


def _top_two(cosines: Tensor):
    top = cosines.topk(min(2, cosines.shape[1]), dim=1)
    best, index = top.values[:, 0], top.indices[:, 0]
    second = top.values[:, 1] if cosines.shape[1] > 1 else torch.full_like(best, -1.0)
    return best, index, second


@dataclass
class ConceptSignatures:
    targets: list[str]
    factors: LoraFactors        # each concept's update (before the gate floor), on the CPU
    references: list[float | None]  # each concept's own reference (None: not stored)
    norms: Tensor | None = None     # ||dW|| of each concept's update (float64)
    pair_cosines: Tensor | None = None  # [K, K] the concepts' updates' cosines with each other

    def __post_init__(self):
        if self.norms is None:
            self.norms = _norms(self.factors)
        if self.pair_cosines is None:
            self.pair_cosines = self.cosines(self.factors)

    def same_way(self) -> list[tuple[str, str, float]]:
        """(concept, concept, cosine) of each pair whose updates point the same way (cosine
        above SAME_WAY): no prompt of either is named."""
        upper = torch.triu(self.pair_cosines > SAME_WAY, diagonal=1)
        return [(self.targets[i], self.targets[j], float(self.pair_cosines[i, j]))
                for i, j in upper.nonzero().tolist()]

    @classmethod
    def of(cls, hypernet, embeddings: dict[str, Tensor], references: dict[str, float]
           ) -> "ConceptSignatures | None":
        """None for fewer than two concepts: there is nothing to tell apart (one concept's own
        reference is the file's gate_reference)."""
        if len(embeddings) < 2:
            return None
        targets = list(embeddings)
        params = next(iter(getattr(hypernet, "parameters", lambda: [])()), None)
        device, dtype = (params.device, params.dtype) if params is not None else ("cpu", None)
        with torch.no_grad():
            rows = torch.stack([embeddings[t] for t in targets]).to(device)
            factors = hypernet(rows if dtype is None else rows.to(dtype))
        # in CPU memory: one prompt's LoRA factors each (rank 4: 0.8 MB for SD1's paper preset,
        # 7 MB SDXL's, 25 MB FLUX attn_all), which a GPU need not hold
        factors = {k: (a.float().cpu(), b.float().cpu()) for k, (a, b) in factors.items()}
        return cls(targets, factors, [references.get(t) for t in targets])

    def cosines(self, factors: LoraFactors) -> Tensor:
        """[N, K] Frobenius cosine of each row's update with each concept's (0: no update)."""
        factors = {k: (a.detach().float().cpu(), b.detach().float().cpu())
                   for k, (a, b) in factors.items()}
        g = update_gram(factors, self.factors)
        denom = _norms(factors)[:, None] * self.norms[None, :]
        return torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))

    def saturation_targets(self, cosines: Tensor, fallback: float) -> Tensor:
        """[N] the reference each row is raised to: its clearly named concept's own; from
        there down to a cosine of SOFT_FROM (or no margin over the next concept), blended
        linearly towards `fallback` (the smallest), so the update does not jump where a prompt
        stops being clearly one concept."""
        best, index, second = _top_two(cosines)
        weight = ((best - SOFT_FROM) / (MIN_COSINE - SOFT_FROM)).clamp(0, 1) * \
            ((best - second) / MARGIN).clamp(0, 1)
        own = torch.tensor([fallback if r is None else r for r in self.references],
                           dtype=torch.float64)[index]
        return fallback + weight * (own - fallback)


def same_way_text(a: str, b: str, cosine: float) -> str:
    """Why two concepts are never told apart, for a summary line or a log warning."""
    return (f"{a} and {b}: their updates point the same way (cosine {cosine:.2f}): prompts of "
            "either are treated as unnamed")
