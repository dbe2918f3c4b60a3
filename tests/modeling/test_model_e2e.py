"""End-to-end checks of the DiffusionDet meta-architecture on CPU with a tiny configuration."""
import copy

import pytest
import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from diffusiondet.diffusion import TorchRandom
from diffusiondet.modeling.inference import to_fp32
from tests.utils import random_input, tiny_cfg


# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def _with_boxes(inp, boxes, classes):
    inp = dict(inp)
    inst = Instances(inp["instances"].image_size)
    inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.long)
    inp["instances"] = inst
    return inp


def test_training_losses_finite_with_empty_and_degenerate_targets(model):
    model.train()
    empty = _with_boxes(random_input(seed=1), [], [])
    degenerate = _with_boxes(random_input(seed=2), [[10, 10, 10, 30], [5, 5, 40, 40], [70, 60, 70, 60]], [0, 1, 2])
    crowded = random_input(seed=3, num_boxes=35)  # more GT than the 20 proposals
    head_outputs = []
    handle = model.head.register_forward_hook(lambda mod, args, out: head_outputs.append(out))
    try:
        losses = model([empty, degenerate, crowded])
    finally:
        handle.remove()
    assert len(losses) == 3 * 2  # (ce, bbox, giou) x 2 stages
    # The losses are the criterion's on the head outputs and targets built here by hand: labels
    # and absolute boxes of the inputs, and (w, h, w, h) of each 64x80 (h x w) input image.
    targets = [
        {
            "labels": x["instances"].gt_classes.long(),
            "boxes_xyxy": x["instances"].gt_boxes.tensor.float(),
            "image_size_xyxy": torch.tensor([80.0, 64.0, 80.0, 64.0]),
        }
        for x in (empty, degenerate, crowded)
    ]
    assert all(tuple(x["image"].shape[1:]) == (64, 80) for x in (empty, degenerate, crowded))
    (outputs,) = head_outputs
    with torch.no_grad():
        want = model.criterion(outputs, targets)
    assert set(losses) == set(want)
    for key in want:
        # Same ops on the same tensors; a small tolerance only in case of a fused-kernel path.
        torch.testing.assert_close(losses[key].detach(), want[key], rtol=1e-5, atol=1e-6)
    assert losses["loss_bbox"] > 0 and losses["loss_giou"] > 0  # some queries matched
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def _infer(model, inputs, seeds, **kw):
    model.eval()
    rngs = [TorchRandom(generator=torch.Generator().manual_seed(s)) for s in seeds]
    return model.inference(inputs, per_image_rng=rngs, **kw)


@pytest.mark.parametrize("steps", [1, 3])
def test_batch_of_two_equals_each_image_alone(model, steps):
    model = copy.deepcopy(model)
    model.sampler.steps = steps
    model.sampler.renewal_threshold = 0.2  # with an untrained head, make renewal keep some boxes
    a, b = random_input(64, 80, seed=4), random_input(48, 96, seed=5)
    both = _infer(model, [a, b], [11, 12])
    alone = [_infer(model, [a], [11])[0], _infer(model, [b], [12])[0]]
    for x, y in zip(both, alone):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 0
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(x.scores, y.scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(x.pred_classes, y.pred_classes)


def test_eval_boxes_independent_of_training_and_rescaled(model):
    model = copy.deepcopy(model)
    model.eval()
    model.sampler.use_nms = False
    inp = random_input(64, 80, seed=6)
    # The original image: ResizeShortestEdge(64) maps 101x126 (h x w) to 64x80, so the
    # detections must be rescaled by 126/80 in x and 101/64 in y (different factors).
    inp["height"], inp["width"] = 101, 126
    sx, sy = 126 / 80, 101 / 64
    calls = []
    model.head.register_forward_pre_hook(lambda mod, args: calls.append(args[1].shape))
    for n in (7, 50):  # eval proposals, independent of the 20 training proposals
        model.eval_num_proposals = n
        calls.clear()
        raw = _infer(model, [inp], [21], do_postprocess=False)[0]["instances"]
        out = _infer(model, [inp], [21])[0]["instances"]
        assert calls == [(1, n, 4)] * 2  # SAMPLE_STEP 1: one head call with n boxes per run
        assert raw.image_size == (64, 80)
        assert len(raw) == n  # no NMS, K >= 1: top-n of the n*K (proposal, class) pairs
        # The sampler's boxes are not clipped; the rescale scales x and y separately, then clips
        # to the original image and drops boxes left empty (detectron2's detector_postprocess).
        scaled = raw.pred_boxes.tensor * torch.tensor([sx, sy, sx, sy])
        clipped = torch.stack(
            [scaled[:, 0].clamp(0, 126), scaled[:, 1].clamp(0, 101),
             scaled[:, 2].clamp(0, 126), scaled[:, 3].clamp(0, 101)], dim=1
        )
        assert (clipped != scaled).any()  # the untrained head predicts beyond the image
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        assert keep.sum() > 0
        assert out.image_size == (101, 126)
        torch.testing.assert_close(out.pred_boxes.tensor, clipped[keep], rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(out.scores, raw.scores[keep])
        assert torch.equal(out.pred_classes, raw.pred_classes[keep])


def test_short_training_decreases_loss():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg)
    model.train()
    from diffusiondet.engine import build_optimizer

    opt = build_optimizer(cfg, model)
    batch = [random_input(seed=10, num_boxes=4), random_input(seed=11, num_boxes=6)]
    history = []
    for _ in range(40):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:8]) / 8, sum(history[-8:]) / 8
    assert last < 0.8 * first, (first, last)


# --- detectron2 entry point, padding constraints, AMP dtypes ----------------------------------


@pytest.fixture
def eval_model():
    """A fresh model per test: the tests below replace parts of it."""
    return build_model(tiny_cfg()).eval()


def test_calling_the_model_in_eval_mode_runs_inference(eval_model):
    inputs = [random_input(height=64, width=80), random_input(height=48, width=96, seed=1)]
    with torch.no_grad():
        results = eval_model(inputs)
    assert len(results) == 2
    assert results[0]["instances"].image_size == (64, 80)
    assert results[1]["instances"].image_size == (48, 96)
    assert len(results[0]["instances"]) > 0


class _SquarePaddingBackbone(nn.Module):
    size_divisibility = 32
    padding_constraints = {"square_size": 128}


def test_images_are_padded_as_the_backbone_requires(eval_model):
    eval_model.backbone = _SquarePaddingBackbone()
    images, whwh = eval_model.preprocess_image([random_input(height=64, width=80)])
    assert tuple(images.tensor.shape) == (1, 3, 128, 128)
    assert images.image_sizes == [(64, 80)]
    assert whwh.dtype == torch.float32 and whwh.tolist() == [[80.0, 64.0, 80.0, 64.0]]


@pytest.mark.parametrize("amp, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_inference_autocast_uses_the_configured_dtype(eval_model, amp, dtype):
    eval_model.inference_amp = amp
    with eval_model.inference_autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == dtype
    eval_model.inference_amp = ""
    with eval_model.inference_autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_amp_outputs_cast_only_floating_tensors_to_fp32():
    assert to_fp32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    labels = torch.tensor([1, 2])
    assert to_fp32(labels) is labels
    assert to_fp32("not a tensor") == "not a tensor"
