"""Loss numerics: ESD target, Hypernet-Fields matching, retention, per-prompt gradients."""

import torch

from unhype.trainer import losses
from unhype.hypernet import HyperNetConfig, TargetSpec, build_hypernet, delta_norm


def _factors(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"l1": (torch.randn(n, 5, 2, generator=g), torch.randn(n, 3, 2, generator=g)),
            "l2": (torch.randn(n, 4, 2, generator=g), torch.randn(n, 6, 2, generator=g))}


def _net(variant="per_layer"):
    targets = [TargetSpec("a", "attn2.to_k", 8, 6), TargetSpec("b", "attn2.to_v", 8, 4)]
    return build_hypernet(HyperNetConfig(variant=variant, targets=targets, embed_dim=5, rank=2,
                                         hidden=12, hyper_steps=10, alpha_base=0.5, seed=3))


def test_esd_target_and_loss():
    e_p, e_a = torch.full((1, 4), 2.0), torch.full((1, 4), 1.0)
    target = losses.esd_target(e_p, e_a, eta=0.5)
    assert torch.allclose(target, torch.full((1, 4), 0.5))  # 1 - 0.5 * (2 - 1)
    assert float(losses.esd_loss_per_prompt(target, e_p, e_a, 0.5)[0]) == 0.0
    loss = losses.esd_loss_per_prompt(target + 1.0, e_p, e_a, 0.5)
    assert torch.allclose(loss, torch.tensor([1.0]))


def test_fields_loss_zero_when_step_is_minus_lambda_g():
    cur, grads = _factors(seed=1), _factors(seed=2)
    lam = 0.03
    nxt = {k: (a - lam * ga, b - lam * gb) for (k, (a, b)), (ga, gb)
           in zip(cur.items(), grads.values())}
    assert float(losses.fields_loss(nxt, cur, grads, lam)) < 1e-10
    # off by exactly one unit in one entry -> loss 1 / N prompts
    nxt["l1"][1][0, 0, 0] += 1.0
    assert abs(float(losses.fields_loss(nxt, cur, grads, lam)) - 0.5) < 1e-5


def test_retention_zero_at_step_zero_and_splits_into_a_and_b():
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    emb = torch.randn(3, 5)
    f0 = net(emb, torch.zeros(3))
    assert float(losses.retention_loss(f0, f0)) == 0.0
    for a, b in f0.values():  # H(e, 0): B = 0, A = alpha_base * L0 for every prompt
        assert float(b.abs().max()) == 0.0
    fs = net(emb, torch.full((3,), 6.0))
    parts = losses.retention_parts(fs, f0)
    assert parts["retain_b"] > 0 and parts["retain_a"] > 0
    total = float(losses.retention_loss(fs, f0))
    assert abs(total - parts["retain_a"] - parts["retain_b"]) < 1e-4 * total


def test_factor_grads_are_per_prompt():
    leaves = losses.factor_leaves(_factors(n=2))
    x = torch.randn(2, 5)
    # prompt i's loss only involves prompt i's factors
    per_prompt = torch.stack([((x[i] @ leaves["l1"][0][i]) @ leaves["l1"][1][i].T).pow(2).sum()
                              for i in range(2)])
    a, b = leaves["l1"]
    separate = [torch.autograd.grad(per_prompt[i], a, retain_graph=True)[0][i] for i in range(2)]
    grads = losses.factor_grads(per_prompt.sum(), leaves)
    for i, ga in enumerate(separate):
        assert torch.allclose(grads["l1"][0][i], ga)
    assert float(grads["l2"][0].abs().max()) == 0.0  # unused layer -> zero gradient


def test_fields_training_learns_the_sgd_step():
    """Minimising the fields loss makes H(s+1) - H(s) approach -lambda g."""
    torch.manual_seed(0)
    net = _net()
    emb = torch.randn(4, 5)
    grads = {k: (torch.randn_like(a), torch.randn_like(b))
             for k, (a, b) in net(emb, torch.zeros(4)).items()}
    s = torch.full((4,), 4.0)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(200):
        loss = losses.fields_loss(net(emb, s + 1), net(emb, s), grads, 0.01)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.1 * first


def test_delta_norm_zero_at_init_for_every_prompt():
    net = _net("shared")
    assert float(delta_norm(net(torch.randn(3, 5))).max()) == 0.0
