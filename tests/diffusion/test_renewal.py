"""Per-image box renewal + DDIM step."""
import pytest
import torch

from diffusiondet.diffusion import compact_kept_first, ddim_step, renew_and_step

# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


A_T, A_NEXT = 0.14427, 0.49384


class RecordingDraws:
    """draw(b, shape) from one seeded generator per image, logging every call."""

    def __init__(self, num_images, seed=0):
        self.generators = [torch.Generator().manual_seed(seed + b) for b in range(num_images)]
        self.calls = []

    def __call__(self, b, shape):
        self.calls.append((b, tuple(shape)))
        return torch.randn(shape, generator=self.generators[b])


def test_compact_kept_first():
    keep = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    order, num_kept = compact_kept_first(keep)
    assert order.tolist() == [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4]]
    assert num_kept.tolist() == [3, 1]


def test_batch_renewal_is_per_image():
    x0, eps = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.2, 0.5, 0.7], [0.1, 0.2, 0.3, 0.95, 0.4, 0.1]])
    draws = RecordingDraws(2)
    x_next = renew_and_step(x0, eps, scores, 0.5, A_T, A_NEXT, 1.0, draws)
    assert x_next.shape == (2, 6, 4)
    # Kept: image 0 -> proposals 0, 2, 5 (0.5 is not > 0.5); image 1 -> proposal 3.
    assert draws.calls == [(0, (3, 4)), (0, (3, 4)), (1, (1, 4)), (1, (5, 4))]

    replay = RecordingDraws(2)
    noise0, refill0 = replay(0, (3, 4)), replay(0, (3, 4))
    noise1, refill1 = replay(1, (1, 4)), replay(1, (5, 4))
    torch.testing.assert_close(
        x_next[0, :3], ddim_step(x0[0, [0, 2, 5]], eps[0, [0, 2, 5]], A_T, A_NEXT, 1.0, noise0)
    )
    torch.testing.assert_close(x_next[0, 3:], refill0)
    torch.testing.assert_close(
        x_next[1, :1], ddim_step(x0[1, [3]], eps[1, [3]], A_T, A_NEXT, 1.0, noise1)
    )
    torch.testing.assert_close(x_next[1, 1:], refill1)


def test_batch_equals_each_image_alone():
    x0, eps, scores = torch.randn(3, 10, 4), torch.randn(3, 10, 4), torch.rand(3, 10)
    batched = renew_and_step(x0, eps, scores, 0.5, A_T, A_NEXT, 1.0, RecordingDraws(3))
    for b in range(3):
        draws = RecordingDraws(3)
        alone = renew_and_step(
            x0[b : b + 1], eps[b : b + 1], scores[b : b + 1], 0.5, A_T, A_NEXT, 1.0,
            lambda _, shape: draws(b, shape),
        )
        torch.testing.assert_close(batched[b], alone[0])


def test_no_renewal_keeps_all_in_order():
    x0, eps = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    scores = torch.zeros(2, 5)
    draws = RecordingDraws(2)
    x_next = renew_and_step(x0, eps, scores, 0.5, A_T, A_NEXT, 1.0, draws, renew=False)
    assert draws.calls == [(0, (5, 4)), (0, (0, 4)), (1, (5, 4)), (1, (0, 4))]
    replay = RecordingDraws(2)
    for b in range(2):
        noise = replay(b, (5, 4))
        replay(b, (0, 4))
        torch.testing.assert_close(x_next[b], ddim_step(x0[b], eps[b], A_T, A_NEXT, 1.0, noise))


@pytest.mark.parametrize("score", [0.0, 1.0])
def test_all_dropped_or_all_kept(score):
    x0, eps = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    draws = RecordingDraws(1)
    renew_and_step(x0, eps, torch.full((1, 4), score), 0.5, A_T, A_NEXT, 1.0, draws)
    kept = 4 if score > 0.5 else 0
    assert draws.calls == [(0, (kept, 4)), (0, (4 - kept, 4))]


# --- dtype ------------------------------------------------------------------------------------
# Draws may come in another dtype than the samples; the step must not promote them.


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
