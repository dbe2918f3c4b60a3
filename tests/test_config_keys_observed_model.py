"""Config keys of the head, the sampler and inference, each observed through behaviour.

Head keys: ``build_head`` from the config (seed 0) runs on fixed random features of a 64x96 image
(strides 4-32) and fixed boxes; sampler / inference keys: ``build_model`` + ``inference`` with a
recording ``RandomSource`` and hooks counting the head's calls. See test_config_keys_observed.py.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import batched_nms

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from diffusiondet.diffusion import boxes_to_signal, signal_to_boxes
from diffusiondet.modeling.builders import build_head
from tests.test_config_keys_observed import (
    DIFFER,
    IMAGE_HW,
    SAME,
    RecordingRandom,
    Row,
    check_row,
    run_model,
)

STRIDES = (4, 8, 16, 32)
K = 3  # NUM_CLASSES of tiny_cfg
N = 20  # NUM_PROPOSALS of tiny_cfg


def run_head(cfg, train=False, grad=True, second_seed=None):
    """Head built from cfg (seed 0) run on fixed features of a 64x96 image and fixed boxes, t = 500.

    Returns a namespace: head, feats, boxes, out (and out2: a second forward after seeding
    ``second_seed``).
    """
    channels, num_boxes = cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.DiffusionDet.NUM_PROPOSALS
    torch.manual_seed(0)
    head = build_head(cfg, [ShapeSpec(channels=channels, stride=s) for s in STRIDES]).train(train)
    g = torch.Generator().manual_seed(1)
    h, w = IMAGE_HW
    feats = [torch.randn(1, channels, h // s, w // s, generator=g) for s in STRIDES]
    centre = torch.rand(1, num_boxes, 2, generator=g) * torch.tensor([w, h])
    size = 6 + torch.rand(1, num_boxes, 2, generator=g) * torch.tensor([w / 3, h / 3])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    r = SimpleNamespace(head=head, feats=feats, boxes=boxes)
    with torch.set_grad_enabled(grad):
        r.out = head(feats, boxes, torch.tensor([500]))
        if second_seed is not None:
            torch.manual_seed(second_seed)
            r.out2 = head(feats, boxes, torch.tensor([500]))
    return r


def stage0(cfg, name):
    return tuple(run_head(cfg).head.state_dict()[f"head_series.0.{name}"].shape)


def out_shape(cfg, field="pred_logits"):
    return tuple(run_head(cfg).out[field].shape)


def logits(cfg):
    return run_head(cfg).out["pred_logits"].detach()


def tower_depth(cfg, tower):
    sd = run_head(cfg).head.state_dict()
    return sum(1 for k, v in sd.items() if k.startswith(f"head_series.0.{tower}.") and v.dim() == 2)


def train_forward_repeats(cfg):
    r = run_head(cfg, train=True, second_seed=1)
    return torch.equal(r.out["pred_logits"], r.out2["pred_logits"])


def count_calls(cfg, modules_of, run):
    """Calls of each module ``modules_of(head)`` during ``run(r)`` (no grad: CPU inference)."""
    r = run_head(cfg, grad=False)
    modules = modules_of(r.head)
    calls = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        run(r)
    return calls


def chunk_calls(cfg):
    """DynamicConv generates parameters chunk by chunk; its norm1 runs once per chunk."""
    return count_calls(
        cfg, lambda head: [head.head_series[0].inst_interact.norm1],
        lambda r: r.head(r.feats, r.boxes, torch.tensor([500])),
    )[0]


def off_cpu_chunks(cfg, num_props=1100):
    """Chunks of a no-grad DynamicConv call on 1100 proposals, the off-CPU (GPU) rule forced:
    its norm1 runs once per chunk (D=32, DD=8: 2 KiB of fp32 parameters per proposal)."""
    torch.manual_seed(0)
    shapes = [ShapeSpec(channels=cfg.MODEL.FPN.OUT_CHANNELS, stride=s) for s in STRIDES]
    conv = build_head(cfg, shapes).head_series[0].inst_interact
    rule = conv.resolved_chunk_size
    conv.resolved_chunk_size = lambda m, dtype, grad, on_cpu=True: rule(m, dtype, grad, False)
    d, num_bins = conv.hidden_dim, conv.out_layer.in_features // conv.hidden_dim
    pro, roi = torch.randn(num_props, d), torch.randn(num_props, num_bins, d)
    calls = []
    conv.norm1.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        conv(pro, roi)
    return len(calls)


def pooler_parts(cfg):
    """Parts pooled in parallel: RoIAlign calls of the busiest level when pooling the 20 boxes."""
    calls = count_calls(
        cfg, lambda head: list(head.box_pooler.level_poolers),
        lambda r: r.head.pool(r.feats, r.boxes),
    )
    return max(calls)


def width_ratio_max(cfg):
    r = run_head(cfg)
    pred, inp = r.out["pred_boxes"][0, 0], r.boxes[0]
    return float(((pred[:, 2] - pred[:, 0]) / (inp[:, 2] - inp[:, 0])).max().detach())


def logits_minus_prior(cfg):
    p = cfg.MODEL.DiffusionDet.PRIOR_PROB
    return logits(cfg) - math.log(p / (1 - p))


def clamp_bound(values, obs):
    for v, o in zip(values, obs):
        assert o <= math.exp(v) + 1e-5, f"BBOX_SCALE_CLAMP={v}: width ratio {o} > exp({v})"
    assert obs[0] > math.exp(values[1]) + 1e-3, f"default clamp already bounds the ratio: {obs}"


def param_and_out(name, field="pred_logits"):
    return lambda cfg: (stage0(cfg, name), out_shape(cfg, field))


def tower_and_out(tower, field):
    return lambda cfg: (tower_depth(cfg, tower), out_shape(cfg, field))


LOGITS, BOXES = (2, 1, N, K), (2, 1, N, 4)  # (stages, images, boxes, K or 4) of tiny_cfg
HEAD_ROWS = [
    Row("NUM_CLASSES", "logit width", [3, 7], lambda c: out_shape(c)[-1], [3, 7]),
    Row("NHEADS", "logits (same init, other attention split)", [4, 2, 1], logits, DIFFER),
    Row("DROPOUT", "two train-mode forwards with other seeds agree", [0.0, 0.3],
        train_forward_repeats, [True, False]),
    Row("DIM_FEEDFORWARD", "linear1 shape, logits shape", [64, 48], param_and_out("linear1.weight"),
        [((64, 32), LOGITS), ((48, 32), LOGITS)]),
    Row("ACTIVATION", "linear2 shape (glu halves it), logits", ["relu", "gelu", "glu"],
        lambda c: (stage0(c, "linear2.weight"), logits(c)), DIFFER),
    Row("HIDDEN_DIM", "classifier shape, object-feature shape", [32, 16],
        param_and_out("class_logits.weight", "obj_features"),
        [((K, 32), (2, 1, N, 32)), ((K, 16), (2, 1, N, 16))],
        extra=lambda v: ["MODEL.FPN.OUT_CHANNELS", v]),
    Row("NUM_CLS", "class-tower depth, logits shape", [1, 3],
        tower_and_out("cls_module", "pred_logits"),
        [(1, LOGITS), (3, LOGITS)]),
    Row("NUM_REG", "box-tower depth, boxes shape", [3, 1],
        tower_and_out("reg_module", "pred_boxes"),
        [(3, BOXES), (1, BOXES)]),
    Row("NUM_HEADS", "stages in the outputs", [2, 3], lambda c: out_shape(c)[0], [2, 3]),
    Row("NUM_DYNAMIC", "generator rows; other values rejected", [2, 3],
        lambda c: stage0(c, "inst_interact.dynamic_layer.weight")[0], [2 * 32 * 8, "ValueError"]),
    Row("DIM_DYNAMIC", "generator shape, logits shape", [8, 4],
        param_and_out("inst_interact.dynamic_layer.weight"),
        [((512, 32), LOGITS), ((256, 32), LOGITS)]),
    Row("DYNAMIC_CHUNK_SIZE", "chunks per DynamicConv call (20 boxes)", [0, 7, 1],
        chunk_calls, [1, 3, 20]),
    Row("DYNAMIC_MEMORY_BUDGET_MB", "off-CPU chunks per DynamicConv call (1100 boxes)",
        [512, 1, 0, -1], off_cpu_chunks, [1, 3, 1, "ValueError"]),
    Row("BBOX_SCALE_CLAMP", "max predicted/input width <= exp(clamp)",
        [8.740336742730447, 0.5, 0.1], width_ratio_max, clamp_bound),
    Row("PRIOR_PROB", "initial logits minus logit(prior)", [0.01, 0.2, 0.5],
        logits_minus_prior, SAME),
    Row("POOLER_THREADS", "RoIAlign calls per level (parallel parts)", [1, 2, 3],
        pooler_parts, [1, 2, 3]),
]


# ------------------------------------------------------------------------- sampler / inference
def calls_and_draws(cfg):
    r = run_model(cfg)
    return len(r.calls), len(r.rng.draws)


def train_and_eval_boxes(cfg):
    train, infer = run_model(cfg, train=True), run_model(cfg)
    return train.calls.boxes[0].shape[1], infer.calls.boxes[0].shape[1]


def step_ignores_ddim_noise(cfg):
    """Same x_T, other later draws: is the input of the second model call unchanged?"""
    a, b = (run_model(cfg, rng=RecordingRandom(0, later_seed=s)).calls.boxes[1] for s in (1, 2))
    return torch.equal(a, b)


def kept_vs_scores(cfg):
    """Boxes kept by renewal (size of the DDIM-noise draw) and boxes scoring > the threshold."""
    r = run_model(cfg)
    scores = torch.sigmoid(r.calls.outputs[0]["pred_logits"][-1]).max(-1).values
    return r.rng.draws[1][1][0], int((scores > cfg.MODEL.DiffusionDet.RENEWAL_THRESHOLD).sum())


def renewal_matches_scores(values, obs):
    assert all(kept == above for kept, above in obs), f"kept vs above threshold {values}: {obs}"
    kept = [k for k, _ in obs]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1], f"{values} kept {kept}"


def nms_vs_independent(cfg):
    """Detections with NMS, and torchvision's batched_nms at the threshold on the NMS-free run."""
    with_nms = len(run_model(cfg).out)
    cfg.MODEL.DiffusionDet.USE_NMS = False
    raw = run_model(cfg).out
    thr = cfg.MODEL.DiffusionDet.NMS_THRESH
    return with_nms, len(batched_nms(raw.pred_boxes.tensor, raw.scores, raw.pred_classes, thr))


def nms_matches(values, obs):
    assert all(a == b for a, b in obs), f"NMS_THRESH {values}: (model, independent) {obs}"
    counts = [a for a, _ in obs]
    assert counts == sorted(counts) and counts[0] < counts[-1], f"{values}: {counts}"


def nms_suppresses(values, obs):
    assert obs[0] == N and obs[1] < N, f"USE_NMS {values}: detections {obs}"


def head_dtype_and_score_dtype(cfg):
    r = run_model(cfg)
    return r.calls.outputs[0]["pred_logits"].dtype, r.out.scores.dtype


def compile_calls(cfg):
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        record = lambda self, *args, **kwargs: calls.append(type(self).__name__)  # noqa: E731
        mp.setattr(torch.nn.Module, "compile", record)
        run_model(cfg, train=True)
    return calls


def skip_check(values, obs):
    (calls_a, det_a), (calls_b, det_b) = obs
    assert (calls_a, calls_b) == (2, 3), f"SKIP_UNUSED_CALLS {values}: calls {calls_a}, {calls_b}"
    assert torch.equal(det_a, det_b), "skipping the unused call changed the detections"


def first_call_boxes(cfg):
    r = run_model(cfg)
    return r.calls.boxes[0], r.rng.values[0]


def snr_check(values, obs):
    whwh = torch.tensor([IMAGE_HW[1], IMAGE_HW[0]] * 2, dtype=torch.float32)
    for s, (boxes, x_t) in zip(values, obs):
        torch.testing.assert_close(boxes[0], signal_to_boxes(x_t, whwh, s))
        signal = boxes_to_signal(boxes[0], whwh, s)
        torch.testing.assert_close(signal, x_t.clamp(-s, s), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(obs[0][0], obs[1][0]), f"SNR_SCALE {values}: same head input"


def calls_and_detections(cfg):
    r = run_model(cfg)
    return len(r.calls), len(r.out)


def calls_and_boxes(cfg):
    r = run_model(cfg)
    return len(r.calls), r.out.pred_boxes.tensor


def detections(cfg):
    return len(run_model(cfg).out)


def draw_shapes(cfg):
    return run_model(cfg).rng.draws


def compile_step_calls(cfg):
    calls = []
    with pytest.MonkeyPatch.context() as mp:  # compiling a real step is too slow for CI
        mp.setattr(torch, "compile", lambda fn, **kwargs: calls.append(fn.__name__) or fn)
        run_model(cfg)
    return calls


def folded_convolutions(cfg):
    from diffusiondet.modeling.acceleration.frozen_bn_folding import FoldedFrozenBNConv2d

    model = build_model(cfg)
    return sum(isinstance(m, FoldedFrozenBNConv2d) for m in model.backbone.modules())


def fixed_pooler_calls(cfg):
    from diffusiondet.modeling.acceleration.fixed_shape_pooler import FixedShapeROIPooler

    calls = []
    original = FixedShapeROIPooler.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FixedShapeROIPooler, "forward", lambda self, *a: calls.append(1) or original(self, *a))
        run_model(cfg)
    return len(calls)


def tf32_flag_after_build(cfg):
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        run_model(cfg)
        return torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


STEP2, STEP3 = ["MODEL.DiffusionDet.SAMPLE_STEP", 2], ["MODEL.DiffusionDet.SAMPLE_STEP", 3]
NO_NMS = ["MODEL.DiffusionDet.USE_NMS", False]
ONE_CLASS = ["MODEL.DiffusionDet.NUM_CLASSES", 1]  # boxes of one class overlap: NMS bites
X_T = ("randn", (N, 4))

SAMPLER_ROWS = [
    Row("NUM_PROPOSALS", "boxes the head gets (train, eval)", [20, 12], train_and_eval_boxes,
        [(20, 20), (12, 12)]),
    Row("EVAL_NUM_PROPOSALS", "boxes the head gets (train, eval)", [0, 7], train_and_eval_boxes,
        [(20, 20), (20, 7)]),
    Row("SAMPLE_STEP", "model calls, random draws", [1, 2, 4], calls_and_draws,
        [(1, 1), (1, 3), (3, 7)]),
    Row("DDIM_ETA", "2nd call input independent of DDIM noise", [0.0, 0.5, 1.0],
        step_ignores_ddim_noise, [True, False, False],
        base=STEP3 + ["MODEL.DiffusionDet.BOX_RENEWAL", False]),
    Row("SAMPLER_UPDATE", "2nd call input independent of DDIM noise", ["ddim", "x0"],
        step_ignores_ddim_noise, [False, True], base=STEP3 + ["MODEL.DiffusionDet.BOX_RENEWAL", False]),
    Row("BOX_RENEWAL", "draws: x_T, DDIM noise, refill (all scores < 0.5)", [True, False],
        draw_shapes,
        [[X_T, ("randn", (0, 4)), ("randn", (N, 4))], [X_T, ("randn", (N, 4)), ("randn", (0, 4))]],
        base=STEP2),
    Row("RENEWAL_THRESHOLD", "kept boxes == boxes scoring above it", [0.0, 0.03, 0.5],
        kept_vs_scores, renewal_matches_scores, base=STEP2),
    Row("ENSEMBLE", "model calls, candidates (no NMS)", ["official", "all_steps"],
        calls_and_detections, [(2, 2 * N), (3, 3 * N)], base=STEP3 + NO_NMS),
    Row("SKIP_UNUSED_CALLS", "model calls; detections unchanged", [True, False], calls_and_boxes,
        skip_check, base=STEP3),
    Row("USE_NMS", "detections", [False, True], detections, nms_suppresses,
        base=ONE_CLASS + ["MODEL.DiffusionDet.NMS_THRESH", 0.1]),
    Row("NMS_THRESH", "detections == independent NMS count", [0.1, 0.3, 1.0], nms_vs_independent,
        nms_matches, base=ONE_CLASS),
    Row("DETECTIONS_PER_IMAGE", "detections (no NMS)", [0, 7], detections, [N, 7], base=NO_NMS),
    Row("INFERENCE_AMP", "head logits dtype, returned score dtype", ["", "bf16"],
        head_dtype_and_score_dtype,
        [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]),
    Row("COMPILE_HEAD", "Module.compile calls (patched: compiling is too slow in CI)",
        [False, True], compile_calls, [[], ["RefinementStage", "RefinementStage"]]),
    Row("SAMPLING_MODE", "draws (x_T, DDIM noise, refill; all scores < 0.5)", ["parity", "graph"],
        draw_shapes,
        [[X_T, ("randn", (0, 4)), ("randn", (N, 4))],
         [("randn", (1, N, 4)), ("randn", (1, N, 4)), ("randn", (1, N, 4))]],
        base=STEP2),
    Row("COMPILE_SAMPLING_STEP", "torch.compile calls (patched)", [False, True],
        compile_step_calls, [[], ["step"]], base=["MODEL.DiffusionDet.SAMPLING_MODE", "graph"]),
    Row("COMPILE_SAMPLING_STEP", "rejected in parity mode (data-dependent shapes)", [False, True],
        compile_step_calls, [[], "ValueError"], base=["MODEL.DiffusionDet.SAMPLING_MODE", "parity"]),
    Row("FOLD_FROZEN_BN", "backbone convolutions folding their frozen BN (R-50)", [False, True],
        folded_convolutions, [0, 53],
        base=["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256,
              "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.STRIDE_IN_1X1", True]),
    Row("FIXED_SHAPE_POOLING", "fixed-shape pooler calls at CPU inference (2 stages, 1 call)",
        [False, True], fixed_pooler_calls, [0, 2]),
    Row("ALLOW_TF32", "torch.backends.cuda.matmul.allow_tf32 after build", [False, True],
        tf32_flag_after_build, [False, True]),
    Row("SNR_SCALE", "inference: head input == signal_to_boxes(x_T, scale)", [2.0, 3.0],
        first_call_boxes, snr_check),
]

ROWS = HEAD_ROWS + SAMPLER_ROWS


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_config_key_is_observed(row):
    check_row(row)
