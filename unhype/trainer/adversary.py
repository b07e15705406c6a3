"""Adversarial gate training: train the hypernetwork on the worst pooled embedding near a target.

UnHype's gate is its input: the pooled prompt embedding. An attacker who perturbs the prompt
embedding (the UnlearnDiffAtk-like attack in `unhype.evaluation.attack`) can move that vector out
of the region where the hypernetwork fires, and the erasure switches off. With
`adversarial_eps > 0`, each removal batch first searches, per target prompt, the perturbation
delta with ||delta|| <= eps ||e|| that makes the generated weight update smallest (normalised-
gradient PGD through the hypernetwork alone: no UNet pass, cheap), and the removal loss reads
e + delta. The hypernetwork so learns to fire over the whole eps-ball around each target prompt;
retention still reads the clean retained prompts, so eps must stay below their distance to the
targets (`unhype.probe`-style check: `nearest_retained_distance`).

`adversarial_loss = "consistency"` trains the other way round (as TRADES does for classifiers):
the removal loss reads the clean prompt, as without an adversary, and a consistency term
(`unhype.trainer.losses.consistency_loss`) pulls the model's prediction under the worst case's LoRA to
its prediction under the clean prompt's (held fixed), so the erasure is trained to be the same
over the ball rather than strong enough at its weakest point. The term lives in the model's
output space: in weight space (||B A^T|| distances) a large update along input directions the
model never sees made the distance look small, and training inflated the update 170x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unhype.hypernet import update_size_sq
from unhype.evaluation.attack import project


def ball_points(n: int, dim: int, gen: torch.Generator) -> Tensor:
    """[n, dim] random points of the unit ball (random direction, radius uniform in [0, 1])."""
    direction = torch.randn((n, dim), generator=gen)
    radius = torch.rand((n, 1), generator=gen)
    return direction / direction.norm(dim=-1, keepdim=True) * radius


def adversarial_rows(n: int, fraction: float, gen: torch.Generator) -> Tensor:
    """[n] bool: which rows of a removal batch read their worst case (round(fraction * n) of
    them, at random); the others keep the clean embedding. fraction 1 draws nothing."""
    if fraction >= 1:
        return torch.ones(n, dtype=torch.bool)
    rows = torch.zeros(n, dtype=torch.bool)
    rows[torch.randperm(n, generator=gen)[: max(1, round(fraction * n))]] = True
    return rows


def worst_case_embedding(hypernet, emb: Tensor, eps: float, steps: int, start: Tensor) -> Tensor:
    """emb + delta, ||delta_i|| <= eps ||emb_i||, minimising the update size ||B A^T||^2 (s = T).

    `start` ([N, dim] points of the unit ball, `ball_points`) is where the search begins, scaled
    to each row's ball, so that a hypernetwork that does not fire yet (B = 0 at initialisation:
    zero gradient) still sees perturbed inputs."""
    if eps <= 0 or steps <= 0:
        return emb
    emb = emb.detach()
    norms = emb.norm(dim=-1)
    delta = start.to(emb) * norms[:, None] * eps
    step_size = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        size = update_size_sq(hypernet(emb + delta)).sum()
        grad, = torch.autograd.grad(size, delta)
        with torch.no_grad():
            unit = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            delta = project(delta - step_size * norms[:, None] * unit, norms, eps)
    return (emb + delta).detach()


def adversarial_batch(hypernet, emb: Tensor, eps: float, steps: int, fraction: float,
                      gen: torch.Generator, n_global: int, mine: slice) -> Tensor:
    """The removal batch's embeddings with `fraction` of its target prompts replaced by their
    worst case. Start points and rows are drawn for the global batch of `n_global` (one stream
    in every process); `emb` holds this process's rows (`mine`)."""
    start = ball_points(n_global, emb.shape[1], gen)[mine]
    hard = adversarial_rows(n_global, fraction, gen)[mine]
    if not hard.any():
        return emb
    out = emb.clone()
    out[hard] = worst_case_embedding(hypernet, emb[hard], eps, steps, start[hard])
    return out


def nearest_retained_distance(target_emb: Tensor, retain_emb: Tensor) -> Tensor:
    """[N] distance of each target prompt to its nearest retained prompt, relative to its norm:
    an eps above the smallest of these puts retained prompts inside a ball the gate must fire on."""
    return torch.cdist(target_emb.float(), retain_emb.float()).min(1).values / \
        target_emb.float().norm(dim=-1)
