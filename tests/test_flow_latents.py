"""unhype/flow_latents.py: the one FLUX packing and Euler sampler (toy flow model and trainer)."""

import pytest
import torch

from unhype import flow_latents
from unhype.toy import flow

STATIC = flow.scheduler_config()  # the toy's: static shift 2
DYNAMIC = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
           "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
           "max_shift": 1.15}  # FLUX.1-dev's


def test_pack_unpack_round_trip_and_ids():
    lat = torch.randn(2, 12, 8, 6)
    packed = flow_latents.pack(lat)
    assert packed.shape == (2, 4 * 3, 48)
    assert torch.equal(packed[0, 0], lat[0, :, :2, :2].reshape(-1))  # channel-major 2x2 patch
    assert torch.equal(flow_latents.unpack(packed, 8, 6), lat)
    ids = flow_latents.image_ids(8, 6)
    assert ids.shape == (12, 3) and ids[:, 0].eq(0).all()
    assert ids[1].tolist() == [0, 0, 1] and ids[3].tolist() == [0, 1, 0]  # (row, column)


@pytest.mark.parametrize("config", [STATIC, DYNAMIC])
def test_euler_with_the_true_velocity_lands_on_x0_and_stays_on_the_path(config):
    gen = torch.Generator().manual_seed(0)
    noise = flow_latents.initial_noise(2, (12, 8, 8), gen)
    x0 = torch.randn_like(noise)
    scheduler = flow_latents.make_scheduler(config, 6, 8, 8)
    assert float(scheduler.sigmas[0]) == 1.0 and float(scheduler.sigmas[-1]) == 0.0
    steps = []

    def velocity(i, t, z):
        steps.append(i)
        return noise - x0

    assert torch.allclose(flow_latents.euler(noise, scheduler, velocity), x0, atol=1e-5)
    assert steps == list(range(6))
    # stopped after 2 steps: z_sigma = (1 - sigma) x0 + sigma noise at the third sigma
    z = flow_latents.euler(noise, flow_latents.make_scheduler(config, 6, 8, 8), velocity, 2)
    sigma = float(scheduler.sigmas[2])
    assert torch.allclose(z, (1 - sigma) * x0 + sigma * noise, atol=1e-5)


def test_shift_static_or_by_resolution():
    a = flow_latents.make_scheduler(STATIC, 4, 8, 8).sigmas
    b = flow_latents.make_scheduler(STATIC, 4, 64, 64).sigmas
    assert torch.equal(a, b)  # static shift: no resolution term
    small = flow_latents.make_scheduler(DYNAMIC, 4, 32, 32).sigmas
    large = flow_latents.make_scheduler(DYNAMIC, 4, 128, 128).sigmas
    assert (large[1:-1] > small[1:-1]).all()  # more tokens: more of the steps at high noise


def test_initial_noise_is_deterministic_in_the_generator():
    def draw(seed):
        return flow_latents.initial_noise(3, (4, 4, 4), torch.Generator().manual_seed(seed))
    assert draw(1).shape == (3, 4, 16)
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
