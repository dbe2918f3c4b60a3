"""Box geometry end to end on non-square images, where the true boxes are known.

The network's learned parts are replaced by heads whose outputs are known functions of their
inputs, so every expected box below is computed by hand in the test: the resize of the test
augmentation (``ResizeShortestEdge``), the (w, h) normalisation of the diffusion signal, and the
rescale of detections to the original image. Everything else (preprocess, sampler, NMS,
``detector_postprocess``, build/corrupt targets) is the real code.

Coordinates: "original" = the image as stored (inputs carry its "height"/"width");
"input" = the resized, un-padded network input; boxes are xyxy pixels.

Tolerances: the checked values come from a handful of elementwise float32 operations (no
reductions, matmuls or convolutions), so they do not depend on the CPU's kernels; 1e-3 px covers
float32 rounding of coordinates below 200 px with a wide margin. Getting w and h the wrong way
round moves the boxes by pixels.
"""
import math

import numpy as np
import pytest
import torch

from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from diffusiondet.diffusion import ReplayRandom
from tests.utils import tiny_cfg

ATOL = 1e-3  # px, see the module docstring
N_EVAL = 8  # proposals at inference
K = 3  # classes of the tiny config
HIGH_LOGITS = (8.0, 6.0)  # one per object, distinct so that the detection order is known

# Original (height, width), true boxes in original xyxy, their classes, and the network-input
# size that ResizeShortestEdge(64, max 96) of the tiny config must give (worked out by hand):
#   portrait 150x100: short side 100 -> 64, scale 0.64 -> 96x64 (long side 96 <= 96);
#   landscape 90x200: short side 90 -> 64 would make the long side 142 > 96, so scale 96/200 ->
#   43.2x96, rounded to 43x96. Its x and y scale factors differ (200/96 vs 90/43).
CASES = {
    "portrait": {
        "original_hw": (150, 100),
        "input_hw": (96, 64),
        "boxes": [[10.0, 20.0, 60.0, 130.0], [55.0, 5.0, 95.0, 45.0]],
        "classes": [2, 0],
    },
    "landscape": {
        "original_hw": (90, 200),
        "input_hw": (43, 96),
        "boxes": [[20.0, 10.0, 180.0, 40.0], [150.0, 45.0, 195.0, 85.0]],
        "classes": [1, 2],
    },
}


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    net = build_model(cfg)
    net.eval()
    return net


@pytest.fixture(scope="module")
def resize_aug(cfg):
    """The test-time augmentation of the config: [ResizeShortestEdge(64, max 96)]."""
    return T.AugmentationList(detection_utils.build_augmentation(cfg, is_train=False))


def _test_input(resize_aug, case, seed):
    """A test-time input: a random original image through the config's test augmentation."""
    height, width = case["original_hw"]
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    aug_input = T.AugInput(image)
    resize_aug(aug_input)
    resized = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
    assert tuple(resized.shape[1:]) == case["input_hw"]  # the hand-computed resize above
    return {"image": resized, "height": height, "width": width}


def _scale_xyxy(boxes, sx, sy):
    return [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]


def _signal_to_input_xyxy(x, width, height, scale=2.0):
    """Hand-written inverse of the diffusion signal: (N, 4) signal -> abs input xyxy."""
    b = (x.clamp(-scale, scale) / scale + 1.0) / 2.0  # normalised cxcywh
    cx, cy, w, h = b[:, 0] * width, b[:, 1] * height, b[:, 2] * width, b[:, 3] * height
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def _xyxy_to_signal(boxes, width, height, scale=2.0):
    """Hand-written diffusion signal of abs xyxy boxes in a (width x height) image."""
    rows = []
    for x1, y1, x2, y2 in boxes:
        b = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
        rows.append([(2 * v - 1) * scale for v in b])
    return torch.tensor(rows)


def _logits(batch, num_classes, classes_per_image):
    """(B, N, K) logits: proposal i < P scores HIGH_LOGITS[i] for its class; all else -8."""
    logits = torch.full((batch, N_EVAL, num_classes), -8.0)
    for b, classes in enumerate(classes_per_image):
        for i, c in enumerate(classes):
            logits[b, i, c] = HIGH_LOGITS[i]
    return logits


def _run(model, monkeypatch, inputs, x_T, denoise):
    """model.inference with one sampling step, x_T (B, N, 4) replayed, ``denoise`` as the head."""
    calls = []

    def recording_denoise(features, boxes, t):
        calls.append((boxes.clone(), t.clone()))
        return denoise(boxes)

    monkeypatch.setattr(model, "denoise", recording_denoise)
    monkeypatch.setattr(model, "eval_num_proposals", N_EVAL)
    monkeypatch.setattr(model.sampler, "steps", 1)
    monkeypatch.setattr(model.sampler, "use_nms", True)
    rngs = [ReplayRandom([("randn", x)]) for x in x_T]
    results = model.inference(inputs, per_image_rng=rngs)
    assert len(calls) == 1 and all(r.remaining == 0 for r in rngs)
    return results, calls[0]


def _check_detections(results, cases):
    for result, case in zip(results, cases):
        inst = result["instances"]
        assert inst.image_size == case["original_hw"]
        num_obj = len(case["boxes"])
        # NMS returns the detections sorted by score: the known objects come first.
        torch.testing.assert_close(
            inst.pred_boxes.tensor[:num_obj], torch.tensor(case["boxes"]), rtol=0, atol=ATOL
        )
        assert inst.pred_classes[:num_obj].tolist() == case["classes"]
        torch.testing.assert_close(
            inst.scores[:num_obj], torch.sigmoid(torch.tensor(HIGH_LOGITS[:num_obj]))
        )
        assert (inst.scores[num_obj:] < 1e-3).all()


ORDERS = [("portrait", "landscape"), ("landscape", "portrait")]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_fixed_head_boxes_are_rescaled_to_the_original_image(model, resize_aug, monkeypatch, order):
    """The head predicts the true boxes in input pixels; detections must be the true boxes in
    original pixels (x and y scaled separately), and the head must be fed boxes in input pixels.
    A batch of both shapes: the smaller image is padded, which must not change its frame."""
    cases = [CASES[name] for name in order]
    inputs = [_test_input(resize_aug, case, seed) for seed, case in enumerate(cases)]
    pred = torch.tensor([[2.0, 2.0, 9.0, 9.0]]).repeat(len(cases), N_EVAL, 1)
    for b, case in enumerate(cases):
        (h0, w0), (h, w) = case["original_hw"], case["input_hw"]
        pred[b, : len(case["boxes"])] = torch.tensor(_scale_xyxy(case["boxes"], w / w0, h / h0))
    logits = _logits(len(cases), K, [case["classes"] for case in cases])
    # x_T: a spread of signal values, different per coordinate and per image.
    x_T = torch.linspace(-1.9, 1.9, 2 * N_EVAL * 4).reshape(2, N_EVAL, 4)
    x_T[1] = x_T[1].flip(0)

    results, (head_boxes, head_t) = _run(
        model, monkeypatch, inputs, x_T,
        lambda boxes: {"pred_logits": logits.clone(), "pred_boxes": pred.clone()},
    )

    assert head_t.tolist() == [999] * len(cases)
    for b, case in enumerate(cases):
        h, w = case["input_hw"]
        want = _signal_to_input_xyxy(x_T[b], w, h)
        torch.testing.assert_close(head_boxes[b], want, rtol=0, atol=ATOL)
    _check_detections(results, cases)


@pytest.mark.parametrize("name", ["portrait", "landscape"])
def test_identity_head_returns_the_encoded_boxes_in_original_pixels(
    model, resize_aug, monkeypatch, name
):
    """x_T encodes the true boxes, normalised by the (w, h) of the image; a head returning its
    input boxes must then detect exactly the true boxes after the rescale to the original size.
    Any (h, w) / (w, h) mix-up between the sampler's frame and the rescale shows up here."""
    case = CASES[name]
    (h0, w0) = case["original_hw"]
    inputs = [_test_input(resize_aug, case, seed=3)]
    x_T = torch.zeros(1, N_EVAL, 4)  # other proposals: a centred half-size box
    x_T[0, : len(case["boxes"])] = _xyxy_to_signal(case["boxes"], w0, h0)
    logits = _logits(1, K, [case["classes"]])

    results, (head_boxes, _) = _run(
        model, monkeypatch, inputs, x_T,
        lambda boxes: {"pred_logits": logits.clone(), "pred_boxes": boxes.clone()},
    )

    h, w = case["input_hw"]
    torch.testing.assert_close(
        head_boxes[0, : len(case["boxes"])],
        torch.tensor(_scale_xyxy(case["boxes"], w / w0, h / h0)),
        rtol=0,
        atol=ATOL,
    )
    _check_detections(results, [case])


def test_without_height_width_detections_stay_in_the_input_frame(model, resize_aug, monkeypatch):
    """Inputs without "height"/"width" are reported in the network-input frame, unscaled; the
    head still works in that frame."""
    case = CASES["landscape"]
    inp = _test_input(resize_aug, case, seed=4)
    del inp["height"], inp["width"]
    h, w = case["input_hw"]
    h0, w0 = case["original_hw"]
    in_input = _scale_xyxy(case["boxes"], w / w0, h / h0)
    pred = torch.tensor([[2.0, 2.0, 9.0, 9.0]]).repeat(1, N_EVAL, 1)
    pred[0, :2] = torch.tensor(in_input)
    logits = _logits(1, K, [case["classes"]])
    results, (head_boxes, _) = _run(
        model, monkeypatch, [inp], torch.zeros(1, N_EVAL, 4),
        lambda boxes: {"pred_logits": logits.clone(), "pred_boxes": pred.clone()},
    )
    # x_T = 0 is the centred half-size box of the input image.
    centred = torch.tensor([[0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h]]).expand(N_EVAL, 4)
    torch.testing.assert_close(head_boxes[0], centred, rtol=0, atol=ATOL)
    _check_detections(results, [{**case, "original_hw": (h, w), "boxes": in_input}])


def _training_input(height, width, boxes, classes):
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(torch.tensor(boxes))
    inst.gt_classes = torch.tensor(classes)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    return {"image": image, "instances": inst, "height": height, "width": width}


def test_training_targets_and_head_inputs_use_width_and_height(model, monkeypatch):
    """Noise-free corruption of known GT on a portrait and a landscape image (one padded batch):
    the targets carry (w, h, w, h), and the head receives the boxes that the hand-computed
    normalise -> q_sample -> denormalise gives in input pixels."""
    shapes = [(96, 64), (48, 96)]  # (h, w): portrait, landscape; the batch pads to 96x96
    gts = [[[4.0, 10.0, 40.0, 90.0], [30.0, 2.0, 60.0, 20.0]], [[6.0, 4.0, 90.0, 30.0]]]
    classes = [[0, 2], [1]]
    times = [500, 250]
    inputs = [_training_input(h, w, g, c) for (h, w), g, c in zip(shapes, gts, classes)]
    num_proposals = model.num_proposals
    monkeypatch.setattr(model, "padding", "gaussian_concat")
    # Per image: t, the noise (zero) and the placeholder draws (zero -> centred half-size boxes).
    draws = []
    for t, gt in zip(times, gts):
        draws += [("randint", torch.tensor([t])), ("randn", torch.zeros(num_proposals, 4)),
                  ("randn", torch.zeros(num_proposals - len(gt), 4))]
    rng = ReplayRandom(draws)

    _, whwh = model.preprocess_image(inputs)
    assert whwh.tolist() == [[w, h, w, h] for h, w in shapes]
    targets = model.build_targets(inputs, whwh)
    for target, (h, w), gt, cls in zip(targets, shapes, gts, classes):
        assert target["image_size_xyxy"].tolist() == [w, h, w, h]
        assert target["boxes_xyxy"].tolist() == gt  # absolute, not normalised
        assert target["labels"].tolist() == cls

    seen = []
    handle = model.head.register_forward_pre_hook(lambda mod, args: seen.append(args))
    try:
        model.train()
        losses = model.forward_training(inputs, rng=rng)
    finally:
        handle.remove()
        model.eval()
    assert rng.remaining == 0 and len(seen) == 1
    _, head_boxes, head_t = seen[0]
    assert head_t.tolist() == times
    assert all(torch.isfinite(v) for v in losses.values())

    for b, ((h, w), gt, t) in enumerate(zip(shapes, gts, times)):
        # x_t = k * x_0 with x_0 = (2 b - 1) s  =>  normalised cxcywh b_t = k b + (1 - k) / 2.
        k = math.sqrt(float(model.alphas_cumprod[t]))
        want = []
        for x1, y1, x2, y2 in gt:
            cx, cy, bw, bh = ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
            cx, cy, bw, bh = (k * v + (1 - k) / 2 for v in (cx, cy, bw, bh))
            x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
            want.append([x1 * w, y1 * h, x2 * w, y2 * h])
        # Placeholders (0.5, 0.5, 0.5, 0.5) have signal 0, which q_sample leaves at 0.
        want += [[0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h]] * (num_proposals - len(gt))
        torch.testing.assert_close(head_boxes[b], torch.tensor(want), rtol=0, atol=ATOL)
