"""Diffusion math: dtype/device contracts, edge sizes and error texts that the other tests leave
open (found by mutation testing, see the README's development section).

Every call under test is made inside the test itself (no module-scoped fixtures), so that
mutmut attributes the covered functions to these tests.

Exactness: the checks below compare elementwise IEEE operations (add, mul, div, sqrt; all
correctly rounded) done in the same order, so they are exact on every CPU; "representable in
float32" is used to tell float32 arithmetic from float64 arithmetic without hard-coding values.
"""
import math

import pytest
import torch

from diffusiondet.diffusion import (
    ReplayRandom,
    TorchRandom,
    boxes_to_signal,
    corrupt_boxes,
    cosine_beta_schedule,
    ddim_step,
    ddim_time_pairs,
    diffusion_buffers,
    pad_boxes,
    predict_noise_from_start,
    q_sample,
    renew_and_step,
    signal_to_boxes,
)

pytestmark = pytest.mark.numerics

META = torch.device("meta")


def _float32_representable(x):
    return torch.equal(x.float().double(), x.double())


def _alphas_cumprod(dtype=torch.float64):
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"].to(dtype)


# --- schedule ---------------------------------------------------------------------------------


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


# --- q_sample / noise prediction / DDIM step: arithmetic dtype and device ---------------------


def test_q_sample_computes_in_the_schedule_dtype_and_follows_the_sample_device():
    x0, noise = torch.rand(2, 5, 4, dtype=torch.float64) * 4 - 2, torch.randn(2, 5, 4).double()
    t = torch.tensor([10, 700])
    x_t = q_sample(x0, t, _alphas_cumprod(torch.float32), noise)
    assert x_t.dtype == torch.float64 and _float32_representable(x_t)
    # A schedule kept on the CPU is moved to the samples' device.
    on_meta = q_sample(x0.to(META), t.to(META), _alphas_cumprod(), noise.to(META))
    assert on_meta.device == META


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


# --- box <-> signal conversions keep the boxes' dtype ---------------------------------------------


def test_conversions_keep_the_box_dtype_for_float64_image_sizes():
    whwh = torch.tensor([[640.0, 480.0, 640.0, 480.0]], dtype=torch.float64)
    boxes = torch.tensor([[[10.0, 20.0, 300.0, 200.0]]])
    signal = boxes_to_signal(boxes, whwh, 2.0)
    assert signal.dtype == torch.float32
    back = signal_to_boxes(signal, whwh, 2.0)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-3)


# --- random sources -----------------------------------------------------------------------------


def test_torch_random_uses_its_generator_dtype_and_device():
    rng = TorchRandom(dtype=torch.float64, generator=torch.Generator().manual_seed(123))
    ref = torch.Generator().manual_seed(123)
    torch.manual_seed(999)  # the global RNG must play no part
    assert torch.equal(rng.randn((3, 4)), torch.randn(3, 4, generator=ref, dtype=torch.float64))
    assert torch.equal(rng.rand((5,)), torch.rand(5, generator=ref, dtype=torch.float64))
    assert torch.equal(rng.randint(7, (6,)), torch.randint(7, (6,), generator=ref))
    assert torch.equal(rng.randperm(9), torch.randperm(9, generator=ref))
    meta = TorchRandom(device=META)
    assert meta.randn((2,)).device == META and meta.rand((2,)).device == META
    assert meta.randint(3, (2,)).device == META and meta.randperm(4).device == META
    assert meta.randint(3, (2,)).dtype == torch.long and meta.randperm(4).dtype == torch.long


def test_replay_rand_returns_the_recorded_uniform_draws_and_checks_their_kind():
    first, second = torch.rand(6), torch.rand(2, 2)
    rng = ReplayRandom([("rand", first), ("rand_like", second), ("randn", torch.zeros(2))])
    assert torch.equal(rng.rand((2, 3)), first.reshape(2, 3))
    assert torch.equal(rng.rand((4,)), second.reshape(4))
    with pytest.raises(RuntimeError, match=r"draw #2 was recorded as 'randn' but 'rand'"):
        rng.rand((2,))


# --- padding and corruption ---------------------------------------------------------------------


def test_one_proposal_is_a_valid_count():
    rng = ReplayRandom([torch.tensor([2, 0, 1])])
    gt = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2], [0.3, 0.3, 0.3, 0.3]])
    assert torch.equal(pad_boxes(gt, 1, "gaussian_concat", 0.1, rng), gt[2:3])
    empty = pad_boxes(torch.zeros(0, 4), 1, "repeat", 0.1, ReplayRandom([]))
    assert torch.equal(empty, torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="num_proposals must be >= 1, got 0"):
        pad_boxes(gt, 0, "repeat", 0.1, ReplayRandom([]))


def test_placeholders_are_computed_in_the_ground_truth_dtype():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    draws = torch.tensor([[0.1, -0.3, 0.7, 1.3], [0.2, 0.4, -0.6, 0.9]])
    out = pad_boxes(gt, 3, "gaussian_concat", 1 / 6, ReplayRandom([draws]))
    assert out.dtype == torch.float64
    assert torch.equal(out[1:], draws.double() * (1 / 6) + 0.5)
    uniform = torch.tensor([[0.25, 0.75, 0.0, 0.5]])
    out = pad_boxes(gt, 2, "uniform_concat", 1 / 6, ReplayRandom([uniform]))
    # The 1e-4 floor is applied in float64 (float32's 1e-4 is 9.99999974737875e-05).
    assert out[1, 2].item() == 1e-4 and out[1, 3].item() == 0.5


def test_corruption_outputs_follow_the_ground_truth_dtype_and_device():
    gt = torch.tensor([[0.3, 0.4, 0.2, 0.1]], dtype=torch.float64)
    noise = torch.randn(3, 4)
    draws = [torch.tensor([5]), noise, torch.randn(2, 4)]
    out = corrupt_boxes(gt, 3, _alphas_cumprod(), 2.0, "gaussian_concat", 0.1, ReplayRandom(draws))
    assert out.noise.dtype == torch.float64 and torch.equal(out.noise, noise.double())
    assert out.x_t.dtype == torch.float64 and out.t.dtype == torch.long
    on_meta = corrupt_boxes(
        gt.to(META), 3, _alphas_cumprod(), 2.0, "gaussian_concat", 0.1, ReplayRandom(draws)
    )
    assert on_meta.t.device == META and on_meta.x_t.device == META


def test_noisy_boxes_are_clamped_from_below():
    gt = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    draws = [torch.tensor([999]), torch.full((2, 4), -50.0), torch.zeros(1, 4)]
    out = corrupt_boxes(gt, 2, _alphas_cumprod(), 2.0, "gaussian_concat", 0.1, ReplayRandom(draws))
    assert torch.equal(out.x_t, torch.full((2, 4), -2.0))


# --- renewal ------------------------------------------------------------------------------------


def test_renewal_casts_the_drawn_noise_to_the_sample_dtype():
    x0, eps = torch.rand(1, 4, 4), torch.randn(1, 4, 4)
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.7]])
    draws = {}

    def draw(b, shape):
        draws[shape] = torch.randn(shape, dtype=torch.float64)
        return draws[shape]

    out = renew_and_step(x0, eps, scores, 0.5, 0.3, 0.6, 1.0, draw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, 3:], draws[(1, 4)].float(), rtol=0, atol=0)
    kept = [0, 2, 3]
    expected = ddim_step(x0[:, kept], eps[:, kept], 0.3, 0.6, 1.0, draws[(3, 4)][None].float())
    torch.testing.assert_close(out[:, :3], expected, rtol=0, atol=0)
