"""Inference branches the default config never takes: batched evaluation through the trainer
(TEST.IMS_PER_BATCH > 1), the softmax renewal score (USE_FOCAL False) and fp16 autocast
(INFERENCE_AMP fp16) on CPU.

(LVISEvaluator, the other evaluation branch, is tested in tests/evaluation/test_lvis_evaluation.py.)
"""
import copy
import json
import math
import os

import pytest
import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import generate_synthetic_crowd
from diffusiondet.diffusion import RandomSource, TorchRandom, renew_and_step
from diffusiondet.engine import Trainer
from diffusiondet.modeling import DDIMBoxSampler
from tests.utils import random_input, tiny_cfg

EVAL_H, EVAL_W = 48, 80  # non-square evaluation images (all the same size, see below)


# --------------------------------------------------------------------------- batched evaluation
@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval_branches"))
    json_file = generate_synthetic_crowd(
        root, split="val", num_images=5, image_size=(EVAL_H, EVAL_W), min_objects=2,
        max_objects=6, seed=2,
    )  # fmt: skip
    register_coco_json("eval_branches_val", json_file, os.path.join(root, "val"))
    return "eval_branches_val"


class RecordBatchSizes(nn.Module):
    """Runs the model as evaluation does and records the batch sizes.

    Under SEED the model draws each image's noise from (SEED, image_id): a batch must give the
    detections of its images run alone.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batch_sizes = []

    def forward(self, batched_inputs):
        self.batch_sizes.append(len(batched_inputs))
        return self.model(batched_inputs)


def _evaluate(dataset, model, batch, output_dir):
    cfg = tiny_cfg(
        "DATASETS.TRAIN", (), "DATASETS.TEST", (dataset,),
        "MODEL.DiffusionDet.NUM_CLASSES", 5,
        # 3 steps: two ensembled calls with box renewal between them; 30 boxes.
        "MODEL.DiffusionDet.SAMPLE_STEP", 3, "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 30,
        "TEST.IMS_PER_BATCH", batch, "OUTPUT_DIR", str(output_dir),
    )  # fmt: skip
    cfg.freeze()
    wrapped = RecordBatchSizes(model)
    results = Trainer.test(cfg, wrapped)
    with open(output_dir / "inference" / dataset / "coco_instances_results.json") as f:
        detections = json.load(f)
    return results["bbox"], detections, wrapped.batch_sizes


@pytest.mark.numerics
def test_batched_evaluation_equals_one_image_at_a_time(eval_dataset, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DiffusionDet.NUM_CLASSES", 5)).eval()
    assert model.sampling_seed == 40244023  # the config's SEED
    metrics_1, dets_1, sizes_1 = _evaluate(eval_dataset, model, 1, tmp_path / "b1")
    torch.manual_seed(1)  # the global generator plays no part
    metrics_2, dets_2, sizes_2 = _evaluate(eval_dataset, model, 4, tmp_path / "b4")
    # The loader really batched: 5 images as 4 + 1 instead of 5 x 1.
    assert sizes_1 == [1] * 5 and sizes_2 == [4, 1]

    def per_image(dets):
        images = {}
        for d in sorted(dets, key=lambda d: -d["score"]):
            images.setdefault(d["image_id"], []).append(d)
        return images

    images_1, images_2 = per_image(dets_1), per_image(dets_2)
    assert sorted(images_1) == sorted(images_2) == [1, 2, 3, 4, 5]  # every image evaluated
    for image_id, one in images_1.items():
        two = images_2[image_id]
        # No score threshold: up to 2 calls x 30 candidates per image, minus NMS.
        assert 5 <= len(one) <= 60 and len(two) == len(one), image_id
        assert [d["category_id"] for d in two] == [d["category_id"] for d in one], image_id
        # Batching changes GEMM row counts, so the last float bits may differ (as in
        # tests/modeling/test_fast_paths.py), and two calls amplify that: measured (batch 2) max |Δbox|
        # 1.0e-3 px (AVX-512) and 1.9e-3 px (AVX2 one thread) for boxes of ~20 px in the
        # original 80 x 48 image, max |Δscore| 1.0e-6.
        torch.testing.assert_close(
            torch.tensor([d["bbox"] for d in two]), torch.tensor([d["bbox"] for d in one]),
            atol=1e-2, rtol=0,
        )  # fmt: skip
        torch.testing.assert_close(
            torch.tensor([d["score"] for d in two]), torch.tensor([d["score"] for d in one]),
            atol=1e-5, rtol=0,
        )  # fmt: skip
        for d in one:
            x, y, w, h = d["bbox"]
            assert x >= 0 and y >= 0 and x + w <= EVAL_W + 1e-3 and y + h <= EVAL_H + 1e-3
    assert set(metrics_1) == set(metrics_2) and "AP" in metrics_1
    for key, value in metrics_1.items():
        assert math.isfinite(value) or key == "APl", (key, value)  # no large objects here
        assert value == pytest.approx(metrics_2[key], abs=1e-6, nan_ok=True), key


# ------------------------------------------------------------------ softmax renewal (USE_FOCAL False)
# One image, 5 proposals, K = 2 classes + background (last column).
SOFTMAX_LOGITS = torch.tensor([[
    [3.0, 0.0, 0.0],   # class 0 dominates
    [0.0, 0.5, 2.5],   # background dominates
    [0.0, 1.2, -1.0],  # class 1 dominates
    [0.2, 0.1, 0.3],   # nothing dominates; every sigmoid(logit) > 0.5
    [1.0, 0.0, 0.0],   # class 0 just above 0.5
]])  # fmt: skip


def _hand_softmax_foreground_max():
    e = math.exp
    return [
        e(3.0) / (e(3.0) + 2.0),                     # 0.9094
        e(0.5) / (1.0 + e(0.5) + e(2.5)),            # 0.1112 (background 0.8214 excluded)
        e(1.2) / (1.0 + e(1.2) + e(-1.0)),           # 0.7082
        e(0.2) / (e(0.2) + e(0.1) + e(0.3)),         # 0.3322
        e(1.0) / (e(1.0) + 2.0),                     # 0.5761
    ]  # fmt: skip


class _RecordingZeros(RandomSource):
    """randn returns zeros and records the requested shapes."""

    def __init__(self):
        self.shapes = []

    def randn(self, shape):
        self.shapes.append(tuple(shape))
        return torch.zeros(tuple(shape))


def test_softmax_renewal_score_excludes_the_background_column():
    sampler = DDIMBoxSampler(steps=2, use_focal=False, renewal_threshold=0.5)
    scores = sampler.proposal_scores(SOFTMAX_LOGITS)
    torch.testing.assert_close(scores, torch.tensor([_hand_softmax_foreground_max()]), atol=1e-6, rtol=0)

    # The renewal decision: proposals 0, 2, 4 score > 0.5 and are kept (DDIM-stepped, in order,
    # to the front); 1 and 3 are refilled. eta 0 and alpha_next 1 make a kept row equal its x0,
    # here a marker i + 1; the refill draws are -100.
    markers = torch.arange(1.0, 6.0)[None, :, None].expand(1, 5, 4)
    refill = lambda b, shape: torch.full(shape, -100.0)  # noqa: E731
    x_next = renew_and_step(markers, markers, scores, 0.5, 0.5, 1.0, 0.0, refill)
    assert x_next[0, :, 0].tolist() == [1.0, 3.0, 5.0, -100.0, -100.0]

    # Wired through the sampler: between its two calls it draws noise for the kept proposals
    # and a refill for the rest (3 + 2 here; the sigmoid path would keep all 5 of these).
    def denoise(boxes, t):
        pred_boxes = torch.tensor([[[4.0, 6.0, 40.0, 30.0]]]).expand(1, 5, 4)
        return {"pred_logits": SOFTMAX_LOGITS, "pred_boxes": pred_boxes}

    whwh = torch.tensor([[80.0, 48.0, 80.0, 48.0]])
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    for use_focal, kept in ((False, 3), (True, 5)):
        rng = _RecordingZeros()
        sampler.use_focal = use_focal
        sampler(denoise, alphas, whwh, 5, per_image_rng=[rng])
        assert rng.shapes == [(5, 4), (kept, 4), (5 - kept, 4)], use_focal


# ------------------------------------------------------------------------ fp16 autocast on CPU
@pytest.mark.numerics
def test_fp16_inference_on_cpu_runs_in_half_and_stays_close():
    """torch autocasts to fp16 on CPU (torch >= 2.x supports it there): backbone and head
    compute in fp16, the sampler and the returned scores/boxes stay fp32."""
    torch.manual_seed(0)
    cfg = tiny_cfg(
        "MODEL.DiffusionDet.INFERENCE_AMP", "fp16", "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 30
    )
    model = build_model(cfg).eval()
    assert model.inference_amp == "fp16"
    full = copy.deepcopy(model)
    full.inference_amp = ""

    dtypes = {}

    def record(name):
        return lambda module, args, output: dtypes.setdefault(name, set()).add(output.dtype)

    calls = {}

    def recording_denoise(m, key):
        original = m.denoise

        def denoise(features, boxes, t):
            out = original(features, boxes, t)
            calls.setdefault(key, []).append({k: v.float() for k, v in out.items()})
            return out

        m.denoise = denoise

    for m, key in ((model, "fp16"), (full, "fp32")):
        m.backbone.bottom_up.stem.conv1.register_forward_hook(record(f"{key} backbone"))
        m.head.head_series[-1].class_logits.register_forward_hook(record(f"{key} head"))
        recording_denoise(m, key)

    inputs = [random_input(64, 96, seed=0)]  # landscape
    out = {}
    for m, key in ((model, "fp16"), (full, "fp32")):
        rng = TorchRandom(generator=torch.Generator().manual_seed(10))
        out[key] = m.inference(inputs, per_image_rng=[rng])[0]["instances"]
    assert dtypes == {
        "fp16 backbone": {torch.float16}, "fp16 head": {torch.float16},
        "fp32 backbone": {torch.float32}, "fp32 head": {torch.float32},
    }  # fmt: skip
    half, ref = out["fp16"], out["fp32"]
    assert half.scores.dtype == half.pred_boxes.tensor.dtype == torch.float32
    assert len(half) > 0 and torch.isfinite(half.pred_boxes.tensor).all()
    assert torch.isfinite(half.scores).all() and ((half.scores > 0) & (half.scores < 1)).all()

    # Same noise, so the model call sees the same boxes: fp16 predictions are close to fp32.
    # Measured for this random head, AVX-512 / AVX2 one thread: max |Δlogit| 0.06 / 0.05,
    # median |Δbox| 0.04 / 0.03 px, max 0.5 / 0.6 px; best detection 0.3 / 0.25 px and 3e-4 /
    # 5e-4 apart; 73 % / 65 % of the detections found again. On an AMD EPYC (AVX-512 native /
    # AVX2 one thread) the largest box difference is 0.71 / 0.77 px: 1.5 px is twice that.
    (h_call,), (f_call,) = calls["fp16"], calls["fp32"]
    torch.testing.assert_close(h_call["pred_logits"], f_call["pred_logits"], atol=0.25, rtol=0)
    box_error = (h_call["pred_boxes"] - f_call["pred_boxes"]).abs()
    assert box_error.median() < 0.2 and box_error.max() < 1.5
    # ... and so are the detections: the best one is found again, and most of the others.
    assert half.pred_classes[0] == ref.pred_classes[0]
    assert (half.pred_boxes.tensor[0] - ref.pred_boxes.tensor[0]).abs().max() < 2.0
    assert abs(half.scores[0] - ref.scores[0]) < 5e-3
    iou = pairwise_iou(ref.pred_boxes, half.pred_boxes)
    found = ((iou >= 0.9) & (ref.pred_classes[:, None] == half.pred_classes[None, :])).any(dim=1)
    assert found.float().mean() >= 0.5
