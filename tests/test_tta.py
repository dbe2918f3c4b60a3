"""DiffusionDetWithTTA (diffusiondet/test_time_augmentation.py): views, flip undo, scale filter,
merge choice, per-view seeds and DiffusionInst masks, on non-square images (docs/tta.md).

Most tests replace the model's sampling with a "square finder" that reads the view it is given:
a detection is the box of the pixels > 127 in one colour channel (one class per channel), in the
view's own frame, then rescaled to the original size by detector_postprocess as the model's
``resize_instances`` does. Boxes mapped back wrong (unflipped, unscaled) then show up as numbers.
"""
import pytest
import torch
from detectron2.modeling import DatasetMapperTTA, build_model, detector_postprocess
from detectron2.structures import Boxes, Instances

from diffusiondet.test_time_augmentation import DiffusionDetWithTTA
from tests.utils import random_input, tiny_cfg

H, W = 60, 90  # the original image: non-square
RED = [12, 20, 32, 40]  # x1 y1 x2 y2 of the red square: 20 px, sqrt(area) 20, off-centre
GREEN = [50, 8, 56, 14]  # 6 px
AUG = ["TEST.AUG.SCALE_FILTER", False, "TEST.AUG.MAX_SIZE", 400]


def image_with_squares():
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    for channel, (x1, y1, x2, y2) in ((0, RED), (1, GREEN)):
        image[channel, y1:y2, x1:x2] = 255
    return {"image": image, "height": H, "width": W, "image_id": 3}


class SquareFinder:
    """Stands in for ``model.inference``: per view, one detection per channel (class) that has
    bright pixels, score ``score(short side, class)``, box shifted by ``shift(short side)`` px in x
    (view frame)."""

    def __init__(self, score=lambda side, channel: 0.9, shift=lambda side: 0.0):
        self.score, self.shift, self.calls = score, shift, []

    def __call__(self, views, per_image_rng=None, do_postprocess=True):
        self.calls.append((views, per_image_rng))
        outputs = []
        for view in views:
            image = view["image"]
            side = min(image.shape[1:])
            boxes, classes, scores = [], [], []
            for channel in range(2):
                ys, xs = torch.nonzero(image[channel] > 127, as_tuple=True)
                if len(xs):
                    box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
                    boxes.append(box + torch.tensor([1.0, 0, 1, 0]) * self.shift(side))
                    classes.append(channel)
                    scores.append(self.score(side, channel))
            inst = Instances(tuple(image.shape[1:]))
            inst.pred_boxes = Boxes(torch.stack(boxes))
            inst.scores = torch.tensor(scores)
            inst.pred_classes = torch.tensor(classes)
            outputs.append({"instances": detector_postprocess(inst, view["height"], view["width"])})
        return outputs


@pytest.fixture(scope="module")
def det_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()


def tta_with(model, monkeypatch, finder, *opts, mapper=None):
    cfg = tiny_cfg(*AUG, *opts)
    monkeypatch.setattr(model, "inference", finder)
    return DiffusionDetWithTTA(cfg, model, tta_mapper=mapper and mapper(cfg)).eval()


def by_class(inst):
    """class -> (box, score) of an output with one detection per class."""
    rows = zip(inst.pred_boxes.tensor, inst.scores, inst.pred_classes)
    return {int(c): (b.tolist(), float(s)) for b, s, c in rows}


def test_flipped_view_boxes_are_mirrored_back(det_model, monkeypatch):
    def flipped_only(cfg):  # DatasetMapperTTA's second view: resized to 2x and flipped
        return lambda x: DatasetMapperTTA(cfg)(x)[1:]

    tta = tta_with(det_model, monkeypatch, SquareFinder(), "TEST.AUG.MIN_SIZES", (120,), mapper=flipped_only)
    found = by_class(tta([image_with_squares()])[0]["instances"])
    (view,), _ = tta.model.inference.calls[0]
    assert tuple(view["image"].shape[1:]) == (120, 180)
    # In the view the red square spans x 116..156 (180 - 2 * 32 .. 180 - 2 * 12); mirrored back
    # and halved it is the square again (to bilinear resize rounding: within half a pixel).
    assert found[0][0] == pytest.approx(RED, abs=0.5) and found[1][0] == pytest.approx(GREEN, abs=0.5)


def test_every_size_gives_a_plain_and_a_flipped_view_of_the_original_image(det_model, monkeypatch):
    min_sizes = ["TEST.AUG.MIN_SIZES", (40, 80)]
    tta = tta_with(det_model, monkeypatch, SquareFinder(), *min_sizes, "TEST.AUG.MAX_SIZE", 100)
    found = by_class(tta([image_with_squares()])[0]["instances"])
    sizes = sorted(tuple(v["image"].shape[1:]) for views, _ in tta.model.inference.calls for v in views)
    # MAX_SIZE 100 caps the long side: 80 x 120 becomes 67 x 100 (detectron2's rounding).
    assert sizes == [(40, 60), (40, 60), (67, 100), (67, 100)]
    assert [len(views) for views, _ in tta.model.inference.calls] == [2, 2]  # one size per batch
    assert found[0][0] == pytest.approx(RED, abs=1.0) and found[1][0] == pytest.approx(GREEN, abs=1.0)
    no_flip = tta_with(det_model, monkeypatch, SquareFinder(), *min_sizes, "TEST.AUG.FLIP", False)
    no_flip([image_with_squares()])
    assert sum(len(views) for views, _ in no_flip.model.inference.calls) == 2


def test_scale_filter_keeps_per_size_the_boxes_of_its_range(det_model, monkeypatch):
    # The 60 px views score 0.54, the 120 px views 0.58 (class-wise NMS keeps the better view).
    # Filter: at 60 px (plain and flipped) only sqrt(area) in [0, 10] (the 6 px green square), at
    # 120 px only [10, 1000] (the 20 px red one); without it the 120 px views win both.
    finder = SquareFinder(score=lambda side, channel: 0.5 + side / 1500)
    opts = ["TEST.AUG.MIN_SIZES", (60, 120), "TEST.AUG.FLIP", True, "TEST.AUG.CVPODS_TTA", False]
    plain = by_class(tta_with(det_model, monkeypatch, finder, *opts)([image_with_squares()])[0]["instances"])
    assert plain[0][1] == pytest.approx(0.58) and plain[1][1] == pytest.approx(0.58)
    ranges = ["TEST.AUG.SCALE_FILTER", True, "TEST.AUG.SCALE_RANGES", [[0, 10], [10, 1000]]]
    tta = tta_with(det_model, monkeypatch, finder, *opts, *ranges)
    filtered = by_class(tta([image_with_squares()])[0]["instances"])
    assert filtered[0][1] == pytest.approx(0.58) and filtered[1][1] == pytest.approx(0.54)
    assert filtered[0][0] == pytest.approx(RED, abs=0.5) and filtered[1][0] == pytest.approx(GREEN, abs=0.5)


@pytest.mark.parametrize(
    "opts, red_boxes, red_scores",
    [
        # The 60 px view finds RED at scale 1, score 0.9; the 120 px view finds it shifted by 4 px
        # in its frame, 2 px in the image, score 0.6: IoU 360/440 = 0.818.
        (["TEST.AUG.MERGE", "nms"], [RED], [0.9]),
        # Fused with weights 0.9, 0.6: x moves by 2 * 0.6 / 1.5 = 0.8; the shifted box stays
        # with 0.6 * (1 - 0.818) = 0.109.
        (["TEST.AUG.MERGE", "soft_vote"], [[12.8, 20, 32.8, 40], [14, 20, 34, 40]], [0.9, 0.6 * 80 / 440]),
        # WBF over 2 views: the same fused box, score (0.9 + 0.6) / 2 * min(2, 2) / 2.
        (["TEST.AUG.MERGE", "wbf"], [[12.8, 20, 32.8, 40]], [0.75]),
        # CVPODS_TTA False: detectron2's merge, class-wise NMS, whatever MERGE says.
        (["TEST.AUG.MERGE", "wbf", "TEST.AUG.CVPODS_TTA", False], [RED], [0.9]),
    ],
    ids=["nms", "soft_vote", "wbf", "cvpods_tta_off"],
)
def test_merge_follows_cvpods_tta_and_merge(det_model, monkeypatch, opts, red_boxes, red_scores):
    finder = SquareFinder(score=lambda side, channel: 0.9 if side == 60 else 0.6, shift=lambda side: 4.0 * (side == 120))
    tta = tta_with(det_model, monkeypatch, finder, "TEST.AUG.MIN_SIZES", (60, 120), "TEST.AUG.FLIP", False, *opts)
    inst = tta([image_with_squares()])[0]["instances"]
    red = inst[inst.pred_classes == 0]
    assert torch.allclose(red.pred_boxes.tensor, torch.tensor(red_boxes, dtype=torch.float32), atol=1e-4)
    assert torch.allclose(red.scores, torch.tensor(red_scores), atol=1e-4)


def test_views_draw_distinct_noise_that_repeats(det_model, monkeypatch):
    tta = tta_with(det_model, monkeypatch, SquareFinder(), "TEST.AUG.MIN_SIZES", (40, 80))
    draws = []
    for _ in range(2):
        tta.model.inference.calls.clear()
        tta([image_with_squares()])
        draws.append([rng.randn((3,)) for _, rngs in tta.model.inference.calls for rng in rngs])
    assert len(draws[0]) == 4
    for a in range(4):  # four views, four different streams
        for b in range(a + 1, 4):
            assert not torch.equal(draws[0][a], draws[0][b])
    assert all(torch.equal(x, y) for x, y in zip(*draws))  # and the same ones the next time
    monkeypatch.setattr(tta.model, "sampling_seed", -1)  # no SEED: torch's global generator, as without TTA
    tta.model.inference.calls.clear()
    tta([image_with_squares()])
    assert all(rngs is None for _, rngs in tta.model.inference.calls)


@pytest.mark.parametrize(
    "opts, kept",
    [
        ([], 2),  # the default cap: EVAL_NUM_PROPOSALS or NUM_PROPOSALS (20 here)
        (["MODEL.DiffusionDet.DETECTIONS_PER_IMAGE", 1], 1),
        (["MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 1], 1),  # the boxes one view samples
        (["MODEL.DiffusionDet.DETECTIONS_PER_IMAGE", 2, "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 1], 2),
    ],
    ids=["default", "detections_per_image", "eval_num_proposals", "detections_per_image_first"],
)
def test_detections_are_capped_best_first(monkeypatch, opts, kept):
    # Red scores 0.9, green 0.8 in every view; the cap keeps the best ``kept`` of them.
    finder = SquareFinder(score=lambda side, channel: 0.9 - 0.1 * channel)
    model = build_model(tiny_cfg(*opts)).eval()
    tta = tta_with(model, monkeypatch, finder, "TEST.AUG.MIN_SIZES", (60, 120), *opts)
    inst = tta([image_with_squares()])[0]["instances"]
    assert inst.scores.tolist() == pytest.approx([0.9, 0.8][:kept])


def test_diffusioninst_masks_are_flipped_back_with_their_boxes():
    # The real DiffusionInst sampling on the flipped view only; a mask threshold near 0 makes each
    # mask fill its box (the model clips masks to boxes), so a mask left unflipped would sit at
    # the mirrored place. NMS keeps each survivor's own mask (tests/modeling/test_tta_merge.py).
    cfg = tiny_cfg(
        "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NUM_CONVS", 1,
        "MODEL.DiffusionInst.MASK_NORM", "BN", "MODEL.DiffusionInst.MASK_THRESHOLD", 1e-6,
        *AUG, "TEST.AUG.MIN_SIZES", (64,), "TEST.AUG.MERGE", "nms", config_file="configs/diffinst.synthetic.res18.yaml",
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tta = DiffusionDetWithTTA(cfg, model, tta_mapper=lambda x: DatasetMapperTTA(cfg)(x)[1:]).eval()
    image = random_input(H, W)
    image.pop("instances")
    inst = tta([{**image, "image_id": 1}])[0]["instances"]
    assert inst.pred_masks.shape == (len(inst), H, W) and inst.pred_masks.dtype == torch.bool
    checked = mirrored_apart = 0
    for (x1, y1, x2, y2), mask in zip(inst.pred_boxes.tensor.tolist(), inst.pred_masks):
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue  # a sub-2-pixel box may hold an empty mask
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(xs) >= 0.5 * (x2 - x1) * (y2 - y1)
        assert x1 - 1 <= xs.min() and xs.max() + 1 <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() + 1 <= y2 + 1
        checked += 1
        mirrored_apart += x2 <= W / 2 or x1 >= W / 2  # its mirror image misses the box
    assert checked >= 5 and mirrored_apart >= 1, (checked, mirrored_apart)
