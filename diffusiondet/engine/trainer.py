"""The detectron2 trainer of DiffusionDet: ``build_*`` overrides plus fault-tolerant parts."""
import contextlib
import logging
import os
import weakref

import detectron2.engine.defaults as d2_defaults
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data import DiffusionDetDatasetMapper
from ..data.resumable_loader import build_resumable_train_loader, set_loader_position
from ..utils.rng_state import capture_rng_state, preserved_rng_state, restore_rng_state
from ..evaluation import ClassMappingEvaluator, CrowdHumanEvaluator, parse_class_mapping
from ..evaluation.coco_backend import build_coco_evaluator, build_lvis_evaluator
from ..evaluation.lvis_compat import ensure_lvis_numpy_compat
from .accumulation import AccumulatingAMPTrainer
from .checkpoint import DiffusionDetCheckpointer
from .checkpoint_retention import periodic_checkpointer
from .ema import add_model_ema
from .output_check import check_writable_dir
from .optimizer import build_optimizer
from .stop_signal import StopOnSignal, stop_signals_abort
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
    and weights-fit checks (:class:`DiffusionDetCheckpointer`), skipped non-finite steps
    (:class:`SkipNonFiniteTrainer`, SOLVER.MAX_NONFINITE_STEPS), and runs that are a function of
    ``SEED``: seeded before the model is built, a training loader whose position is one number,
    and checkpoints that store every rank's RNG states and that position, so that ``--resume``
    continues the uninterrupted run bit for bit (``docs/reproducibility.md``)."""

    def __init__(self, cfg):
        if cfg.SEED >= 0:  # before the model exists: its initial weights are the seed's
            seed_all_rng(cfg.SEED + comm.get_rank())
        with _ddp_on_any_device():
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ creates its step trainer and checkpointer just before this call:
        # swap them here, before PeriodicCheckpointer captures the checkpointer.
        step = self._trainer
        if type(step) is SimpleTrainer:
            self._trainer = SkipNonFiniteTrainer(
                step.model, step.data_loader, step.optimizer, self.cfg.SOLVER.MAX_NONFINITE_STEPS,
                accumulate_steps=self.cfg.SOLVER.ACCUMULATE_STEPS,
            )
        else:  # AMPTrainer: its GradScaler skips inf gradients; a NaN loss stops it as in detectron2
            logger.info("SOLVER.MAX_NONFINITE_STEPS is not used by %s", type(step).__name__)
            if self.cfg.SOLVER.ACCUMULATE_STEPS > 1:
                self._trainer = AccumulatingAMPTrainer.from_amp_trainer(step, self.cfg.SOLVER.ACCUMULATE_STEPS)
        self.checkpointer = DiffusionDetCheckpointer(
            step.model, self.cfg.OUTPUT_DIR, trust_code=self.cfg.MODEL.TRUST_WEIGHTS,
            trainer=weakref.proxy(self),
        )
        self.checkpointer.collect_state = self.run_state
        # SOLVER.CHECKPOINT_MAX_KEEP, and no periodic duplicate of model_final (checkpoint_retention.py).
        hook_list = [
            periodic_checkpointer(self.checkpointer, self.cfg) if isinstance(h, hooks.PeriodicCheckpointer) else h
            for h in super().build_hooks()
        ]
        if not comm.is_main_process():
            # detectron2 checkpoints from the main process only, but gathering the RNG states
            # of every rank is a collective: the other ranks get the same hook (their
            # checkpointer writes nothing), before the evaluation hook as on the main process,
            # so that every rank enters the collectives in the same order.
            at = next((i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook)), len(hook_list))
            hook_list.insert(at, periodic_checkpointer(self.checkpointer, self.cfg))
        # Every rank, after the checkpointer and before the evaluation hook (the same order of
        # collectives everywhere): SIGTERM -> checkpoint and stop (stop_signal.py).
        at = next((i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook)), len(hook_list))
        hook_list.insert(at, StopOnSignal(self.checkpointer))
        # MODEL_EMA.ENABLED: averaged after each step, checkpointed, evaluated (ema.py); else None.
        self.model_ema = add_model_ema(self.cfg, self.model, self.checkpointer, hook_list)
        return hook_list

    def run_state(self) -> dict:
        """What a checkpoint needs beyond the trainer's state dict to continue the run exactly:
        the RNG states of every rank (a collective: every rank calls this at every save) and
        the number of batches taken from the training loader."""
        position = getattr(self._trainer, "batches_consumed", self.iter + 1)
        return {"rng_states": comm.all_gather(capture_rng_state()), "data_position": position}

    def resume_or_load(self, resume=True):
        """As detectron2's, and a resumed run also gets back its RNG states and data position."""
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            # The checkpoint stores the iteration that had just finished.
            self.start_iter = self.iter + 1
            self._restore_run_state(checkpoint)

    def _restore_run_state(self, checkpoint: dict) -> None:
        path = self.checkpointer.get_checkpoint_file()
        states, position = checkpoint.get("rng_states"), checkpoint.get("data_position")
        world = comm.get_world_size()
        if states is None or position is None:
            logger.warning(
                "%s has no RNG states or data position (written by an older version): training "
                "resumes at iteration %d, but its trajectory will differ from an uninterrupted run",
                path, self.start_iter,
            )
            position = self.start_iter
        elif len(states) != world:
            logger.warning(
                "%s was written by %d processes and is resumed by %d: the data position is kept, "
                "but the random draws restart and the trajectory will differ from an uninterrupted run",
                path, len(states), world,
            )
        else:
            restore_rng_state(states[comm.get_rank()])
        if hasattr(self._trainer, "batches_consumed"):
            self._trainer.batches_consumed = position
        if not set_loader_position(self.data_loader, position):
            logger.warning("The training loader is not resumable: the data order restarts from its beginning")

    @property
    def loss_hook(self):
        """Test hook ``fn(iteration, loss_dict) -> loss_dict`` (see SkipNonFiniteTrainer)."""
        return getattr(self._trainer, "loss_hook", None)

    @loss_hook.setter
    def loss_hook(self, fn):
        self._trainer.loss_hook = fn

    @property
    def data_loader(self):
        """The training loader (see ``build_train_loader``)."""
        return self._trainer.data_loader

    @property
    def nonfinite_steps(self) -> int:
        """Optimizer steps skipped so far because of a non-finite loss."""
        return getattr(self._trainer, "nonfinite_steps", 0)

    @classmethod
    def build_train_loader(cls, cfg):
        # Every rank must shard the same stream: without SEED, rank 0 draws the seed for all.
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return build_resumable_train_loader(cfg, DiffusionDetDatasetMapper(cfg, is_train=True), seed)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # An evaluation during training must not shift the training's random draws: the run
        # would then depend on EVAL_PERIOD, and a resumed run on where it was interrupted.
        # A stand-alone evaluation stopped by SIGTERM says that its results are lost; inside
        # training, StopOnSignal's handler stays and the run stops after this evaluation.
        with preserved_rng_state(), stop_signals_abort(f"the evaluation on {tuple(cfg.DATASETS.TEST)}"):
            return super().test(cfg, model, evaluators)

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
        if comm.is_main_process():
            # DefaultTrainer.test builds the evaluator before the inference, and the evaluator
            # writes (on the main process) only after it: a full or read-only disk fails here.
            check_writable_dir(output_folder, f"the evaluation results of {dataset_name}")
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
            return build_lvis_evaluator(dataset_name, cfg.TEST.COCO_EVAL_BACKEND, cfg, True, output_folder)
        return build_coco_evaluator(  # faster-coco-eval by default (TEST.COCO_EVAL_BACKEND)
            dataset_name,
            cfg.TEST.COCO_EVAL_BACKEND,
            tasks=("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
            distributed=True,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )


def _training_classes(cfg):
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", []) if cfg.DATASETS.TRAIN else []
