"""The gate floor: a prompt that barely switches the hypernetwork on gets exactly no update.

A trained hypernetwork leaves unrelated prompts a small update: 0.3-2% of a concept's in
`direct` mode with the adversarial gate, ~13% in `fields` mode (docs/training.md). It moves
their images by a fraction of a level to a few levels, which no classifier notices but a user
comparing renders does. The trainer stores `gate_reference` in the file: over the concepts, the
smallest median ||dW|| = ||B A^T|| (all layers) of a concept's own training prompts (and each
concept's own median as `concept_references`, for tools; the floor reads only the minimum). With a
floor f, a prompt whose update is rel = ||dW|| / gate_reference is scaled by
clamp((rel - f) / f, 0, 1): nothing below f, untouched from 2f up, linear between, so a prompt
near the floor fades rather than switching on and off. Files without `gate_reference` (trained
before it existed) are left as they are.

Saturation (`gate_saturate`, stored in the file or set by the host): a prompt above the floor
whose update is weaker than the concept's own is raised to the concept's strength, i.e. the
factor above is multiplied by max(1, 1 / rel). A file that stores its concepts' signatures
(unhype.concept_signatures) raises a prompt of a clear concept to that concept's own reference
instead (on five toy concepts the largest is 4.4x the smallest, to which a weakened prompt of
that concept would otherwise be raised), blended towards the smallest as the prompt's direction
grows unclear. The hypernetwork then decides whether a prompt
is the concept (above the floor or not) and in which direction to edit, and every recognised
prompt gets at least the concept's edit, like SPM's saturated sigmoid gate: an attack that only
weakens the update no longer weakens the erasure (docs/training.md: embedding-attack success
over three toy targets 60% -> 42%, same H_o). Only for
files whose unrelated prompts sit under the floor (`direct` mode): in `fields` mode they sit
above it and would be raised too.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from unhype.errors import UnHypeError
from unhype.hypernet import LoraFactors, delta_norm

DEFAULT_FLOOR = 0.03


def check_floor(value) -> float:
    """A floor is a fraction of the reference update in [0, 0.5): from 2f the update is untouched,
    so a floor of 0.5 or more would weaken the concept's own prompts."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UnHypeError(f"gate floor must be a number, got {value!r}") from None
    if not (math.isfinite(f) and 0.0 <= f < 0.5):
        raise UnHypeError(f"gate floor must be in [0, 0.5) (a fraction of the concept's own "
                          f"update), got {value!r}")
    return f


def check_reference(value) -> float:
    """A gate reference is a positive, finite update norm (a number, not a string or bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and value > 0):
        raise UnHypeError(f"gate_reference must be a positive number, got {value!r}")
    return float(value)


def reference_norm(hypernet: Callable[[Tensor], LoraFactors], embed: Callable[[list], Tensor],
                   prompt_groups: list[list[str]]) -> float:
    """The smallest, over groups (one per concept), of the median update norm of its prompts."""
    medians = []
    with torch.no_grad():
        for prompts in prompt_groups:
            if prompts:
                medians.append(float(delta_norm(hypernet(embed(list(prompts)).float())).median()))
    if not medians:
        raise UnHypeError("gate reference: no concept prompts")
    return min(medians)


def concepts_reference(hypernet: Callable[[Tensor], LoraFactors], embed: Callable[[list], Tensor],
                       concepts) -> float | None:
    """The reference a file stores: `reference_norm` over each concept's own training prompts
    (`unhype.trainer.concepts.Concept.prompts`); None while the update is still exactly zero."""
    refs = concept_references(hypernet, embed, concepts)
    ref = min(refs.values()) if refs else 0.0
    return ref if ref > 0 and math.isfinite(ref) else None


def concept_references(hypernet: Callable[[Tensor], LoraFactors],
                       embed: Callable[[list], Tensor], concepts) -> dict[str, float]:
    """{target: median update norm of that concept's own training prompts}, the per-concept
    values whose minimum is `concepts_reference` (files store both: `concept_references`)."""
    out = {}
    for c in concepts:
        prompts = [p for p, _ in c.prompts()]
        if prompts:
            out[c.target] = reference_norm(hypernet, embed, [prompts])
    if not out:
        raise UnHypeError("gate reference: no concept prompts")
    return out


def floor_scale(norms: Tensor, reference: float, floor: float, saturate: bool = False,
                targets: Tensor | None = None) -> Tensor:
    """[N] factor per prompt: 0 below floor x reference, 1 from twice that, linear between;
    with `saturate`, times max(1, target / norm) (the concept's strength for every prompt
    from twice the floor up), where a row's target is its entry of `targets` (its own
    concept's reference, unhype.concept_signatures) or else `reference`."""
    if floor <= 0:
        return torch.ones_like(norms)
    rel = norms / check_reference(reference)
    scale = ((rel - floor) / floor).clamp(0, 1)
    if saturate:
        goal = 1.0 if targets is None else (targets.to(rel) / reference).clamp(min=1.0)
        scale = scale * (goal / rel.clamp(min=floor)).clamp(min=1)
    return scale


def saturate_refusal(mode: str | None, floor: float | None = None) -> str | None:
    """Why a file trained in `mode` with gate floor `floor` must not be saturated (None: it
    may): the trainer and `unhype stamp-floor` both refuse it."""
    problems = []
    if mode == "fields":
        problems.append("gate_saturate needs mode 'direct': in fields mode unrelated prompts get "
                        "~13% of a concept's update, above the floor, and would be raised to its "
                        "full strength")
    if floor is not None and floor <= 0:
        problems.append("gate_saturate needs a gate_floor > 0 (it raises prompts above it)")
    return "; ".join(problems) or None


def check_saturate(value) -> bool:
    """`gate_saturate` is a boolean (JSON true/false in a file's metadata)."""
    if not isinstance(value, bool):
        raise UnHypeError(f"gate_saturate must be true or false, got {value!r}")
    return value


def apply_floor(factors: LoraFactors, reference: float | None, floor: float,
                saturate: bool = False, signatures=None, cosines: Tensor | None = None
                ) -> LoraFactors:
    """The factors with each prompt's A scaled by `floor_scale` (B A^T scales with it); returned
    as they are when there is no reference or the floor is 0 (saturation needs the floor).
    `signatures` (unhype.concept_signatures, a file's): saturate each prompt to its own
    concept's reference (`cosines`: the rows' cosines with the concepts, if already made)."""
    if reference is None or floor <= 0:
        return factors
    targets = None
    if saturate and signatures is not None:
        with torch.no_grad():
            cos = signatures.cosines(factors) if cosines is None else cosines
            targets = signatures.saturation_targets(cos, reference)
    scale = floor_scale(delta_norm(factors).float(), reference, floor, saturate, targets)
    if bool((scale == 1).all()):
        return factors
    return {name: (a * scale.view(-1, 1, 1).to(a), b) for name, (a, b) in factors.items()}
