"""The detectron2 trainer of DiffusionDet: overrides ``build_*`` classmethods only."""
import contextlib
import os

import detectron2.engine.defaults as d2_defaults
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm
from detectron2.evaluation import COCOEvaluator, LVISEvaluator

from ..data import DiffusionDetDatasetMapper
from .optimizer import build_optimizer


@contextlib.contextmanager
def _ddp_on_any_device():
    """Let DefaultTrainer wrap a CPU model in DDP (GLOO): CPU DDP needs device_ids=None.

    detectron2's ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which only
    GPU modules accept; multi-process CPU training (and its test) needs the CPU variant.
    """
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """DefaultTrainer with the DiffusionDet mapper, optimizer and evaluators."""

    def __init__(self, cfg):
        with _ddp_on_any_device():
            super().__init__(cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DiffusionDetDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # Inference is batch-safe (per-image renewal), so evaluation may batch images.
        return build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=DiffusionDetDatasetMapper(cfg, is_train=False),
            batch_size=cfg.TEST.IMS_PER_BATCH,
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        if getattr(meta, "evaluator_type", None) == "lvis" or "lvis" in dataset_name:
            return LVISEvaluator(dataset_name, cfg, True, output_folder)
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox",),
            distributed=True,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
