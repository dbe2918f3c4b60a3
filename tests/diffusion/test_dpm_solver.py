"""DPM-Solver++ math: the first-order step is DDIM with η = 0, and 2M is second order.

The order check integrates the probability-flow ODE of a Gaussian data distribution N(m, v²),
whose data prediction E[x0 | x_t] and ODE solution are known in closed form.
"""
import math

import pytest
import torch

from diffusiondet.diffusion import (
    cosine_beta_schedule,
    ddim_step,
    ddim_time_pairs,
    diffusion_buffers,
    predict_noise_from_start,
)
from diffusiondet.diffusion.dpm_solver import (
    dpmpp_2m_step,
    first_order_coefficients,
    log_snr_terms,
    second_order_weights,
)

pytestmark = pytest.mark.numerics

MEAN, STD = 0.7, 0.3  # the Gaussian data distribution of the ODE tests


@pytest.fixture(scope="module")
def alphas_cumprod():
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]


@pytest.mark.parametrize("t, t_next", [(999, 749), (749, 499), (499, 249), (999, 0), (10, 9)])
def test_first_order_step_is_ddim_without_noise(alphas_cumprod, t, t_next):
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64) * 1.5
    x0 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).clamp(-2, 2)
    eps = predict_noise_from_start(x_t, torch.full((2,), t), x0, alphas_cumprod)
    a_t, a_next = float(alphas_cumprod[t]), float(alphas_cumprod[t_next])
    ddim = ddim_step(x0, eps, a_t, a_next, 0.0, torch.full_like(x0, 1e6))  # σ = 0: noise unused
    dpm = dpmpp_2m_step(x_t, x0, a_t, a_next)
    torch.testing.assert_close(dpm, ddim, rtol=0, atol=1e-12)


def test_coefficients_by_hand():
    alpha, sigma, lam = log_snr_terms(0.2)
    torch.testing.assert_close(lam, torch.tensor(0.5 * math.log(0.25), dtype=torch.float64))
    assert abs(alpha.item() ** 2 + sigma.item() ** 2 - 1) < 1e-15
    # ᾱ 0.2 -> 0.5: σ_s/σ_t = √(0.5/0.8); e^{−h} = (α_t σ_s)/(σ_t α_s) = 1/2, so c_0 = α_s/2.
    coef_x, coef_x0 = first_order_coefficients(0.2, 0.5)
    assert coef_x.item() == pytest.approx(math.sqrt(0.5 / 0.8), abs=1e-15)
    assert coef_x0.item() == pytest.approx(math.sqrt(0.5) / 2, abs=1e-15)
    # λ = −1, 0, 1 (ᾱ = sigmoid(2λ)): equal steps, r = 1 -> D = 1.5 x̂0_t − 0.5 x̂0_u.
    a = [1 / (1 + math.exp(-2 * lam)) for lam in (-1.0, 0.0, 1.0)]
    assert [w.item() for w in second_order_weights(*a)] == pytest.approx([1.5, -0.5], abs=1e-12)
    # λ = −2, 0, 1: h_prev = 2, h = 1, r = 2 -> 1/(2r) = 1/4.
    a = [1 / (1 + math.exp(-2 * lam)) for lam in (-2.0, 0.0, 1.0)]
    assert [w.item() for w in second_order_weights(*a)] == pytest.approx([1.25, -0.25], abs=1e-12)


def test_history_mask_picks_second_order_per_proposal():
    g = torch.Generator().manual_seed(3)
    x_t, x0, prev = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    has = torch.tensor([[True, False, True], [False, False, True]])
    a_u, a_t, a_s = 0.05, 0.2, 0.5
    mixed = dpmpp_2m_step(x_t, x0, a_t, a_s, prev, a_u, has)
    first = dpmpp_2m_step(x_t, x0, a_t, a_s)
    second = dpmpp_2m_step(x_t, x0, a_t, a_s, prev, a_u)
    torch.testing.assert_close(mixed[has], second[has], rtol=0, atol=0)
    torch.testing.assert_close(mixed[~has], first[~has], rtol=0, atol=0)
    assert (first - second).abs().min() > 1e-3  # the two orders do differ here
    # Written out: x_s = c_x x_t + c_0 (w_t x̂0_t + w_u x̂0_u).
    c_x, c_0 = first_order_coefficients(a_t, a_s)
    w_t, w_u = second_order_weights(a_u, a_t, a_s)
    written_out = c_x * x_t + c_0 * (w_t * x0 + w_u * prev)
    torch.testing.assert_close(second, written_out, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="alpha_cumprod_prev"):
        dpmpp_2m_step(x_t, x0, a_t, a_s, prev)


def _posterior_mean(x, alpha_cumprod):
    """E[x0 | x_t] for x0 ~ N(MEAN, STD²) and x_t = α x0 + σ ε."""
    a, s2 = math.sqrt(alpha_cumprod), 1 - alpha_cumprod
    return MEAN + a * STD**2 * (x - a * MEAN) / (a * a * STD**2 + s2)


def _exact_flow(x, alpha_cumprod_t, alpha_cumprod_s):
    """The PF-ODE maps the N(α m, α² v² + σ²) marginals onto each other affinely."""
    a_t, a_s = math.sqrt(alpha_cumprod_t), math.sqrt(alpha_cumprod_s)
    std_t = math.sqrt(a_t**2 * STD**2 + 1 - alpha_cumprod_t)
    std_s = math.sqrt(a_s**2 * STD**2 + 1 - alpha_cumprod_s)
    return MEAN * a_s + (x - MEAN * a_t) * std_s / std_t


def _ode_error(alphas, second_order):
    """Max |x_end − exact| over a few starting points, integrating along ``alphas`` (ᾱ list)."""
    x_start = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=torch.float64).reshape(1, 4, 1)
    x, prev, a_prev = x_start, None, None
    for a_t, a_s in zip(alphas[:-1], alphas[1:]):
        x0 = _posterior_mean(x, a_t)
        x_next = dpmpp_2m_step(x, x0, a_t, a_s, prev if second_order else None, a_prev)
        x, prev, a_prev = x_next, x0, a_t
    return (x - _exact_flow(x_start, alphas[0], alphas[-1])).abs().max().item()


def test_two_m_is_second_order_on_the_gaussian_flow(alphas_cumprod):
    # From t = 999 to t = 50 of the cosine schedule, K steps uniform in λ (ᾱ = sigmoid(2λ)).
    lam_start = log_snr_terms(float(alphas_cumprod[999]))[2].item()
    lam_end = log_snr_terms(float(alphas_cumprod[50]))[2].item()
    errors = {}
    for steps in (4, 8, 16, 64, 256, 512, 1024):
        lam = torch.linspace(lam_start, lam_end, steps + 1, dtype=torch.float64)
        alphas = torch.sigmoid(2 * lam).tolist()
        errors[steps] = (_ode_error(alphas, False), _ode_error(alphas, True))
        first, second = errors[steps]
        assert second < first, f"K={steps}: 2M {second:.2e} vs first order {first:.2e}"
    assert errors[4][0] > 0.1  # the toy flow is not trivially integrated by either solver
    # Observed orders log2(err(K) / err(2K)) in the asymptotic range (below K = 64 the first
    # step's first-order error and the 2M error still cancel partly: the ratios jump around).
    for steps in (256, 512):
        first_order = math.log2(errors[steps][0] / errors[2 * steps][0])
        second_order = math.log2(errors[steps][1] / errors[2 * steps][1])
        assert 0.9 < first_order < 1.1, (steps, first_order)
        assert 1.8 < second_order < 2.2, (steps, second_order)


@pytest.mark.parametrize("steps, max_ratio", [(4, 0.7), (8, 0.25), (16, 0.15)])
def test_two_m_beats_first_order_on_the_sampler_time_grid(alphas_cumprod, steps, max_ratio):
    # The sampler steps between the t of its (t, t_next) pairs and stops at the last call's t.
    times = [t for t, _ in ddim_time_pairs(1000, steps)]
    alphas = [float(alphas_cumprod[t]) for t in times]
    first, second = _ode_error(alphas, False), _ode_error(alphas, True)
    assert second < max_ratio * first, (steps, first, second)
