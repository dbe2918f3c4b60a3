"""The detectron2 trainer of DiffusionDet: ``build_*`` overrides plus fault-tolerant parts."""
import contextlib
import logging
import os
import weakref

import detectron2.engine.defaults as d2_defaults
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.evaluation import COCOEvaluator, LVISEvaluator

from ..data import DiffusionDetDatasetMapper
from ..evaluation import ClassMappingEvaluator, CrowdHumanEvaluator, parse_class_mapping
from ..evaluation.lvis_compat import ensure_lvis_numpy_compat
from .checkpoint import DiffusionDetCheckpointer
from .optimizer import build_optimizer
from .train_loop import SkipNonFiniteTrainer

logger = logging.getLogger(__name__)


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
    """DefaultTrainer with the DiffusionDet mapper, optimizer and evaluators, atomic checkpoints
    and weights-fit checks (:class:`DiffusionDetCheckpointer`), and skipped non-finite steps
    (:class:`SkipNonFiniteTrainer`, SOLVER.MAX_NONFINITE_STEPS)."""

    def __init__(self, cfg):
        with _ddp_on_any_device():
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ creates its step trainer and checkpointer just before this call:
        # swap them here, before PeriodicCheckpointer captures the checkpointer.
        step = self._trainer
        if type(step) is SimpleTrainer:
            self._trainer = SkipNonFiniteTrainer(
                step.model, step.data_loader, step.optimizer, self.cfg.SOLVER.MAX_NONFINITE_STEPS
            )
        else:  # AMPTrainer: its GradScaler skips inf gradients; a NaN loss stops it as in detectron2
            logger.info("SOLVER.MAX_NONFINITE_STEPS is not used by %s", type(step).__name__)
        self.checkpointer = DiffusionDetCheckpointer(
            step.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @property
    def loss_hook(self):
        """Test hook ``fn(iteration, loss_dict) -> loss_dict`` (see SkipNonFiniteTrainer)."""
        return getattr(self._trainer, "loss_hook", None)

    @loss_hook.setter
    def loss_hook(self, fn):
        self._trainer.loss_hook = fn

    @property
    def nonfinite_steps(self) -> int:
        """Optimizer steps skipped so far because of a non-finite loss."""
        return getattr(self._trainer, "nonfinite_steps", 0)

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
        evaluator = cls._dataset_evaluator(cfg, dataset_name, output_folder)
        if not cfg.TEST.CLASS_MAPPING:
            return evaluator
        source = _training_classes(cfg)
        target = MetadataCatalog.get(dataset_name).get("thing_classes", [])
        return ClassMappingEvaluator(evaluator, parse_class_mapping(cfg.TEST.CLASS_MAPPING, source, target))

    @classmethod
    def _dataset_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        if getattr(meta, "evaluator_type", None) == "crowdhuman":
            if cfg.TEST.CLASS_MAPPING:  # detections arrive relabelled to this dataset's classes
                person = meta.get("thing_classes", ["person"]).index("person")
            else:  # the person class of the model's own training data (COCO zero-shot: id 0 too)
                train_classes = _training_classes(cfg)
                person = train_classes.index("person") if "person" in train_classes else 0
            return CrowdHumanEvaluator(dataset_name, output_folder, person_class=person)
        if getattr(meta, "evaluator_type", None) == "lvis" or "lvis" in dataset_name:
            ensure_lvis_numpy_compat()
            return LVISEvaluator(dataset_name, cfg, True, output_folder)
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
            distributed=True,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )


def _training_classes(cfg):
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", []) if cfg.DATASETS.TRAIN else []
