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


def test_reference_values_of_the_official_schedule(buffers):
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


# --- one timestep, every buffer at every t, dtype and device ----------------------------------
# Each test below calls everything it checks itself (no module fixture): mutmut credits a
# function only to the tests that call it, and a module fixture runs inside the first test of
# the module only.
# Exactness: these compare elementwise IEEE operations (add, mul, div, sqrt; all correctly
# rounded) done in the same order, so they hold on every CPU; "representable in float32"
# tells float32 arithmetic from float64 arithmetic without hard-coding values.

META = torch.device("meta")


def _float32_representable(x):
    return torch.equal(x.float().double(), x.double())


def _alphas_cumprod(dtype=torch.float64):
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"].to(dtype)


def test_single_timestep_schedule_is_allowed_and_clipped():
    betas = cosine_beta_schedule(1)
    assert betas.shape == (1,) and betas.item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="num_timesteps must be >= 1, got 0"):
        cosine_beta_schedule(0)


def test_every_buffer_matches_its_closed_form_at_every_timestep():
    betas = cosine_beta_schedule(50)
    buffers = diffusion_buffers(betas)
    ac, prod = [], 1.0
    for beta in betas.tolist():
        prod *= 1.0 - beta
        ac.append(prod)
    for t, beta in enumerate(betas.tolist()):
        a, a_prev = ac[t], (ac[t - 1] if t else 1.0)
        post_var = beta * (1 - a_prev) / (1 - a)
        expected = {
            "betas": beta,
            "alphas_cumprod": a,
            "alphas_cumprod_prev": a_prev,
            "sqrt_alphas_cumprod": math.sqrt(a),
            "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - a),
            "log_one_minus_alphas_cumprod": math.log(1 - a),
            "sqrt_recip_alphas_cumprod": math.sqrt(1 / a),
            "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / a - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": math.log(max(post_var, 1e-20)),
            "posterior_mean_coef1": beta * math.sqrt(a_prev) / (1 - a),
            "posterior_mean_coef2": (1 - a_prev) * math.sqrt(1 - beta) / (1 - a),
        }
        for name, value in expected.items():
            got = buffers[name][t].item()
            assert got == pytest.approx(value, rel=1e-9, abs=1e-300), (name, t)


def test_q_sample_computes_in_the_schedule_dtype_and_follows_the_sample_device():
    x0, noise = torch.rand(2, 5, 4, dtype=torch.float64) * 4 - 2, torch.randn(2, 5, 4).double()
    t = torch.tensor([10, 700])
    x_t = q_sample(x0, t, _alphas_cumprod(torch.float32), noise)
    assert x_t.dtype == torch.float64 and _float32_representable(x_t)
    # A schedule kept on the CPU is moved to the samples' device.
    on_meta = q_sample(x0.to(META), t.to(META), _alphas_cumprod(), noise.to(META))
    assert on_meta.device == META
