"""DiffusionInst end to end on a tiny CPU model: losses, inference, batching, training, config.

Images are non-square; masks are checked by value (alignment with their detections, batch vs
single image, threshold and box clipping), not only by shape.
"""
import copy
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model
from detectron2.structures import BitMasks

from diffusiondet.data import DiffusionDetDatasetMapper
from diffusiondet.data.synthetic import generate_synthetic_crowd
from diffusiondet.diffusion import TorchRandom
from diffusiondet.engine import Trainer, build_optimizer
from diffusioninst.modeling import DiffusionInst, dynamic_mask_logits
from diffusioninst.modeling.mask_postprocess import masks_to_image

from ..utils import random_input, tiny_cfg

INST = "configs/diffinst.synthetic.res18.yaml"
INST_OPTS = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NUM_CONVS", 1,
             "MODEL.DiffusionInst.MASK_NORM", "BN"]


def inst_cfg(*opts):
    return tiny_cfg(*INST_OPTS, *opts, config_file=INST)


def with_masks(inp, seed=0):
    """Give every GT box a mask: an axis-aligned ellipse inside it (at the input image size)."""
    inst = inp["instances"]
    height, width = inst.image_size
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    masks = []
    for x0, y0, x1, y1 in inst.gt_boxes.tensor.tolist():
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
    inst.gt_masks = BitMasks(torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool))
    return inp


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(inst_cfg())


def _infer(model, inputs, seeds, **kw):
    model.eval()
    rngs = [TorchRandom(generator=torch.Generator().manual_seed(s)) for s in seeds]
    return model.inference(inputs, per_image_rng=rngs, **kw)


def test_losses_at_every_stage_with_an_empty_image(model):
    model = copy.deepcopy(model).train()
    full = with_masks(random_input(64, 80, num_boxes=4, seed=1))
    empty = with_masks(random_input(48, 96, num_boxes=0, seed=2))
    losses = model([full, empty])
    assert {"loss_masks", "loss_masks_0"} <= set(losses)
    assert 0 < losses["loss_masks"] <= 5.0  # dice in [0, 1] times the official weight 5
    sum(losses.values()).backward()
    for name in ("head.head_series.1.controller.weight", "head.mask_head.1.weight",
                 "head.mask_refine.0.0.weight"):  # fmt: skip
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # No object anywhere: a zero mask loss that still reaches the mask parameters (DDP).
    model.zero_grad()
    losses = model([empty, with_masks(random_input(64, 80, num_boxes=0, seed=3))])
    assert losses["loss_masks"] == 0
    sum(losses.values()).backward()
    assert model.head.mask_head[1].weight.grad is not None


def test_masks_belong_to_their_detections_through_ensemble_nms_and_cap(model):
    model = copy.deepcopy(model)
    model.sampler.steps, model.sampler.ensemble = 2, "all_steps"
    model.sampler.detections_per_image = 7
    seen = {}
    select = model.sampler.select_detections

    def spy(candidates):
        seen["merged"] = {k: torch.cat([c[k] for c in candidates]) for k in candidates[0]}
        seen["det"] = select(candidates)
        return seen["det"]

    model.sampler.select_detections = spy
    inp = random_input(64, 80, seed=4)
    inp["height"], inp["width"] = 101, 126  # original size: masks are resized to it
    out = _infer(model, [inp], [5], do_postprocess=False)[0]["instances"]
    det, merged = seen["det"], seen["merged"]
    assert len(merged["scores"]) == 2 * 20 and len(det["scores"]) == 7
    for box, score, kernel in zip(det["boxes"], det["scores"], det["pred_kernels"]):
        row = ((merged["boxes"] == box).all(1) & (merged["scores"] == score)).nonzero()[0, 0]
        assert torch.equal(merged["pred_kernels"][row], kernel)
    # Masks are recomputed from the kept detections' own kernels on the mask feature.
    images, _, features = model.inference_features([inp])
    mask_feat = model.head.per_image_outputs(features)["mask_feat"]
    probs = dynamic_mask_logits(
        mask_feat, det["pred_kernels"], torch.zeros(7, dtype=torch.long), model.head.mask_head_spec,
        det["boxes"], 4,
    ).sigmoid()
    want = masks_to_image(probs, 4, (64, 80), (64, 80), out.pred_boxes.tensor)
    assert out.pred_masks.shape == (7, 64, 80) and torch.equal(out.pred_masks, want)
    full = _infer(model, [inp], [5])[0]["instances"]
    assert full.pred_masks.shape[1:] == (101, 126) and full.pred_masks.dtype == torch.bool


@pytest.mark.numerics
def test_batch_of_two_equals_each_image_alone(model):
    model = copy.deepcopy(model)
    model.sampler.renewal_threshold = 0.2
    a, b = random_input(64, 80, seed=6), random_input(48, 96, seed=7)
    both = _infer(model, [a, b], [11, 12])
    alone = [_infer(model, [a], [11])[0], _infer(model, [b], [12])[0]]
    worst = 1.0
    for x, y in zip(both, alone):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 0
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
        # Same kernels up to GEMM rounding: only pixels within rounding of the 0.5 threshold
        # may flip (measured: none on an AVX-512 Xeon); one in a thousand is allowed.
        differ = (x.pred_masks != y.pred_masks).float().mean().item()
        worst = min(worst, 1 - differ)
        assert differ <= 1e-3
        assert x.pred_masks.any()
    print(f"batch vs alone: {1 - worst:.1e} of mask pixels differ")


def test_mask_threshold_and_box_clipping_are_applied(model):
    model = copy.deepcopy(model)
    inp = random_input(64, 80, seed=8)
    clipped = _infer(model, [inp], [3])[0]["instances"]
    model.clip_masks_to_boxes = False
    free = _infer(model, [inp], [3])[0]["instances"]
    assert (clipped.pred_masks <= free.pred_masks).all()  # clipping only removes pixels
    assert (free.pred_masks & ~clipped.pred_masks).any()
    boxes = clipped.pred_boxes.tensor.int()
    for mask, (x0, y0, x1, y1) in zip(clipped.pred_masks, boxes.tolist()):
        outside = mask.clone()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()
    model.mask_threshold = 0.9
    strict = _infer(model, [inp], [3])[0]["instances"]
    assert strict.pred_masks.sum() < free.pred_masks.sum()


def test_no_detection_gives_empty_masks(model, monkeypatch):
    model = copy.deepcopy(model)
    select = model.sampler.select_detections
    monkeypatch.setattr(
        model.sampler, "select_detections", lambda c: {k: v[:0] for k, v in select(c).items()}
    )
    out = _infer(model, [random_input(48, 96, seed=9)], [1])[0]["instances"]
    assert len(out) == 0 and out.pred_masks.shape == (0, 48, 96)


def test_short_training_on_the_synthetic_set_lowers_the_mask_loss(tmp_path):
    json_path = generate_synthetic_crowd(str(tmp_path), split="train", num_images=2, seed=0,
                                         image_size=(96, 128), max_objects=10)  # fmt: skip
    cfg = inst_cfg("MODEL.DiffusionDet.NUM_CLASSES", 5, "INPUT.MASK_FORMAT", "polygon")
    dicts = load_coco_json(json_path, os.path.join(str(tmp_path), "train"), "tiny_inst_train")
    mapper = DiffusionDetDatasetMapper(cfg, is_train=False)
    mapper.is_train = True  # annotations kept, no random augmentation: a fixed batch
    batch = [mapper(d) for d in dicts]
    assert all(len(b["instances"].gt_masks) > 0 for b in batch)  # polygons, rasterised by the model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    history = []
    for _ in range(30):
        losses = model(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append(sum(v.item() for k, v in losses.items() if k.startswith("loss_masks")))
    first, last = sum(history[:6]) / 6, sum(history[-6:]) / 6
    print(f"mask loss (all stages) {first:.3f} -> {last:.3f}")
    assert last < 0.9 * first, (first, last)


def test_evaluation_tasks_follow_mask_on(tmp_path):
    name = "diffinst_eval_tasks"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=["a"], evaluator_type="coco")
    for mask_on, tasks in ((True, {"bbox", "segm"}), (False, {"bbox"})):
        cfg = inst_cfg("MODEL.MASK_ON", mask_on, "MODEL.META_ARCHITECTURE", "DiffusionDet")
        evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path))
        assert set(evaluator._tasks) == tasks


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.MASK_ON", False], "MASK_ON must be True"),
        (["MODEL.DiffusionInst.MASK_IN_FEATURES", ("p2", "p7")], "MASK_IN_FEATURES"),
        (["MODEL.DiffusionInst.MASK_HEAD_CHANNELS", (8, 2)], "last value of 1"),
        (["MODEL.DiffusionInst.MASK_THRESHOLD", 1.0], "MASK_THRESHOLD"),
        (["MODEL.DiffusionInst.MASK_NORM", "LN"], "MASK_NORM"),
        (["MODEL.DiffusionInst.MASK_REL_COORDS", 1], "MASK_REL_COORDS"),
        (["MODEL.DiffusionInst.MASK_TARGET", "bilinear"], "MASK_TARGET must be 'center' or 'area'"),
        (
            ["MODEL.DiffusionInst.MASK_NORM", "GN", "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 48],
            "MASK_BRANCH_CHANNELS must be a multiple of 32 with MASK_NORM 'GN', got 48",
        ),
    ],
)
def test_invalid_mask_settings_fail_clearly(opts, message):
    with pytest.raises(ValueError, match=message):
        inst_cfg(*opts)


def test_every_mask_key_reaches_the_model():
    base = build_model(inst_cfg())
    assert isinstance(base, DiffusionInst)
    assert base.head.mask_stride == 4 and len(base.head.mask_refine) == 3
    changed = build_model(
        inst_cfg(
            "MODEL.DiffusionInst.MASK_IN_FEATURES", ("p3", "p4"),
            "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 32,
            "MODEL.DiffusionInst.MASK_NUM_CONVS", 3,
            "MODEL.DiffusionInst.MASK_FEAT_CHANNELS", 4,
            "MODEL.DiffusionInst.MASK_HEAD_CHANNELS", (6, 1),
            "MODEL.DiffusionInst.MASK_NORM", "GN",
            "MODEL.DiffusionInst.MASK_WEIGHT", 2.5,
            "MODEL.DiffusionInst.DICE_EPS", 0.5,
            "MODEL.DiffusionInst.MASK_THRESHOLD", 0.3,
            "MODEL.DiffusionInst.CLIP_MASKS_TO_BOXES", False,
            "MODEL.DiffusionInst.MASK_REL_COORDS", False,
            "MODEL.DiffusionInst.MASK_TARGET", "area",
        )  # fmt: skip
    )
    head = changed.head
    assert head.mask_stride == 8 and len(head.mask_refine) == 2  # p3, p4
    assert head.mask_refine[0][0].weight.shape[0] == 32
    assert len(head.mask_head) == 3 + 1 and head.mask_head[3].out_channels == 4
    # (4·6 + 6·1) weights + (6 + 1) biases
    assert head.head_series[0].controller.out_features == 37
    assert isinstance(head.mask_refine[0][1], torch.nn.GroupNorm)
    crit = changed.criterion
    assert crit.weight_dict["loss_masks"] == 2.5 and crit.dice_eps == 0.5 and crit.mask_stride == 8
    assert changed.mask_threshold == 0.3 and changed.clip_masks_to_boxes is False
    assert crit.mask_target == "area" and base.criterion.mask_target == "center"
    # the main job's config appends the 2 relative coordinates: (10·8 + 8·8 + 8·1) + 17 = 169
    assert base.head.mask_head_spec.rel_coords and base.head.head_series[0].controller.out_features == 169
    out = _infer(changed, [random_input(64, 96, seed=1)], [2])[0]["instances"]
    assert out.pred_masks.shape[1:] == (64, 96)
