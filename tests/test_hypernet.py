"""The hypernetwork: zero guarantees, batching, determinism, fp32, parameter budgets."""

import pytest
import torch

from tests.helpers import hypernet_for, tiny_sd_unet
from unhype.errors import UnHypeError
from unhype.hypernet import HyperNetConfig, build_hypernet, delta_weight, flatten_factors
from unhype.sizes import count_parameters

VARIANTS = ["per_layer", "shared"]


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_unet()


def max_delta(factors):
    return max(float(delta_weight(a, b).detach().abs().max()) for a, b in factors.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_update_at_initialisation_for_every_step(unet, variant):
    net = hypernet_for(unet, variant=variant, perturb=0.0)
    emb = torch.randn(4, 768)
    for s in (0, 1, 150, 300):
        assert max_delta(net(emb, s)) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_update_at_step_zero_after_training(unet, variant):
    net = hypernet_for(unet, variant=variant, perturb=0.1)
    emb = torch.randn(4, 768)
    assert max_delta(net(emb, 300)) > 1e-3  # trained: non-zero at s = T
    assert max_delta(net(emb, 0)) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_equals_one_by_one_and_shapes(unet, variant):
    net = hypernet_for(unet, variant=variant)
    emb = torch.randn(3, 768)
    batched = net(emb)
    for i in range(3):
        single = net(emb[i:i + 1])
        for name, (a, b) in single.items():
            torch.testing.assert_close(a[0], batched[name][0][i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b[0], batched[name][1][i], rtol=1e-5, atol=1e-6)
    t = net.config.targets[0]
    a, b = batched[t.name]
    assert a.shape == (3, t.in_dim, 2) and b.shape == (3, t.out_dim, 2)
    assert a.dtype == b.dtype == torch.float32
    assert flatten_factors(batched).shape[0] == 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic_under_seed_and_seed_matters(unet, variant):
    emb = torch.randn(2, 768)
    one = flatten_factors(hypernet_for(unet, variant=variant, seed=3)(emb))
    two = flatten_factors(hypernet_for(unet, variant=variant, seed=3)(emb))
    other = flatten_factors(hypernet_for(unet, variant=variant, seed=4)(emb))
    assert torch.equal(one, two)
    assert not torch.allclose(one, other)


def test_fp16_embedding_is_computed_in_fp32(unet):
    net = hypernet_for(unet)
    emb = torch.randn(2, 768)
    out16 = net(emb.half())
    assert all(a.dtype == torch.float32 for a, _ in out16.values())


def test_different_prompts_get_different_loras(unet):
    net = hypernet_for(unet, variant="shared")
    f = net(torch.randn(2, 768))
    a, b = next(iter(f.values()))
    assert not torch.allclose(delta_weight(a[0], b[0]), delta_weight(a[1], b[1]))


def test_shared_is_at_least_10x_smaller_for_sd1():
    for rank in (1, 6):
        per_layer = count_parameters("sd1", "per_layer", rank)
        shared = count_parameters("sd1", "shared", rank)
        assert per_layer / shared >= 10, (rank, per_layer, shared)
    # the paper's arithmetic: SD1.4, 32 layers, h = 100, r = 1 -> about 10 M parameters
    assert 9.5e6 < count_parameters("sd1", "per_layer", 1) < 10.5e6


def test_bad_config_and_inputs_are_refused(unet):
    with pytest.raises(UnHypeError, match="variant"):
        HyperNetConfig(variant="big", targets=[{"name": "x", "module_type": "t", "in_dim": 2,
                                                "out_dim": 2}], embed_dim=4)
    with pytest.raises(UnHypeError, match="no target"):
        HyperNetConfig(variant="shared", targets=[], embed_dim=4)
    net = hypernet_for(unet)
    with pytest.raises(UnHypeError, match="768"):
        net(torch.randn(2, 1024))
    with pytest.raises(UnHypeError, match="NaN"):
        net(torch.full((1, 768), float("nan")))
    with pytest.raises(UnHypeError, match="positive integer"):
        build_hypernet(HyperNetConfig(variant="shared", targets=net.config.targets,
                                      embed_dim=768, rank=0))
