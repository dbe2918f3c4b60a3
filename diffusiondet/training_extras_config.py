"""Config keys of the training and evaluation extras: model EMA, gradient accumulation, checkpoint
retention, test-time augmentation and the COCO / LVIS evaluation backend. Called by
``add_diffusiondet_config``.

``MODEL_EMA.*`` and ``TEST.AUG.{CVPODS_TTA, SCALE_FILTER, SCALE_RANGES}`` keep the official key
names so official YAMLs merge unchanged. detectron2's own ``TEST.AUG.{ENABLED, MIN_SIZES,
MAX_SIZE, FLIP}`` keep detectron2's defaults here; the official 13 sizes and their scale ranges
live in ``configs/Base-DiffusionDet.yaml`` (docs/training_extras.md, docs/tta.md).
"""
from detectron2.config import CfgNode as CN

# How TEST.AUG merges the detections of the augmented views (docs/tta.md).
TTA_MERGES = ("soft_vote", "nms", "wbf")
# Who computes COCO / LVIS AP (diffusiondet/evaluation/coco_backend.py, docs/evaluation.md).
COCO_EVAL_BACKENDS = ("auto", "faster", "pycocotools")


def add_training_extras_config(cfg):
    """Add ``MODEL_EMA``, ``SOLVER.{ACCUMULATE_STEPS, CHECKPOINT_MAX_KEEP}``, the TTA keys and
    ``TEST.COCO_EVAL_BACKEND``."""
    cfg.MODEL_EMA = CN()
    # Keep an exponential moving average of the weights (diffusiondet/engine/ema.py); evaluation
    # (during and after training, --eval-only, tools loading through load_model_weights) uses it,
    # checkpoints store it under "ema_state" beside the raw "model", --resume restores both.
    cfg.MODEL_EMA.ENABLED = False
    # EMA decay d: ema <- d * ema + (1 - d) * weights after every optimizer step taken (a skipped
    # non-finite step is not averaged in), starting from the weights training starts with.
    cfg.MODEL_EMA.DECAY = 0.999
    # Device of the EMA copy ("" = the model's device; "cpu" saves accelerator memory).
    cfg.MODEL_EMA.DEVICE = ""
    # Both: evaluations use the EMA weights, training and the checkpoints' "model" keep the raw
    # ones. True: the EMA weights serve evaluation only. False: in addition, when training
    # completes, the trainer's model takes the EMA weights (what the process does with the trained
    # model next uses them); model_final.pth still holds both (docs/training_extras.md).
    cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = False
    # YOLOX warm-up of the decay: d * (1 - exp(-s / 2000)) at update s = 1, 2, ..., so early
    # averages follow the weights; --resume restores s ("ema_num_updates").
    cfg.MODEL_EMA.YOLOX = False

    # Micro-batches per optimizer step (docs/training_extras.md): each iteration takes this many
    # SOLVER.IMS_PER_BATCH batches, each normalised by its own positives and scaled by 1/k, sums
    # their gradients and steps once (the step of k times the processes; also with AMP).
    # MAX_ITER, STEPS, CHECKPOINT_PERIOD, EVAL_PERIOD and the logged iteration count optimizer steps.
    cfg.SOLVER.ACCUMULATE_STEPS = 1
    # Periodic checkpoints (model_<iter>.pth) kept on disk, the newest ones; 0 keeps all
    # (detectron2). model_final.pth is never deleted nor duplicated by a periodic file of the same
    # iteration; a resumed run also counts the earlier files, the SIGTERM checkpoint included.
    cfg.SOLVER.CHECKPOINT_MAX_KEEP = 0

    # Official TTA merge switch: True merges the views with TEST.AUG.MERGE, False with plain
    # class-wise NMS (detectron2's GeneralizedRCNNWithTTA).
    cfg.TEST.AUG.CVPODS_TTA = True
    # Merge of the views' detections when CVPODS_TTA: "wbf" (weighted box fusion; the best of the
    # three on the main job, +4.5 AP, and on BCCD, +6.4, docs/tta.md), "soft_vote" (the official
    # merge: class-wise box voting at IoU 0.65, score-weighted box averages) or "nms".
    cfg.TEST.AUG.MERGE = "wbf"
    # Keep, per view of size MIN_SIZES[i], only the boxes whose sqrt(area) (in original-image
    # pixels) lies in SCALE_RANGES[i]; flipped views share their size's range.
    cfg.TEST.AUG.SCALE_FILTER = False
    # (low, high) per TEST.AUG.MIN_SIZES entry; required when SCALE_FILTER.
    cfg.TEST.AUG.SCALE_RANGES = ()

    # COCO and LVIS evaluation: "auto" runs faster-coco-eval (same numbers as pycocotools / the
    # lvis API, several times faster) and falls back to pycocotools / lvis, logged once, when it
    # does not import; "faster" requires it; "pycocotools" forces the reference implementations.
    cfg.TEST.COCO_EVAL_BACKEND = "auto"


def training_extras_config_errors(cfg) -> list:
    """Messages for invalid values of the keys above (empty when all are valid)."""
    aug = cfg.TEST.AUG
    checks = [
        (0.0 <= cfg.MODEL_EMA.DECAY < 1.0, f"MODEL_EMA.DECAY must be in [0, 1), got {cfg.MODEL_EMA.DECAY}"),
        (
            cfg.MODEL_EMA.DEVICE in ("", "cpu") or cfg.MODEL_EMA.DEVICE.startswith("cuda"),
            f"MODEL_EMA.DEVICE must be '', 'cpu' or a cuda device, got {cfg.MODEL_EMA.DEVICE!r}",
        ),
        (
            cfg.SOLVER.ACCUMULATE_STEPS >= 1,
            f"SOLVER.ACCUMULATE_STEPS must be >= 1, got {cfg.SOLVER.ACCUMULATE_STEPS}",
        ),
        (
            cfg.SOLVER.CHECKPOINT_MAX_KEEP >= 0,
            f"SOLVER.CHECKPOINT_MAX_KEEP must be >= 0 (0 keeps all), got {cfg.SOLVER.CHECKPOINT_MAX_KEEP}",
        ),
        (aug.MERGE in TTA_MERGES, f"TEST.AUG.MERGE must be one of {TTA_MERGES}, got {aug.MERGE!r}"),
        (
            cfg.TEST.COCO_EVAL_BACKEND in COCO_EVAL_BACKENDS,
            f"TEST.COCO_EVAL_BACKEND must be one of {COCO_EVAL_BACKENDS}, got {cfg.TEST.COCO_EVAL_BACKEND!r}",
        ),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if aug.SCALE_FILTER:
        ranges = list(aug.SCALE_RANGES)
        if len(ranges) != len(aug.MIN_SIZES):
            errors.append(
                f"TEST.AUG.SCALE_RANGES has {len(ranges)} (low, high) pairs but TEST.AUG.MIN_SIZES "
                f"has {len(aug.MIN_SIZES)} sizes: SCALE_FILTER needs one range per size"
            )
        for i, pair in enumerate(ranges):
            if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
                errors.append(f"TEST.AUG.SCALE_RANGES[{i}] must be (low, high) with 0 <= low < high, got {pair}")
    return errors
