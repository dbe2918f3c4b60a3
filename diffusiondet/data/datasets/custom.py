"""Own COCO-format data named in the config (``DATASETS.CUSTOM``), registered by ``build_config``.

Lives with the other dataset registration: the config layer names it (as the core's ``prepare``
step, see ``diffusiondet.config_extensions``) and never imports it.
"""
import logging

from .coco_json import register_coco_json, validate_coco_json

__all__ = ["register_custom_datasets"]

logger = logging.getLogger(__name__)


def register_custom_datasets(cfg):
    """Register DATASETS.CUSTOM.* jsons as custom_train / custom_test and point the config at them.

    NUM_CLASSES follows the training json's categories, so no Python is needed for own data.
    """
    custom = cfg.DATASETS.CUSTOM
    outside = cfg.DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT  # file_names leaving the image folder
    if custom.TRAIN_JSON:
        num_classes = validate_coco_json(custom.TRAIN_JSON, custom.TRAIN_IMAGES, outside)
        register_coco_json("custom_train", custom.TRAIN_JSON, custom.TRAIN_IMAGES, allow_outside_root=outside)
        cfg.DATASETS.TRAIN = ("custom_train",)
        if cfg.MODEL.DiffusionDet.NUM_CLASSES != num_classes:
            logger.info(
                "MODEL.DiffusionDet.NUM_CLASSES set to %d from %s", num_classes, custom.TRAIN_JSON
            )
            cfg.MODEL.DiffusionDet.NUM_CLASSES = num_classes
    if custom.TEST_JSON:
        num_test = validate_coco_json(custom.TEST_JSON, custom.TEST_IMAGES, outside)
        register_coco_json("custom_test", custom.TEST_JSON, custom.TEST_IMAGES, allow_outside_root=outside)
        cfg.DATASETS.TEST = ("custom_test",)
        if custom.TRAIN_JSON and num_test != cfg.MODEL.DiffusionDet.NUM_CLASSES:
            raise ValueError(
                f"{custom.TEST_JSON} has {num_test} categories but {custom.TRAIN_JSON} has "
                f"{cfg.MODEL.DiffusionDet.NUM_CLASSES}"
            )
