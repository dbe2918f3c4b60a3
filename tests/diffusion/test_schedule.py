"""Cosine schedule, derived DDPM buffers and q_sample."""
import math

import pytest
import torch

from diffusiondet.diffusion import (
    DIFFUSION_BUFFER_NAMES,
    cosine_beta_schedule,
    diffusion_buffers,
    q_sample,
)


# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def buffers():
    return diffusion_buffers(cosine_beta_schedule(1000))


def test_reference_values_of_spec(buffers):
    betas, alphas_cumprod = buffers["betas"], buffers["alphas_cumprod"]
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(4.128e-5, rel=1e-3)
    assert betas[999].item() == pytest.approx(0.999, abs=1e-12)
    expected = {0: 0.99996, 249: 0.84701, 499: 0.49384, 749: 0.14427}
    for t, value in expected.items():
        assert alphas_cumprod[t].item() == pytest.approx(value, abs=1e-5)
    assert alphas_cumprod[999].item() == pytest.approx(2.43e-9, rel=1e-2)
    assert math.sqrt(alphas_cumprod[999].item()) == pytest.approx(4.9e-5, rel=2e-2)


def test_matches_official_schedule(buffers, parity):
    for name, official in parity["schedule"].items():
        assert official.dtype == torch.float64
        torch.testing.assert_close(buffers[name], official, rtol=0, atol=1e-12)


def test_buffer_names_order_and_definitions(buffers):
    assert tuple(buffers.keys()) == DIFFUSION_BUFFER_NAMES
    assert len(buffers) == 12
    for value in buffers.values():
        assert value.dtype == torch.float64 and value.shape == (1000,)
        assert torch.isfinite(value).all()
    betas, ac, ac_prev = buffers["betas"], buffers["alphas_cumprod"], buffers["alphas_cumprod_prev"]
    assert ac_prev[0] == 1.0
    torch.testing.assert_close(ac_prev[1:], ac[:-1])
    torch.testing.assert_close(ac, torch.cumprod(1 - betas, 0))
    assert (ac[1:] < ac[:-1]).all() and (ac > 0).all() and (ac <= 1).all()
    # Posterior mean coefficients reproduce the posterior mean of a hand-computed case.
    t = 500
    torch.testing.assert_close(
        buffers["posterior_mean_coef1"][t], betas[t] * ac_prev[t].sqrt() / (1 - ac[t])
    )
    torch.testing.assert_close(
        buffers["posterior_mean_coef2"][t], (1 - ac_prev[t]) * (1 - betas[t]).sqrt() / (1 - ac[t])
    )
    assert buffers["posterior_variance"][0] == 0.0
    assert buffers["posterior_log_variance_clipped"][0].item() == pytest.approx(math.log(1e-20))
    torch.testing.assert_close(
        buffers["sqrt_recipm1_alphas_cumprod"] ** 2, 1 / ac - 1, rtol=1e-10, atol=0
    )


def test_q_sample_batch_and_dtype(buffers):
    ac = buffers["alphas_cumprod"]
    x0 = torch.rand(3, 7, 4) * 4 - 2
    noise = torch.randn(3, 7, 4)
    t = torch.tensor([0, 500, 999])
    x_t = q_sample(x0, t, ac, noise)
    assert x_t.dtype == torch.float32 and x_t.shape == (3, 7, 4)
    for b in range(3):
        a = ac[t[b]].item()
        expected = math.sqrt(a) * x0[b].double() + math.sqrt(1 - a) * noise[b].double()
        torch.testing.assert_close(x_t[b], expected.float(), rtol=0, atol=1e-6)
    # t = 0 is nearly clean, t = 999 nearly pure noise.
    assert (x_t[0] - x0[0]).abs().max() < 0.05
    assert (x_t[2] - noise[2]).abs().max() < 1e-3


def test_invalid_timesteps():
    with pytest.raises(ValueError):
        cosine_beta_schedule(0)
