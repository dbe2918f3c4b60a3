"""DDIM time pairs, ε̂ from x̂_0, and the DDIM update."""
import math

import pytest
import torch

from diffusiondet.diffusion import (
    cosine_beta_schedule,
    ddim_coefficients,
    ddim_step,
    ddim_time_pairs,
    diffusion_buffers,
    predict_noise_from_start,
    q_sample,
)


# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def alphas_cumprod():
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]


def test_time_pairs_of_the_official_sampler():
    assert ddim_time_pairs(1000, 1) == [(999, -1)]
    assert ddim_time_pairs(1000, 2) == [(999, 499), (499, -1)]
    assert ddim_time_pairs(1000, 4) == [(999, 749), (749, 499), (499, 249), (249, -1)]
    eight = [999, 874, 749, 624, 499, 374, 249, 124, -1]
    assert ddim_time_pairs(1000, 8) == list(zip(eight[:-1], eight[1:]))


def test_time_pairs_truncate_towards_zero():
    # linspace(-1, 999, 4) = -1, 332.33, 665.67, 999 -> truncated, not rounded.
    assert ddim_time_pairs(1000, 3) == [(999, 665), (665, 332), (332, -1)]
    pairs = ddim_time_pairs(10, 10)
    assert pairs[0] == (9, 8) and pairs[-1] == (0, -1)


@pytest.mark.parametrize("steps", [0, -2, 1001])
def test_time_pairs_reject_bad_steps(steps):
    with pytest.raises(ValueError):
        ddim_time_pairs(1000, steps)


def test_noise_prediction_inverts_q_sample(alphas_cumprod):
    x0 = torch.rand(2, 5, 4) * 4 - 2
    noise = torch.randn(2, 5, 4)
    t = torch.tensor([100, 900])
    x_t = q_sample(x0, t, alphas_cumprod, noise)
    eps = predict_noise_from_start(x_t, t, x0, alphas_cumprod)
    assert eps.dtype == torch.float32
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-4)


def test_coefficients_match_the_official_numbers(alphas_cumprod):
    expected = {(999, 749): (0.380, 1e-4, 0.925), (749, 499): (0.703, 0.296, 0.647),
                (499, 249): (0.920, 0.164, 0.355)}
    for (t, t_next), (sqrt_next, coef, sigma) in expected.items():
        got = ddim_coefficients(alphas_cumprod[t].item(), alphas_cumprod[t_next].item(), 1.0)
        assert got[0] == pytest.approx(sqrt_next, abs=1e-3)
        assert got[1] == pytest.approx(coef, abs=1.5e-3 if coef > 1e-3 else 2e-5)
        assert got[2] == pytest.approx(sigma, abs=1e-3)


def test_step_matches_hand_formula(alphas_cumprod):
    x0, eps, z = torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    a_t, a_n = alphas_cumprod[749].item(), alphas_cumprod[499].item()
    for eta in (0.0, 0.5, 1.0):
        sigma = eta * math.sqrt((1 - a_t / a_n) * (1 - a_n) / (1 - a_t))
        expected = math.sqrt(a_n) * x0 + math.sqrt(1 - a_n - sigma**2) * eps + sigma * z
        torch.testing.assert_close(ddim_step(x0, eps, a_t, a_n, eta, z), expected)
        # Tensor ᾱ give the same result as floats.
        tensor_result = ddim_step(x0, eps, alphas_cumprod[749], alphas_cumprod[499], eta, z)
        assert tensor_result.dtype == torch.float32
        torch.testing.assert_close(tensor_result, expected)


def test_eta_zero_is_deterministic(alphas_cumprod):
    x0, eps = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    a_t, a_n = alphas_cumprod[999].item(), alphas_cumprod[499].item()
    first = ddim_step(x0, eps, a_t, a_n, 0.0, torch.randn(1, 4, 4))
    second = ddim_step(x0, eps, a_t, a_n, 0.0, torch.randn(1, 4, 4))
    torch.testing.assert_close(first, second)


def test_consistent_x0_and_eps_reproduce_q_sample(alphas_cumprod):
    # With η = 0 and the true (x_0, ε), DDIM lands exactly on q_sample at t_next with the same ε.
    x0, noise = torch.rand(3, 8, 4) * 4 - 2, torch.randn(3, 8, 4)
    a_n = alphas_cumprod[249].item()
    stepped = ddim_step(x0, noise, alphas_cumprod[749].item(), a_n, 0.0, torch.zeros_like(x0))
    expected = q_sample(x0, torch.full((3,), 249), alphas_cumprod, noise)
    torch.testing.assert_close(stepped, expected, rtol=0, atol=1e-5)


# --- arithmetic dtype, device and default-dtype independence ----------------------------------
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


def test_noise_prediction_computes_in_the_schedule_dtype_and_follows_the_sample_device():
    x_t, x0 = torch.randn(2, 5, 4).double(), torch.rand(2, 5, 4).double()
    t = torch.tensor([3, 999])
    eps = predict_noise_from_start(x_t, t, x0, _alphas_cumprod(torch.float32))
    assert eps.dtype == torch.float64 and _float32_representable(eps)
    on_meta = predict_noise_from_start(x_t.to(META), t.to(META), x0.to(META), _alphas_cumprod())
    assert on_meta.device == META


def test_ddim_step_returns_the_prediction_dtype_for_tensor_coefficients():
    x0, eps, z = torch.rand(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    a_t = torch.tensor([0.2, 0.3], dtype=torch.float64).view(2, 1, 1)
    a_next = torch.tensor([0.5, 0.6], dtype=torch.float64).view(2, 1, 1)
    assert ddim_step(x0, eps, a_t, a_next, 1.0, z).dtype == torch.float32


def test_time_pairs_do_not_depend_on_the_default_dtype():
    # S = 26 is the first step count whose float64 linspace truncates differently.
    expected = ddim_time_pairs(1000, 26)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert ddim_time_pairs(1000, 26) == expected
    finally:
        torch.set_default_dtype(previous)
    assert expected[0] == (999, 960) and expected[-1][1] == -1
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\], got 0"):
        ddim_time_pairs(1000, 0)
