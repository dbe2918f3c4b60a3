"""The speed options of a model, read from the config once and applied in one place."""
from dataclasses import dataclass
from typing import Optional

from .frozen_bn_folding import fold_frozen_batchnorm_at_inference

__all__ = ["SpeedOptions", "accelerate", "accelerate_head", "set_head_speed_options"]


@dataclass(frozen=True)
class SpeedOptions:
    """Options that trade speed or memory only: detections do not depend on them beyond float
    rounding. The defaults change nothing: a model assembled by hand runs its parts as given.

    Attributes:
        dynamic_chunk_size: proposals per DynamicConv chunk; 0 = automatic (see
            :func:`~.chunk_budget.proposals_per_chunk`), a value >= B·N gives the official
            unchunked layer; None = as the head was built.
        dynamic_memory_budget_mb: off-CPU automatic chunks' MiB of generated parameters
            (0 = unchunked); None = as the head was built.
        pooler_threads: threads of CPU RoI pooling; 0 = ``torch.get_num_threads()``, 1 =
            detectron2's serial pooler; None = as the head was built.
        fixed_shape_pooling: CPU inference pools with the fixed-shape pooler (the graph sampler
            always does).
        fold_frozen_bn: inference folds every frozen BatchNorm of the backbone into its
            convolution, channels-last (:mod:`.frozen_bn_folding`).
        compile_head: ``torch.compile`` each head stage in place (state-dict keys unchanged).
    """

    dynamic_chunk_size: Optional[int] = None
    dynamic_memory_budget_mb: Optional[int] = None
    pooler_threads: Optional[int] = None
    fixed_shape_pooling: bool = False
    fold_frozen_bn: bool = False
    compile_head: bool = False

    @classmethod
    def from_config(cls, cfg) -> "SpeedOptions":
        d = cfg.MODEL.DiffusionDet
        return cls(
            dynamic_chunk_size=d.DYNAMIC_CHUNK_SIZE,
            dynamic_memory_budget_mb=d.DYNAMIC_MEMORY_BUDGET_MB,
            pooler_threads=d.POOLER_THREADS,
            fixed_shape_pooling=d.FIXED_SHAPE_POOLING,
            fold_frozen_bn=d.FOLD_FROZEN_BN,
            compile_head=d.COMPILE_HEAD,
        )


def set_head_speed_options(
    head,
    *,
    dynamic_chunk_size: Optional[int] = None,
    pooler_threads: Optional[int] = None,
    dynamic_memory_budget_mb: Optional[int] = None,
) -> None:
    """Set the head's options that trade speed or memory only, in every stage; None leaves one
    unchanged. Values as in :class:`SpeedOptions`."""
    if (dynamic_chunk_size or 0) < 0 or (pooler_threads or 0) < 0:
        raise ValueError(
            f"dynamic_chunk_size and pooler_threads must be >= 0, got {dynamic_chunk_size}"
            f" and {pooler_threads}"
        )
    budget = dynamic_memory_budget_mb
    if budget is not None and budget < 0:
        raise ValueError(f"dynamic_memory_budget_mb must be >= 0, got {budget}")
    # Only what is given is touched: a hand-assembled model may hold a head of its own.
    for stage in head.head_series if dynamic_chunk_size is not None or budget is not None else ():
        if dynamic_chunk_size is not None:
            stage.inst_interact.chunk_size = dynamic_chunk_size
        if budget is not None:
            stage.inst_interact.memory_budget_bytes = int(budget * (1 << 20))
    if pooler_threads is not None:
        head.box_pooler.num_threads = pooler_threads


def accelerate_head(head, options: SpeedOptions) -> None:
    """The head's share of :func:`accelerate`, for a head built on its own."""
    set_head_speed_options(
        head,
        dynamic_chunk_size=options.dynamic_chunk_size,
        pooler_threads=options.pooler_threads,
        dynamic_memory_budget_mb=options.dynamic_memory_budget_mb,
    )


def accelerate(model, options: SpeedOptions) -> None:
    """Apply ``options`` to a newly built DiffusionDet-style ``model`` (backbone + head), in place.

    Parameters and state-dict keys never change, so checkpoints load before or after.
    """
    accelerate_head(model.head, options)
    model.fixed_shape_pooling = options.fixed_shape_pooling
    if options.fold_frozen_bn:
        fold_frozen_batchnorm_at_inference(model.backbone)
    if options.compile_head:
        # Per stage: the pooler between stages has data-dependent shapes (level split).
        for stage in model.head.head_series:
            stage.compile(dynamic=True)
