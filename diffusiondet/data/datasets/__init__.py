"""Dataset registration: user COCO json files and the built-in synthetic crowded set."""
from .builtin import (
    SYNTHETIC_CROWD_SPLITS,
    datasets_root,
    ensure_synthetic_crowd,
    register_all_builtin,
    register_synthetic_crowd,
)
from .coco_json import check_coco_dict, register_coco_json, validate_coco_json
from .crowdhuman import CROWDHUMAN_SPLITS, odgt_to_coco, register_crowdhuman

__all__ = [
    "CROWDHUMAN_SPLITS",
    "SYNTHETIC_CROWD_SPLITS",
    "check_coco_dict",
    "datasets_root",
    "ensure_synthetic_crowd",
    "odgt_to_coco",
    "register_all_builtin",
    "register_coco_json",
    "register_crowdhuman",
    "register_synthetic_crowd",
    "validate_coco_json",
]

# Registers synthetic_crowd_{train,val} under $DETECTRON2_DATASETS (default "datasets"); guarded,
# so importing twice never registers twice.
register_all_builtin()
