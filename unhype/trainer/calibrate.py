"""`--probe_lambda`: what T hyper steps of size lambda do, before training a hypernetwork.

The fields loss teaches H that one hyper step is one SGD step of size lambda on the ESD loss, so
H(e, T) can only be as good as T plain SGD steps of that size from the zero update. This probe
runs exactly that on the LoRA factors of a few target prompts (no hypernetwork) for each lambda
and prints the ESD loss before/after on held-out z_t, so lambda can be chosen in seconds.
"""

from __future__ import annotations

import torch

from unhype.trainer import losses
from unhype.trainer.loop import draw_batch, say
from unhype.hypernet import delta_norm


def probe(run, lambdas: list[float], steps: int | None = None, seed: int = 0) -> list[dict]:
    cfg, hn, lora, b = run.cfg, run.hypernet, run.lora, run.backend
    steps = steps or cfg.hyper_steps
    gen = torch.Generator().manual_seed(seed)
    held = [draw_batch(run, gen) for _ in range(4)]

    def esd(factors, batch):
        items, z, t, e_p, e_a = batch
        lora.set(factors, torch.zeros(len(items), dtype=torch.long))  # one LoRA for all rows
        out = losses.esd_loss_per_prompt(b.predict(z, t, run.cond_t.index(items)), e_p, e_a,
                                          cfg.eta)
        lora.clear()
        return out

    with torch.no_grad():
        start = hn(run.item_emb[:1], torch.zeros(1))
        base = float(torch.cat([esd(start, h) for h in held]).mean())
    rows = []
    for lam in lambdas:
        theta = losses.factor_leaves(start)
        g_gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            batch = draw_batch(run, g_gen)
            loss = esd(theta, batch).mean()
            grads = losses.factor_grads(loss, theta)
            theta = {k: ((a - lam * ga).detach().requires_grad_(True),
                         (bb - lam * gb).detach().requires_grad_(True))
                     for (k, (a, bb)), (ga, gb) in zip(theta.items(), grads.values())}
        with torch.no_grad():
            after = float(torch.cat([esd(theta, h) for h in held]).mean())
            size = float(delta_norm(theta)[0])
        rows.append({"lambda": lam, "esd_before": base, "esd_after": after, "delta_norm": size})
        say(f"lambda {lam:g}: ESD loss {base:.4g} -> {after:.4g} after {steps} SGD steps "
            f"(|dW| {size:.3g})")
    return rows
