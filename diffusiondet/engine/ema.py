"""Model EMA (``MODEL_EMA.*``): an exponential moving average of the weights, kept beside training.

The average is a ``torch.optim.swa_utils.AveragedModel`` over parameters and buffers, updated
after every optimizer step that was taken (a skipped non-finite step leaves it as it is):
``ema <- d * ema + (1 - d) * weights``, starting from the weights training starts with. With
``MODEL_EMA.YOLOX`` the decay of the s-th update (s = 1, 2, ...) is ``d * (1 - exp(-s / 2000))``.

Checkpoints hold it in the official format, ``"ema_state"``: the model's parameter and buffer
names (named_parameters, then named_buffers of the unwrapped model) to tensors, beside
``"model"``; ``"ema_num_updates"`` (an int) keeps the update count for ``--resume``. A file
with ``ema_state`` only (the official code's) resumes with the count taken from its iteration.
Evaluation inside training and after it runs on the EMA weights (swapped in, then the raw
weights are put back bit for bit); stand-alone tools load them with :func:`load_ema_weights`
(through ``load_model_weights`` when ``MODEL_EMA.ENABLED``). See docs/training_extras.md.
"""
import contextlib
import logging
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from detectron2.engine import HookBase, hooks

from .checkpoint import CheckpointError, DiffusionDetCheckpointer, check_finite_state
from .stop_signal import StopOnSignal

logger = logging.getLogger(__name__)

# Top-level checkpoint keys: the official one, and ours for the update count.
EMA_STATE_KEY = "ema_state"
EMA_UPDATES_KEY = "ema_num_updates"
# YOLOX warm-up: the decay reaches 63% of MODEL_EMA.DECAY after this many updates.
YOLOX_WARMUP_UPDATES = 2000


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (its names carry no ``module.`` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def named_tensors(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """named_parameters then named_buffers (non-persistent ones too): the official ema_state
    keys, in the order AveragedModel(use_buffers=True) pairs the tensors of two models."""
    model = unwrap(model)
    return list(model.named_parameters()) + list(model.named_buffers())


def get_yolox_ema_multi_avg_fn(decay: float, warmup: int = YOLOX_WARMUP_UPDATES):
    """``multi_avg_fn`` for AveragedModel whose decay warms up: ``decay * (1 - exp(-s / warmup))``
    at update s. AveragedModel passes the number of models averaged so far; the first (the copy
    of the initial weights) is not an update, so that number is s."""

    @torch.no_grad()
    def ema_update(ema_tensors, model_tensors, num_averaged):
        d = decay * (1.0 - math.exp(-float(num_averaged) / warmup))
        if torch.is_floating_point(ema_tensors[0]) or torch.is_complex(ema_tensors[0]):
            torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - d)
        else:  # integer buffers (counters): an average has no meaning, follow the model
            torch._foreach_copy_(ema_tensors, model_tensors)

    return ema_update


class ModelEMA:
    """The EMA of ``model``'s parameters and buffers, on ``device`` ("" = the model's).

    ``state_dict()`` is the official ``ema_state`` ({name: tensor}, aliases of the EMA's
    tensors, like nn.Module.state_dict); ``updates`` is a second checkpointable holding the
    update count (an int)."""

    def __init__(self, model: torch.nn.Module, decay: float, device: str = "", yolox: bool = False):
        model = unwrap(model)
        if not device:
            device = next(model.parameters()).device
        avg = get_yolox_ema_multi_avg_fn(decay) if yolox else get_ema_multi_avg_fn(decay)
        self.averaged = AveragedModel(model, device=torch.device(device), multi_avg_fn=avg, use_buffers=True)
        self.averaged.module.requires_grad_(False)
        self.decay, self.yolox = decay, yolox
        self.updates = _UpdateCount(self)
        # Set by load_state_dict / updates.load_state_dict until start() consumes them.
        self._loaded_state = False
        self._loaded_updates: Optional[int] = None

    @property
    def num_updates(self) -> int:
        """Optimizer steps averaged in (0 before start() and right after it)."""
        return max(int(self.averaged.n_averaged) - 1, 0)

    def start(self, model: torch.nn.Module, iteration: int) -> None:
        """Begin averaging at ``iteration``: from ``model``'s weights, unless a checkpoint's
        ema_state was loaded (then its update count, or ``iteration`` when it had none)."""
        if self._loaded_state:
            updates = self._loaded_updates
            if updates is None:
                logger.info("The checkpoint's ema_state has no %s: counting %d updates (its iteration)",
                            EMA_UPDATES_KEY, iteration)
                updates = iteration
            self.averaged.n_averaged.fill_(updates + 1)
        elif int(self.averaged.n_averaged) == 0:
            if iteration > 0:
                logger.warning("The resumed checkpoint has no %s: the EMA starts from the weights of "
                               "iteration %d", EMA_STATE_KEY, iteration)
            self.averaged.update_parameters(unwrap(model))  # the first "average" is a copy
        self._loaded_state, self._loaded_updates = False, None

    def update(self, model: torch.nn.Module) -> None:
        """Average in ``model``'s current weights (after an optimizer step)."""
        self.averaged.update_parameters(unwrap(model))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in named_tensors(self.averaged.module)}

    def load_state_dict(self, state: Dict[str, torch.Tensor], what: str = "the checkpoint's ema_state") -> None:
        copy_ema_state(self.averaged.module, state, what)
        self._loaded_state = True

    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the EMA's."""
        with torch.no_grad():
            for (_, t), (_, e) in zip(named_tensors(model), named_tensors(self.averaged.module), strict=True):
                t.copy_(e)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[None]:
        """``model`` holds the EMA weights inside the block; its own come back bit for bit."""
        tensors = [t for _, t in named_tensors(model)]
        raw = [t.detach().clone() for t in tensors]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, r in zip(tensors, raw):
                    t.copy_(r)


class _UpdateCount:
    """Checkpointable for ``ema_num_updates``: the count YOLOX's decay and a resumed run need."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def state_dict(self) -> int:
        return self.ema.num_updates

    def load_state_dict(self, count: int) -> None:
        self.ema._loaded_updates = int(count)


def copy_ema_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """Copy an ema_state into ``model``; CheckpointError (naming ``what``) when a parameter or
    persistent buffer is missing, a shape differs, or a value is not finite. Non-persistent
    buffers (constants built from the config) keep the model's values when absent."""
    model = unwrap(model)
    persistent = set(model.state_dict())
    missing = [k for k, _ in named_tensors(model) if k not in state and k in persistent]
    wrong = [(k, tuple(state[k].shape), tuple(t.shape)) for k, t in named_tensors(model)
             if k in state and state[k].shape != t.shape]  # fmt: skip
    if missing or wrong:
        raise CheckpointError(
            f"{what} does not fit the model: {len(missing)} tensors missing ({', '.join(missing[:8])}),"
            f" {len(wrong)} of other shapes (checkpoint vs model: {wrong[:8]})"
        )
    check_finite_state(state, what)
    with torch.no_grad():
        for name, t in named_tensors(model):
            if name in state:
                t.copy_(state[name])


def load_ema_weights(model: torch.nn.Module, path: str, trust_code: bool = False) -> None:
    """Load the EMA weights (``ema_state``) of checkpoint ``path`` into ``model``, with the safe
    loading and checks of :class:`DiffusionDetCheckpointer` (the file's ``model`` is checked,
    then overwritten). CheckpointError naming the file when it has no ema_state."""
    rest = DiffusionDetCheckpointer(unwrap(model), trust_code=trust_code).load(path)
    if EMA_STATE_KEY not in rest:
        raise CheckpointError(
            f"{path} has no {EMA_STATE_KEY} (trained without MODEL_EMA.ENABLED?): it has only raw"
            " weights; set MODEL_EMA.ENABLED False to evaluate them"
        )
    copy_ema_state(model, rest[EMA_STATE_KEY], f"the {EMA_STATE_KEY} of {path}")
    updates = rest.get(EMA_UPDATES_KEY)
    logger.info("Loaded the EMA weights (%s) of %s%s", EMA_STATE_KEY, path,
                f" ({updates} updates)" if updates is not None else "")


class EMAHook(HookBase):
    """Starts the EMA before training (and makes the trainer's EvalHooks evaluate it), updates it
    after every optimizer step taken, and with
    ``apply_at_end`` (MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY False) gives the trainer's model the
    EMA weights when training has completed."""

    def __init__(self, ema: ModelEMA, apply_at_end: bool):
        self.ema = ema
        self.apply_at_end = apply_at_end
        self._skipped_before = 0

    def before_train(self):
        self.ema.start(self.trainer.model, self.trainer.start_iter)
        # Here rather than when the hooks are built: an EvalHook registered later (the TTA
        # evaluation of tools/train_net.py) evaluates the EMA weights too.
        for hook in self.trainer._hooks:
            if isinstance(hook, hooks.EvalHook) and not getattr(hook._func, "evaluates_ema", False):
                # detectron2's EvalHook calls its function (e.g. Trainer.test on trainer.model)
                # through _func.
                hook._func = _evaluating_ema(self.trainer, hook._func, self.ema)

    def before_step(self):
        self._skipped_before = self._skipped()

    def after_step(self):
        # SkipNonFiniteTrainer counts the steps it skipped: such a step changed no weight, and
        # averaging the unchanged weights in would still pull the EMA towards them.
        if self._skipped() == self._skipped_before:
            self.ema.update(self.trainer.model)

    def after_train(self):
        # Only a completed run (as EvalHook's final evaluation): a stopped one keeps raw weights.
        if self.apply_at_end and self.trainer.iter + 1 >= self.trainer.max_iter:
            self.ema.copy_to(self.trainer.model)
            logger.info("Training done: the model now holds the EMA weights (%d updates)", self.ema.num_updates)

    def _skipped(self) -> int:
        return getattr(self.trainer, "nonfinite_steps", 0)  # 0 for AMPTrainer (see Trainer)


def add_model_ema(cfg, model, checkpointer, hook_list: list) -> Optional[ModelEMA]:
    """With MODEL_EMA.ENABLED: build the EMA of the training ``model``, register it with
    ``checkpointer`` (ema_state, ema_num_updates), and insert its hook into ``hook_list`` before
    the checkpointing and evaluation hooks (from then on every EvalHook evaluates the EMA)."""
    if not cfg.MODEL_EMA.ENABLED:
        return None
    ema = ModelEMA(model, cfg.MODEL_EMA.DECAY, cfg.MODEL_EMA.DEVICE, cfg.MODEL_EMA.YOLOX)
    checkpointer.add_checkpointable(EMA_STATE_KEY, ema)
    checkpointer.add_checkpointable(EMA_UPDATES_KEY, ema.updates)
    # Before the hooks that save (PeriodicCheckpointer, StopOnSignal) or evaluate after a step:
    # they must see the EMA that includes that step.
    late = (hooks.PeriodicCheckpointer, StopOnSignal, hooks.EvalHook, hooks.PeriodicWriter)
    at = next((i for i, h in enumerate(hook_list) if isinstance(h, late)), len(hook_list))
    hook_list.insert(at, EMAHook(ema, apply_at_end=not cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY))
    return ema


def _evaluating_ema(trainer, func, ema: ModelEMA):
    def evaluate():
        logger.info("Evaluating the EMA weights (%d updates)", ema.num_updates)
        with ema.swapped_into(trainer.model):
            return func()

    evaluate.evaluates_ema = True

    return evaluate
