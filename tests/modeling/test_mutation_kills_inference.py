"""Meta-architecture, sampler and post-processing details the other tests leave open (found by
mutation testing): the detectron2 entry point in eval mode, the backbone's padding constraints,
the AMP autocast dtypes, softmax-path box renewal and stable score ordering.
"""
import pytest
import torch
from torch import nn

from detectron2.modeling import build_model

from diffusiondet.diffusion import RandomSource, cosine_beta_schedule, diffusion_buffers
from diffusiondet.modeling.meta_arch import to_fp32
from diffusiondet.modeling.postprocess import cap_detections
from diffusiondet.modeling.sampler import DDIMBoxSampler
from tests.utils import random_input, tiny_cfg


@pytest.fixture
def model():
    return build_model(tiny_cfg()).eval()


def test_calling_the_model_in_eval_mode_runs_inference(model):
    inputs = [random_input(height=64, width=80), random_input(height=48, width=96, seed=1)]
    with torch.no_grad():
        results = model(inputs)
    assert len(results) == 2
    assert results[0]["instances"].image_size == (64, 80)
    assert results[1]["instances"].image_size == (48, 96)
    assert len(results[0]["instances"]) > 0


class _SquarePaddingBackbone(nn.Module):
    size_divisibility = 32
    padding_constraints = {"square_size": 128}


def test_images_are_padded_as_the_backbone_requires(model):
    model.backbone = _SquarePaddingBackbone()
    images, whwh = model.preprocess_image([random_input(height=64, width=80)])
    assert tuple(images.tensor.shape) == (1, 3, 128, 128)
    assert images.image_sizes == [(64, 80)]
    assert whwh.dtype == torch.float32 and whwh.tolist() == [[80.0, 64.0, 80.0, 64.0]]


@pytest.mark.parametrize("amp, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_inference_autocast_uses_the_configured_dtype(model, amp, dtype):
    model.inference_amp = amp
    with model.inference_autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == dtype
    model.inference_amp = ""
    with model.inference_autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_amp_outputs_cast_only_floating_tensors_to_fp32():
    assert to_fp32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    labels = torch.tensor([1, 2])
    assert to_fp32(labels) is labels
    assert to_fp32("not a tensor") == "not a tensor"


class _RecordingRandom(RandomSource):
    def __init__(self):
        self.shapes = []

    def randn(self, shape):
        self.shapes.append(tuple(shape))
        return torch.zeros(tuple(shape))


def test_softmax_renewal_keeps_proposals_by_their_best_foreground_probability():
    # 3 proposals sure of class 0, one of class 1, two of the background (last logit).
    logits = torch.tensor([[[5.0, 0, 0]] * 3 + [[0, 5.0, 0]] + [[0, 0, 5.0]] * 2])
    boxes = torch.tensor([[[10.0, 10.0, 30.0, 30.0]] * 6])

    def denoise(x, t):
        return {"pred_logits": logits, "pred_boxes": boxes}

    rng = _RecordingRandom()
    sampler = DDIMBoxSampler(steps=2, use_focal=False, renewal_threshold=0.5)
    alphas_cumprod = diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]
    sampler(denoise, alphas_cumprod, torch.tensor([[80.0, 64.0, 80.0, 64.0]]), 6, rng=rng)
    # x_T, then the DDIM noise of the 4 kept proposals and the refill of the 2 others.
    assert rng.shapes == [(6, 4), (4, 4), (2, 4)]


def test_capping_keeps_tied_detections_in_their_original_order():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.9, 0.1] * 40)
    cand = {"scores": scores, "classes": torch.arange(240), "boxes": torch.zeros(240, 4)}
    capped = cap_detections(cand, 100)
    order = capped["classes"].tolist()
    assert order[:80] == [i for i in range(240) if i % 6 in (1, 4)]
    assert order[80:] == [i for i in range(240) if i % 6 in (0, 2, 3)][:20]
