"""Training corruption: padding strategies, draw order, official parity."""
import pytest
import torch

from diffusiondet.diffusion import (
    PADDING_STRATEGIES,
    ReplayRandom,
    TorchRandom,
    corrupt_boxes,
    cosine_beta_schedule,
    diffusion_buffers,
    normalized_cxcywh_to_signal,
    pad_boxes,
    signal_to_boxes,
    xyxy_to_cxcywh,
)

# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


FULL_IMAGE = torch.tensor([0.5, 0.5, 1.0, 1.0])


@pytest.fixture(scope="module")
def alphas_cumprod():
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]


def _seeded(seed=0):
    return TorchRandom(generator=torch.Generator().manual_seed(seed))


def test_official_parity(parity, alphas_cumprod):
    rng = ReplayRandom(parity["train_draws"])  # (kind, tensor) pairs: kinds are checked too
    num_proposals = parity["meta"]["num_proposals"]
    scale = parity["meta"]["snr_scale"]
    for i, (gt_xyxy, (h, w)) in enumerate(zip(parity["gt_boxes"], parity["image_sizes"].tolist())):
        whwh = torch.tensor([w, h, w, h], dtype=torch.float32)
        out = corrupt_boxes(
            xyxy_to_cxcywh(gt_xyxy / whwh), num_proposals, alphas_cumprod, scale,
            "gaussian_concat", 1 / 6, rng,
        )
        assert out.t.dtype == torch.long and out.t.item() == parity["train_t"][i].item()
        assert out.x_t.dtype == torch.float32
        noisy_xyxy = signal_to_boxes(out.x_t, whwh, scale)
        err = (noisy_xyxy - parity["train_noisy_boxes"][i]).abs().max().item()
        assert err <= 1e-4, f"image {i}: max abs error {err}"
    assert rng.remaining == 0


def test_draw_order_and_outputs(alphas_cumprod):
    gt = torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.6, 0.6, 0.5, 0.5]])
    t, noise, placeholders = torch.tensor([700]), torch.randn(6, 4), torch.randn(4, 4)
    rng = ReplayRandom([("randint", t), ("randn", noise), ("randn", placeholders)])
    out = corrupt_boxes(gt, 6, alphas_cumprod, 2.0, "gaussian_concat", 0.25, rng)
    assert rng.remaining == 0
    padded = torch.cat([gt, placeholders * 0.25 + 0.5])
    padded[:, 2:] = padded[:, 2:].clamp(min=1e-4)
    torch.testing.assert_close(out.x_0, normalized_cxcywh_to_signal(padded, 2.0))
    torch.testing.assert_close(out.noise, noise)
    a = alphas_cumprod[700].item()
    expected = (a**0.5 * out.x_0 + (1 - a) ** 0.5 * noise).clamp(-2.0, 2.0)
    torch.testing.assert_close(out.x_t, expected, rtol=0, atol=1e-6)
    assert out.t.tolist() == [700]


def test_x_t_is_clamped(alphas_cumprod):
    gt = torch.tensor([[0.5, 0.5, 0.9, 0.9]])
    rng = ReplayRandom([torch.tensor([999]), torch.full((3, 4), 10.0), torch.zeros(2, 4)])
    out = corrupt_boxes(gt, 3, alphas_cumprod, 2.0, "gaussian_concat", 1 / 6, rng)
    assert out.x_t.max().item() == 2.0


def test_gaussian_placeholder_statistics():
    gt = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]])
    padded = pad_boxes(gt, 20002, "gaussian_concat", 1 / 6, _seeded())
    assert padded.shape == (20002, 4)
    torch.testing.assert_close(padded[:2], gt)
    placeholders = padded[2:]
    assert (placeholders.mean(0) - 0.5).abs().max() < 0.005
    assert (placeholders[:, :2].std(0) - 1 / 6).abs().max() < 0.005
    assert placeholders[:, 2:].min().item() == pytest.approx(1e-4)  # float32 1e-4


def test_placeholder_size_clipping():
    padded = pad_boxes(torch.zeros(0, 4), 5000, "gaussian_concat", 1.0, _seeded())
    sizes, centres = padded[1:, 2:], padded[1:, :2]
    assert sizes.min().item() == pytest.approx(1e-4)
    assert (sizes == sizes.min()).float().mean() > 0.2  # about P(N(0.5, 1) < 1e-4) = 31%
    assert centres.min().item() < 0  # centres are not clipped


def test_uniform_placeholders():
    padded = pad_boxes(torch.zeros(1, 4) + 0.5, 10001, "uniform_concat", 1 / 6, _seeded())[1:]
    assert padded.min().item() >= 0 and padded.max().item() < 1
    assert (padded.mean(0) - 0.5).abs().max() < 0.01
    assert (padded.std(0) - (1 / 12) ** 0.5).abs().max() < 0.01


def test_full_image_placeholders_draw_nothing():
    gt = torch.rand(3, 4)
    padded = pad_boxes(gt, 8, "full_image_concat", 1 / 6, ReplayRandom([]))
    torch.testing.assert_close(padded[:3], gt)
    torch.testing.assert_close(padded[3:], FULL_IMAGE.expand(5, 4))


def test_repeat_strategy():
    gt = torch.tensor([[0.1] * 4, [0.2] * 4, [0.3] * 4])
    # N = 11 = 3 * 3 + 2: the first two GTs of the permutation (2 and 0) get one extra copy.
    padded = pad_boxes(gt, 11, "repeat", 1 / 6, ReplayRandom([torch.tensor([2, 0, 1])]))
    expected = torch.tensor([0.1] * 4 + [0.2] * 3 + [0.3] * 4)[:, None].expand(11, 4)
    torch.testing.assert_close(padded, expected)
    counts = torch.stack(
        [(pad_boxes(gt, 10, "repeat", 1 / 6, _seeded(s))[:, 0] == 0.1).sum() for s in range(40)]
    )
    assert set(counts.tolist()) == {3, 4}  # the +1 lands on different GTs


def test_more_gt_than_proposals_keeps_original_order():
    gt = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    rng = ReplayRandom([("randperm", torch.tensor([7, 2, 9, 0, 1, 3, 4, 5, 6, 8]))])
    padded = pad_boxes(gt, 4, "gaussian_concat", 1 / 6, rng)
    torch.testing.assert_close(padded, gt[[0, 2, 7, 9]])


def test_equal_count_is_identity():
    gt = torch.rand(6, 4)
    for strategy in PADDING_STRATEGIES:
        assert torch.equal(pad_boxes(gt, 6, strategy, 1 / 6, ReplayRandom([])), gt)


@pytest.mark.parametrize("strategy", PADDING_STRATEGIES)
def test_empty_image_uses_full_image_box(strategy):
    padded = pad_boxes(torch.zeros(0, 4), 7, strategy, 1 / 6, _seeded())
    assert padded.shape == (7, 4)
    torch.testing.assert_close(padded[0], FULL_IMAGE)
    if strategy in ("full_image_concat", "repeat"):
        torch.testing.assert_close(padded, FULL_IMAGE.expand(7, 4))


def test_unknown_strategy():
    with pytest.raises(ValueError, match="gaussian_concat"):
        pad_boxes(torch.rand(2, 4), 5, "mirror", 1 / 6, _seeded())


def test_replay_rejects_wrong_size_and_exhaustion():
    rng = ReplayRandom([torch.zeros(3)])
    with pytest.raises(RuntimeError, match="elements"):
        rng.randn((2, 2))
    rng.randn((3, 1))
    with pytest.raises(RuntimeError, match="ran out"):
        rng.randn((1,))


# --- random sources, one proposal, dtype and device -------------------------------------------
# Each test below calls everything it checks itself (no module fixture): mutmut credits a
# function only to the tests that call it, and a module fixture runs inside the first test of
# the module only.

META = torch.device("meta")


def _alphas_cumprod(dtype=torch.float64):
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"].to(dtype)


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
