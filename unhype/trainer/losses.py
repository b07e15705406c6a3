"""The training losses, as plain functions of tensors (no model code here).

* ESD-with-anchor: the LoRA-on prediction for the target prompt should equal
  e_a - eta (e_p - e_a), i.e. guidance away from the target, towards the anchor. Predictions are
  in the model's native space (epsilon, v, or x0 for x0-prediction models such as the toy);
  the target is linear in them, so the same formula holds in each.
* Hypernet Fields (the paper's removal loss): with g = dL_esd/dtheta at theta = H(e, s),
  ||H(e, s+1) - H(e, s) + lambda g||^2, so one hyper step is one SGD step of size lambda.
* Retention: ||H(e_r, s) - H(e_r, 0)||^2 over all factors. At s = 0, B = 0 and
  A = alpha_base L0 for every prompt, so this is ||B(e_r, s)||^2 + ||A(e_r, s) - alpha_base L0||^2:
  the B part keeps the retained prompts' update at zero, the A part keeps their A on its base.
Squared norms are summed over the factor vector and averaged over prompts; the ESD loss is a
per-prompt mean squared error (summed over prompts where a per-prompt gradient is needed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from unhype.hypernet import LoraFactors, flatten_factors


def esd_target(e_p: Tensor, e_a: Tensor, eta: float) -> Tensor:
    return e_a - eta * (e_p - e_a)


def consistency_loss(e_worst: Tensor, e_clean: Tensor) -> Tensor:
    """Mean squared difference of the prediction under the worst case's LoRA from the one under
    the clean prompt's, which is held fixed (only the worst case is pulled)."""
    return (e_worst.float() - e_clean.detach().float()).pow(2).mean()


def esd_loss_per_prompt(e_n: Tensor, e_p: Tensor, e_a: Tensor, eta: float) -> Tensor:
    """[N] mean squared error of each row against the ESD-with-anchor target."""
    diff = e_n.float() - esd_target(e_p.float(), e_a.float(), eta)
    return diff.pow(2).flatten(1).mean(1)


def factor_leaves(factors: LoraFactors) -> LoraFactors:
    """Detached copies of the factors that require grad (the LoRA parameters as leaves)."""
    return {k: (a.detach().requires_grad_(True), b.detach().requires_grad_(True))
            for k, (a, b) in factors.items()}


def factor_grads(loss: Tensor, leaves: LoraFactors) -> LoraFactors:
    """d loss / d (A, B) for every layer (loss summed over prompts -> per-prompt gradients)."""
    flat = [t for pair in leaves.values() for t in pair]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads)]
    return {k: (grads[2 * i], grads[2 * i + 1]) for i, k in enumerate(leaves)}


def fields_loss(next_factors: LoraFactors, cur_factors: LoraFactors, grads: LoraFactors,
                lam: float) -> Tensor:
    """||H(e, s+1) - H(e, s) + lambda g||^2, summed over parameters, averaged over prompts."""
    step = flatten_factors(next_factors) - flatten_factors(cur_factors)
    target = -lam * flatten_factors(grads).detach()
    return (step - target).pow(2).sum(1).mean()


def retention_loss(factors_s: LoraFactors, factors_0: LoraFactors) -> Tensor:
    """||H(e_r, s) - H(e_r, 0)||^2, summed over parameters, averaged over prompts."""
    diff = flatten_factors(factors_s) - flatten_factors(factors_0).detach()
    return diff.pow(2).sum(1).mean()


def retention_parts(factors_s: LoraFactors, factors_0: LoraFactors) -> dict[str, float]:
    """The A and B parts of the retention loss, for the log."""
    a = sum((fa - f0a).pow(2).flatten(1).sum(1) for (fa, _), (f0a, _)
            in zip(factors_s.values(), factors_0.values()))
    b = sum(fb.pow(2).flatten(1).sum(1) for _, fb in factors_s.values())
    return {"retain_a": float(a.mean()), "retain_b": float(b.mean())}


