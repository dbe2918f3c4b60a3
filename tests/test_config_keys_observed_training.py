"""Config keys of training (corruption, matching, losses), each observed through behaviour.

Matcher and loss keys: ``build_criterion`` from the config scores crafted predictions for one
12x12 GT box in a 100x80 image; which query the dynamic-k matcher takes is chosen so that each key
flips it. Corruption keys: ``build_model`` + ``forward_training`` with a recording
``RandomSource``. See test_config_keys_observed.py for the harness.
"""
import pytest
import torch

from detectron2.data import MetadataCatalog

from diffusiondet.modeling.builders import build_criterion
from tests.test_config_keys_observed import (
    DIFFER,
    RecordingRandom,
    Row,
    check_row,
    proportional,
    run_model,
)

GT_BOX, WHWH = [40.0, 30.0, 52.0, 42.0], [100.0, 80.0, 100.0, 80.0]
# Query boxes and class-0 logits. With the default costs the dynamic-k matcher takes ONE query
# (top-5 IoU sum 1.46): q3, whose better class outweighs q0's exact box; q1 pays
# NOT_IN_BOTH_COST (centre right of the box but within CENTER_RADIUS widths); q2 is no candidate
# (pays NOT_FG_COST) but has the best class; q4, q5 are hopeless fillers.
QUERIES = [
    ([40.0, 30.0, 52.0, 42.0], 0.0),  # q0: exact box, p = 0.5
    ([54.0, 30.0, 66.0, 42.0], 4.6),  # q1: centre outside the box, inside the centre region
    ([84.0, 64.0, 96.0, 76.0], 20.0),  # q2: far away
    ([42.5, 32.5, 54.5, 44.5], 2.2),  # q3: inside, shifted 2.5 px, p = 0.9
    ([0.0, 0.0, 4.0, 4.0], -10.0),
    ([96.0, 0.0, 100.0, 4.0], -10.0),
]
LOSS_CASE = [3, 4, 5]  # only q3 is a candidate: the match cannot depend on any weight
# OTA_K case: the exact box and boxes shifted by one pixel (IoUs 1, 0.85 x 4, 0.72).
OTA_BOXES = [
    [40, 30, 52, 42], [41, 30, 53, 42], [39, 30, 51, 42], [40, 31, 52, 43], [40, 29, 52, 41],
    [41, 31, 53, 43],
]


def crafted(cfg, boxes, class0_logits, grad=False):
    """Single-stage outputs (1, 1, Q, K) / (1, 1, Q, 4) and the one-GT target."""
    num_classes = cfg.MODEL.DiffusionDet.NUM_CLASSES
    logits = torch.full((1, 1, len(boxes), num_classes), -3.0)
    logits[0, 0, :, 0] = torch.tensor(class0_logits)
    logits.requires_grad_(grad)
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[boxes]], dtype=torch.float32)}
    target = {
        "labels": torch.tensor([0]),
        "boxes_xyxy": torch.tensor([GT_BOX]),
        "image_size_xyxy": torch.tensor(WHWH),
    }
    return outputs, [target]


def matched(cfg, queries=QUERIES):
    """Indices of the queries the built criterion's matcher assigns to the GT."""
    outputs, targets = crafted(cfg, [b for b, _ in queries], [l for _, l in queries])
    fg_mask, _ = build_criterion(cfg).match_all_stages(outputs, targets)[0][0]
    return fg_mask.nonzero().flatten().tolist()


def loss(name):
    def observe(cfg):
        outputs, targets = crafted(cfg, *zip(*[QUERIES[i] for i in LOSS_CASE]))
        return float(build_criterion(cfg)(outputs, targets)[name])
    return observe


def ota_positives(cfg):
    return len(matched(cfg, [(b, 0.0) for b in OTA_BOXES]))


FED_DATASET = "config_keys_observed_fed_train"
FED_COUNTS = [5, 5, 0, 0, 0, 0]  # images per class: classes 2..5 never appear
MetadataCatalog.get(FED_DATASET).set(
    class_image_count=[{"id": i, "image_count": c} for i, c in enumerate(FED_COUNTS)]
)


def classes_in_loss(cfg, seeds=(0,)):
    """Classes whose logits get a gradient from loss_ce (union over federated-sampling seeds)."""
    classes = set()
    for seed in seeds:
        outputs, targets = crafted(cfg, [b for b, _ in QUERIES], [l for _, l in QUERIES], grad=True)
        torch.manual_seed(seed)
        build_criterion(cfg)(outputs, targets)["loss_ce"].backward()
        grad = outputs["pred_logits"].grad.abs().sum(dim=(0, 1, 2))
        classes |= set(grad.nonzero().flatten().tolist())
    return sorted(classes)


def freq_weights_decide(values, obs):
    assert obs[0] == [0, 1], f"power {values[0]}: never-seen classes were sampled: {obs[0]}"
    assert len(obs[1]) > 2, f"power {values[1]} (uniform): only {obs[1]} sampled over 8 seeds"


# -------------------------------------------------------------------------- whole-model rows
def train_draws(cfg):
    return run_model(cfg, train=True).rng.draws


def train_head_input(cfg):
    return run_model(cfg, train=True).calls.boxes[0]


def placeholders_move(values, obs):
    num_gt = 3  # tests.utils.random_input
    for other in obs[1:]:
        torch.testing.assert_close(other[:, :num_gt], obs[0][:, :num_gt])  # GT rows: same draws
        moved = not torch.allclose(other[:, num_gt:], obs[0][:, num_gt:])
        assert moved, f"PLACEHOLDER_STD {values}: placeholder boxes unchanged"


def timesteps(cfg):
    return run_model(cfg, train=True).rng.randint_highs[0], int(run_model(cfg).calls.times[0][0])


def stages_and_loss_terms(cfg):
    r = run_model(cfg, train=True)
    return r.calls.outputs[0]["pred_logits"].shape[0], len(r.out)


def count_and_gt_class(cfg):
    kept = classes_in_loss(cfg)
    return len(kept), 0 in kept


def logit_width_and_training(cfg):
    width = run_model(cfg).calls.outputs[0]["pred_logits"].shape[-1]
    try:
        run_model(cfg, train=True)
    except NotImplementedError:
        return width, "NotImplementedError"
    return width, "ok"


D = "MODEL.DiffusionDet."
FED = [D + "USE_FED_LOSS", True, D + "NUM_CLASSES", 8]
NOT_IN_BOTH_0 = [D + "NOT_IN_BOTH_COST", 0.0]

ROWS = [
    # Loss weights scale their loss term (the match is fixed: one candidate) ...
    Row("CLASS_WEIGHT", "loss_ce / weight", [2.0, 5.0], loss("loss_ce"), proportional),
    Row("L1_WEIGHT", "loss_bbox / weight", [5.0, 2.0], loss("loss_bbox"), proportional),
    Row("GIOU_WEIGHT", "loss_giou / weight", [2.0, 7.0], loss("loss_giou"), proportional),
    # ... and weight the matching cost: box quality (q0) against class quality (q3).
    Row("CLASS_WEIGHT", "matched query", [2.0, 0.1], matched, [[3], [0]]),
    Row("L1_WEIGHT", "matched query", [5.0, 100.0], matched, [[3], [0]]),
    Row("GIOU_WEIGHT", "matched query", [2.0, 20.0], matched, [[3], [0]]),
    Row("ALPHA", "loss_ce", [0.25, 0.75], loss("loss_ce"), DIFFER),
    Row("GAMMA", "loss_ce", [2.0, 0.5], loss("loss_ce"), DIFFER),
    Row("ALPHA", "matched query", [0.25, 0.9], matched, [[3], [0]]),
    Row("GAMMA", "matched query", [2.0, 10.0], matched, [[3], [0]]),
    Row("OTA_K", "positives (k = floor of top-k IoU sum)", [5, 1, 3], ota_positives, [4, 1, 2]),
    Row("NOT_IN_BOTH_COST", "matched query", [100.0, 0.0], matched, [[3], [1]]),
    Row("NOT_FG_COST", "matched query", [10000.0, 0.0], matched, [[1], [2]], base=NOT_IN_BOTH_0),
    Row("CENTER_RADIUS", "matched query", [2.5, 0.5, 5.0], matched, [[1], [3], [2]],
        base=NOT_IN_BOTH_0),
    Row("USE_FED_LOSS", "classes in loss_ce: how many, GT class among them", [False, True],
        count_and_gt_class, [(8, True), (2, True)],
        base=[D + "NUM_CLASSES", 8, D + "FED_LOSS_NUM_CLASSES", 3]),
    Row("FED_LOSS_NUM_CLASSES", "number of classes in loss_ce", [3, 6],
        lambda c: len(classes_in_loss(c)), [2, 5], base=FED),
    Row("FED_LOSS_FREQ_WEIGHT_POWER", "classes in loss_ce over 8 seeds", [0.5, 0.0],
        lambda c: classes_in_loss(c, seeds=range(8)), freq_weights_decide,
        base=FED[:2] + [D + "NUM_CLASSES", 6, D + "FED_LOSS_NUM_CLASSES", 3,
                        "DATASETS.TRAIN", (FED_DATASET,)]),
    Row("NO_OBJECT_WEIGHT", "background weight saved in the checkpoint", [0.1, 0.5],
        lambda c: float(build_criterion(c).state_dict()["empty_weight"][-1]), [0.1, 0.5],
        # Softmax training is not implemented, so this buffer is the key's only effect.
        base=[D + "USE_FOCAL", False]),
    Row("USE_FOCAL", "inference logit width; training", [True, False], logit_width_and_training,
        [(3, "ok"), (4, "NotImplementedError")]),
    Row("DEEP_SUPERVISION", "head stages, loss terms", [True, False], stages_and_loss_terms,
        [(2, 6), (1, 3)]),
    # Training corruption, observed through the random draws and the boxes the head gets.
    Row("NUM_TIMESTEPS", "t drawn in [0, T); first sampling t", [1000, 50], timesteps,
        [(1000, 999), (50, 49)]),
    Row("PADDING", "corruption draws (3 GT, 20 boxes)",
        ["gaussian_concat", "uniform_concat", "full_image_concat", "repeat"], train_draws,
        [[("randint", (1,)), ("randn", (20, 4)), ("randn", (17, 4))],
         [("randint", (1,)), ("randn", (20, 4)), ("rand", (17, 4))],
         [("randint", (1,)), ("randn", (20, 4))],
         [("randint", (1,)), ("randn", (20, 4)), ("randperm", (3,))]]),
    Row("PLACEHOLDER_STD", "training head input: GT rows same, placeholders move", [1.0 / 6.0, 0.5],
        train_head_input, placeholders_move),
    Row("SNR_SCALE", "training head input", [2.0, 3.0], train_head_input, DIFFER),
]


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_config_key_is_observed(row):
    check_row(row)
