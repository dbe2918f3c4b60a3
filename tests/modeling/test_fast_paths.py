"""Speed paths give the reference path's results: threaded RoI pooling, DynamicConv chunking,
batched sampling, plus the INFERENCE_AMP / COMPILE_HEAD switches.

Shape legend: B images, N proposals, M = B·N RoIs, D channels, K classes. Boxes are abs xyxy.
"""
import copy
import threading

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, ImageList

from diffusiondet.diffusion import TorchRandom
from diffusiondet.engine import build_config
from diffusiondet.modeling import DiffusionDet
from diffusiondet.modeling.acceleration import set_head_speed_options, threaded_pooler
from diffusiondet.modeling.acceleration.threaded_pooler import ThreadedROIPooler
from diffusiondet.modeling.head import DynamicHead
from tests.utils import random_input, tiny_cfg

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
UNCHUNKED = 1 << 30


def _features(batch, channels=16, height=64, width=96):
    return [torch.randn(batch, channels, height >> i, width >> i) for i in range(4)]


def _multi_level_boxes(batch, num, width=384.0, height=256.0):
    # Sizes from 2 to 300 px so that every FPN level receives boxes.
    xy = torch.rand(batch, num, 2) * torch.tensor([width, height]) * 0.7
    wh = torch.exp(torch.rand(batch, num, 2) * 5.0) + 1.0
    return torch.cat([xy, xy + wh], dim=-1)


def _poolers(num_threads):
    kwargs = dict(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2")
    return ROIPooler(**kwargs), ThreadedROIPooler(**kwargs, num_threads=num_threads)


@pytest.mark.parametrize("num_threads", [2, 3])
def test_threaded_pooler_is_bit_identical(num_threads):
    serial, threaded = _poolers(num_threads)
    features = _features(2)
    boxes = _multi_level_boxes(2, 40)
    boxes[0, 3] = torch.tensor([50.0, 50.0, 40.0, 60.0])  # negative area: no level, zero row
    boxes[1, 5] = float("nan")
    box_lists = [Boxes(b) for b in boxes]
    with torch.no_grad():
        ref = serial(features, box_lists)
        out = threaded(features, box_lists)
    assert out.shape == (80, 16, 7, 7)
    assert torch.equal(out.nan_to_num(123.0), ref.nan_to_num(123.0))
    assert torch.equal(out[3], torch.zeros_like(out[3]))


def _grad_node_names(tensor):
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack += [next_fn for next_fn, _ in node.next_functions]
    return names


@pytest.mark.parametrize("num_threads, batch", [(2, 2), (3, 2), (2, 3), (2, 1), (3, 1)])
def test_threaded_pooler_backward_matches_serial(num_threads, batch):
    # Training path: forward bit-identical. With 2+ images each thread scatters whole images in
    # the serial order: bit-identical gradients. With one image the RoIs are split and the
    # per-thread gradients summed: float addition order only (measured 1.2e-6 on gradients of
    # magnitude ~14).
    serial, threaded = _poolers(num_threads)
    torch.manual_seed(3)
    features = [f.requires_grad_() for f in _features(batch)]
    boxes = _multi_level_boxes(batch, 30)
    if batch > 1:
        boxes[1, :, 2:] = boxes[1, :, :2] + 3.0  # tiny boxes: image 1 only feeds the finest level
    boxes[0, 0] = torch.tensor([0.0, 0.0, 700.0, 500.0])  # beyond the image: the coarsest level
    boxes[0, 1] = torch.tensor([20.0, 30.0, 170.0, 180.0])  # 150 px: p3
    boxes[0, 2] = torch.tensor([40.0, 10.0, 340.0, 250.0])  # 268 px: p4
    box_lists = [Boxes(b) for b in boxes]
    weight = torch.randn(30 * batch, 16, 7, 7)
    results = []
    for pooler in (serial, threaded):
        out = pooler(features, box_lists)
        grads = torch.autograd.grad((out * weight).sum(), features)
        results.append((out, grads))
    (ref, ref_grads), (out, grads) = results
    assert "_ThreadedRoIAlignBackward" in _grad_node_names(out)
    assert torch.equal(out, ref)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0  # every level received boxes, so every gradient is live
        if batch > 1:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_threaded_pooler_backward_of_an_empty_level_is_zero_and_can_be_turned_off():
    serial, threaded = _poolers(2)
    features = [f.requires_grad_() for f in _features(1)]
    box_lists = [Boxes(torch.tensor([[10.0, 10.0, 30.0, 40.0], [5.0, 8.0, 20.0, 12.0]]))]
    grads = torch.autograd.grad(threaded(features, box_lists).sum(), features)
    # Like ROIPooler: levels without boxes get a zero gradient, not None (optimizers treat a
    # missing gradient differently from a zero one).
    assert all(g is not None for g in grads) and grads[3].abs().sum() == 0 and grads[0].abs().sum() > 0
    threaded.threaded_backward = False
    out = threaded(features, box_lists)
    assert "_ThreadedRoIAlignBackward" not in _grad_node_names(out)
    torch.testing.assert_close(out, serial(features, box_lists), rtol=0, atol=0)


def test_threaded_pooler_under_autocast_and_empty_input():
    serial, threaded = _poolers(2)
    features = _features(2)
    box_lists = [Boxes(b) for b in _multi_level_boxes(2, 9)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(threaded(features, box_lists), serial(features, box_lists))
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    with torch.no_grad():
        assert threaded(features, empty).shape == (0, 16, 7, 7)
    with pytest.raises(ValueError, match="num_threads"):
        ThreadedROIPooler(
            output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2", num_threads=-1
        )


def _head(tame=False):
    head = DynamicHead(
        num_classes=3, in_channels=16, hidden_dim=16, dim_feedforward=32, nhead=2,
        num_stages=3, dim_dynamic=4, pooler_scales=SCALES,
    )  # fmt: skip
    if tame:
        # Small box refinements, as in a trained model (and the official v2 fixture): a random
        # head grows boxes to thousands of px and amplifies every rounding difference ~20x per
        # stage, so a tolerance would have to be loose enough to hide real bugs.
        with torch.no_grad():
            for stage in head.head_series:
                stage.bboxes_delta.weight.mul_(0.05)
                stage.bboxes_delta.bias.zero_()
    return head.eval()


@torch.no_grad()
def test_threaded_pooling_in_the_head_is_bit_identical():
    # Identical by construction: every RoI is pooled by the same kernel on the same data, only
    # the thread that does it changes.
    head = _head()
    features, boxes, t = _features(2), _multi_level_boxes(2, 30), torch.tensor([999, 999])
    set_head_speed_options(head, dynamic_chunk_size=7, pooler_threads=1)
    ref = head(features, boxes, t)
    set_head_speed_options(head, dynamic_chunk_size=7, pooler_threads=2)
    out = head(features, boxes, t)
    for key in ref:
        assert torch.equal(out[key], ref[key]), key
    with pytest.raises(ValueError, match="pooler_threads"):
        set_head_speed_options(head, dynamic_chunk_size=0, pooler_threads=-1)


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_size", [1, 7, 16])
@torch.no_grad()
def test_dynamic_conv_chunking_agrees_with_one_chunk(chunk_size):
    # Not identical by construction: MKL picks GEMM kernels (and so the summation order) by the
    # number of rows, which the chunk size changes. Measured max differences over the 3 stages
    # (tame head, chunks 1 and 7): 0 on an AVX-512 Xeon, logits 4.1e-5 / boxes 6.1e-5 px / features
    # 4.2e-5 with ATen avx2 or default, MKL AVX2, one thread. Tolerances are ~5x that; a chunk
    # boundary bug moves values by O(1).
    head = _head(tame=True)
    features, boxes, t = _features(2), _multi_level_boxes(2, 30), torch.tensor([999, 999])
    set_head_speed_options(head, dynamic_chunk_size=UNCHUNKED, pooler_threads=1)
    ref = head(features, boxes, t)
    set_head_speed_options(head, dynamic_chunk_size=chunk_size, pooler_threads=1)
    out = head(features, boxes, t)
    atol = {"pred_logits": 2e-4, "obj_features": 2e-4, "pred_boxes": 3e-4}  # boxes in px (~300)
    assert set(out) == set(atol)
    for key, tol in atol.items():
        torch.testing.assert_close(out[key], ref[key], atol=tol, rtol=1e-6, msg=key)


@pytest.mark.numerics
@torch.no_grad()
def test_head_batch_with_shared_timestep_agrees_with_single_images():
    # The time embedding is computed once per distinct t, and attention runs per image, so a
    # batch at one timestep differs from each image alone only through the GEMM row counts
    # (B·N vs N rows), which may change MKL's kernel choice. Measured 0 difference on an AVX-512
    # Xeon and under the AVX2 one-thread settings; the tolerance allows the last bits of another
    # CPU (stage 0 differs by <= 1 ulp, then amplified by the tame head's 3 stages).
    head = _head(tame=True)
    features, boxes, t = _features(2), _multi_level_boxes(2, 30), torch.tensor([500, 500])
    batched = head(features, boxes, t)
    for i in range(2):
        single = head([f[i : i + 1] for f in features], boxes[i : i + 1], t[i : i + 1])
        for key in batched:
            torch.testing.assert_close(single[key][:, 0], batched[key][:, i], atol=2e-4,
                                       rtol=1e-6, msg=key)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DiffusionDet.SAMPLE_STEP", 3)).eval()
    model.sampler.renewal_threshold = 0.2  # with an untrained head, make renewal keep some boxes
    return model


def _infer(model, inputs, seeds):
    rngs = [TorchRandom(generator=torch.Generator().manual_seed(s)) for s in seeds]
    return [r["instances"] for r in model.inference(inputs, per_image_rng=rngs)]


@pytest.mark.numerics
@pytest.mark.parametrize("steps", [1, 3])
def test_fast_model_equals_reference_batch1_loop(model, steps, monkeypatch):
    model = copy.deepcopy(model)
    model.sampler.steps = steps
    inputs = [random_input(64, 80, seed=s) for s in (1, 2)]
    # oneDNN convolutions may round differently for 1 and 2 images (~5e-6 here), which a random
    # head amplifies; the backbone is not what is compared, so a batch gets per-image features.
    backbone = model.extract_features

    def per_image_features(images):
        per_image = [backbone(ImageList(images.tensor[i : i + 1], images.image_sizes[i : i + 1]))
                     for i in range(len(images))]
        return [torch.cat(levels) for levels in zip(*per_image)]

    monkeypatch.setattr(model, "extract_features", per_image_features)
    set_head_speed_options(model.head, dynamic_chunk_size=0, pooler_threads=2)
    model.sampler.skip_unused_calls = True
    fast = _infer(model, inputs, [7, 8])
    set_head_speed_options(model.head, dynamic_chunk_size=UNCHUNKED, pooler_threads=1)
    model.sampler.skip_unused_calls = False
    reference = [_infer(model, [x], [s])[0] for x, s in zip(inputs, [7, 8])]
    # Not bit-exact: batch 2 changes GEMM row counts (MKL kernel choice), and ATen's vectorised
    # elementwise kernels (sigmoid, exp) evaluate the tail of a tensor with the scalar formula,
    # so an element can round by 1 ulp differently when the batch size moves it out of the tail.
    # This random-weight head amplifies that: measured max |Δbox| 0 on an AVX-512 Xeon and
    # 1.7e-4 px (boxes ~60 px), max |Δscore| 4.2e-7 under the AVX2 one-thread settings;
    # tolerances 1e-3 px and 5e-6.
    for a, b in zip(fast, reference):
        assert len(a) == len(b) > 0
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3, rtol=1e-6)
        torch.testing.assert_close(a.scores, b.scores, atol=5e-6, rtol=0)


@pytest.mark.parametrize("steps, ensemble, calls", [(1, "official", 1), (2, "official", 1),
                                                    (4, "official", 3), (4, "all_steps", 4)])
def test_skipping_the_unused_last_call_keeps_detections_and_draws(model, steps, ensemble, calls):
    sampler = copy.deepcopy(model.sampler)
    sampler.steps, sampler.ensemble = steps, ensemble
    images, _ = model.preprocess_image([random_input(64, 80, seed=4)])
    features = model.extract_features(images)
    whwh = torch.tensor([[80.0, 64.0, 80.0, 64.0]])
    results = {}
    for skip in (False, True):
        sampler.skip_unused_calls = skip
        made = []

        def denoise(boxes, t):
            made.append(int(t[0]))
            return model.denoise(features, boxes, t)

        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            (det,) = sampler(denoise, model.alphas_cumprod, whwh, 20,
                             per_image_rng=[TorchRandom(generator=generator)])  # fmt: skip
        results[skip] = (det, made, torch.randn(1, generator=generator))  # next draw: same state
    (full, full_calls, full_next), (skipped, skipped_calls, skipped_next) = results.values()
    assert len(full_calls) == steps and skipped_calls == full_calls[:calls]
    assert torch.equal(full_next, skipped_next)
    for key in full:
        assert torch.equal(full[key], skipped[key]), key


def test_bf16_inference_runs_and_stays_close(model):
    model = copy.deepcopy(model)
    model.sampler.steps = 1
    inputs = [random_input(64, 80, seed=3)]
    images, _ = model.preprocess_image(inputs)
    features = model.extract_features(images)
    boxes, t = _multi_level_boxes(1, 20, width=80.0, height=64.0), torch.tensor([999])
    with torch.no_grad():
        ref = model.denoise(features, boxes, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.denoise(features, boxes, t)
    assert low["pred_logits"].dtype == torch.bfloat16
    torch.testing.assert_close(low["pred_logits"].float(), ref["pred_logits"], atol=0.1, rtol=0.05)
    box_error = (low["pred_boxes"] - ref["pred_boxes"]).abs()  # pixels, image 80 x 64
    # bf16 keeps 8 significant bits (0.25-0.5 px steps at these coordinates). Measured on an AMD
    # EPYC, AVX-512 native / AVX2 one thread: median 0.049 / 0.039 px, max 2.49 / 2.45 px.
    assert box_error.median() < 0.5 and box_error.max() < 3.5

    model.inference_amp = "bf16"
    amp = _infer(model, inputs, [5])[0]
    model.inference_amp = ""
    full = _infer(model, inputs, [5])[0]
    assert amp.scores.dtype == amp.pred_boxes.tensor.dtype == torch.float32
    assert len(amp) > 0 and torch.isfinite(amp.pred_boxes.tensor).all()
    # Same noise, bf16 head: the best detection is found again at nearly the same place.
    assert amp.pred_classes[0] == full.pred_classes[0]
    best_box_error = (amp.pred_boxes.tensor[0] - full.pred_boxes.tensor[0]).abs().max()
    assert best_box_error < 2.0


def test_speed_config_keys_are_validated_and_wired(monkeypatch):
    with pytest.raises(ValueError, match="INFERENCE_AMP"):
        tiny_cfg("MODEL.DiffusionDet.INFERENCE_AMP", "fp8")
    with pytest.raises(ValueError, match="POOLER_THREADS"):
        tiny_cfg("MODEL.DiffusionDet.POOLER_THREADS", -1)
    defaults = build_config()
    assert defaults.MODEL.DiffusionDet.INFERENCE_AMP == ""
    assert defaults.MODEL.DiffusionDet.COMPILE_HEAD is False
    assert defaults.MODEL.DiffusionDet.POOLER_THREADS == 0
    assert defaults.MODEL.DiffusionDet.SKIP_UNUSED_CALLS is True

    compiled = []  # torch.compile itself is too slow for this suite: record the calls only
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(kw))
    cfg = tiny_cfg(
        "MODEL.DiffusionDet.INFERENCE_AMP", "bf16",
        "MODEL.DiffusionDet.COMPILE_HEAD", True,
        "MODEL.DiffusionDet.POOLER_THREADS", 3,
    )  # fmt: skip
    model = build_model(cfg)
    assert model.inference_amp == "bf16"
    assert model.head.box_pooler.num_threads == 3
    assert model.sampler.skip_unused_calls is True
    assert compiled == [{"dynamic": True}] * cfg.MODEL.DiffusionDet.NUM_HEADS
    with pytest.raises(ValueError, match="inference_amp"):
        DiffusionDet(**{**DiffusionDet.from_config(tiny_cfg()), "inference_amp": "int8"})


# --- the threaded pooler really runs threads, shares one pool, and matches detectron2 -------
# Bit for bit against detectron2's serial ROIPooler: both run the same kernel on the same data.


def _small_poolers(num_threads, scales=SCALES):
    kwargs = dict(output_size=3, scales=scales, sampling_ratio=2, pooler_type="ROIAlignV2")
    return ROIPooler(**kwargs), ThreadedROIPooler(**kwargs, num_threads=num_threads)


def _seeded_features(scales=SCALES, channels=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, channels, int(64 * s), int(96 * s), generator=g) for s in scales]


def _pool_recording_threads(pooler, features, box_lists):
    names = []
    level = pooler.level_poolers[0]
    original = level.forward

    def recording(*args):
        names.append(threading.current_thread().name)
        return original(*args)

    level.forward = recording
    try:
        return pooler(features, box_lists), names
    finally:
        del level.forward


def test_threaded_pooler_really_pools_in_worker_threads():
    # Two RoIs on one level, grad mode on but nothing requires grad: the threaded path applies.
    _, pooler = _small_poolers(2, scales=(1 / 4,))
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]))]
    out, names = _pool_recording_threads(pooler, _seeded_features((1 / 4,)), boxes)
    assert out.shape == (2, 4, 3, 3)
    assert len(names) == 2 and any(n.startswith("diffdet-roi-pool") for n in names)
    assert ThreadedROIPooler(output_size=3, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2",
                             num_threads=3).resolved_num_threads() == 3
    assert pooler.__class__(output_size=3, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2",
                            num_threads=0).resolved_num_threads() == torch.get_num_threads()


def test_worker_pool_is_created_on_first_use_and_reused():
    serial, pooler = _small_poolers(2)
    features = _seeded_features()
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]))]
    with torch.no_grad():
        assert torch.equal(pooler(features, boxes), serial(features, boxes))
    # The pooling above left a process-wide pool: asking for no more threads returns it.
    pool = threaded_pooler.shared_executor(1)
    assert threaded_pooler.shared_executor(1) is pool
    # More threads than any pooler asks for (at most the torch threads) replace it by a larger
    # pool, which is then reused, and the old one is shut down.
    grown = threaded_pooler.shared_executor(4 * torch.get_num_threads() + 64)
    assert grown is not pool and threaded_pooler.shared_executor(2) is grown
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(int)


@torch.no_grad()
def test_threaded_pooler_matches_detectron2_on_one_level_and_oversized_boxes():
    single_serial, single = _small_poolers(2, scales=(1 / 8,))
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0], [1.0, 2.0, 3.0, 9.0]]))]
    features = _seeded_features((1 / 8,))
    assert torch.equal(single(features, boxes), single_serial(features, boxes))
    # A ~1100 px box maps beyond the coarsest level and must be clamped to it, not dropped.
    serial, pooler = _small_poolers(2)
    boxes = [Boxes(torch.tensor([[-300.0, -300.0, 1000.0, 600.0], [10.0, 10.0, 30.0, 40.0]]))]
    out = pooler(_seeded_features(), boxes)
    assert torch.equal(out, serial(_seeded_features(), boxes)) and out[0].abs().sum() > 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_threaded_pooler_is_not_used_while_tracing():
    serial, pooler = _small_poolers(2)
    feats_a, feats_b = _seeded_features(), [f * 2 + 1 for f in _seeded_features()]
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0], [5.0, 5.0, 200.0, 150.0]])

    def pool(*feats):
        return pooler(list(feats), [Boxes(boxes)])

    with torch.no_grad():
        traced = torch.jit.trace(pool, tuple(feats_a), check_trace=False)
        assert torch.equal(traced(*feats_b), serial(feats_b, [Boxes(boxes)]))


def test_threaded_pooler_takes_detectron2_arguments_positionally():
    pooler = ThreadedROIPooler(3, SCALES, 2, "ROIAlignV2")
    assert pooler.output_size == (3, 3) and len(pooler.level_poolers) == 4
    assert pooler.num_threads == 0
