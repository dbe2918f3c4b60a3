"""How the head pools its RoIs: detectron2's ``ROIPooler`` maths, run by a faster implementation.

Two implementations give the official pooler's results:
* :class:`ThreadedROIPooler` (``box_pooler``): detectron2's pooler with torchvision's
  single-threaded RoIAlign split over threads on CPU, bit-identical;
* :class:`FixedShapeROIPooler` (``fixed_shape_pooler``, built on first use): static shapes and
  no host syncs, which a fullgraph compile or a CUDA graph needs, and faster at CPU inference;
  equal up to float rounding.

Shape legend: B images, N boxes per image, D channels, R pooled side. Boxes are abs xyxy.
"""
import contextlib
import functools
from typing import Callable, List, Sequence, Tuple, Union

import torch
from detectron2.structures import Boxes

from .fixed_shape_pooler import FixedShapeROIPooler, PackedFeatures
from .threaded_pooler import ThreadedROIPooler

__all__ = ["AcceleratedRoIPooling", "pooling_for_sampling", "pools_with_fixed_shapes"]

PoolFn = Callable[[torch.Tensor], torch.Tensor]


class AcceleratedRoIPooling:
    """Mixin of :class:`~diffusiondet.modeling.head.DynamicHead`: its RoI pooling.

    A mixin, so that both poolers are the head's own submodules (``box_pooler``, the official
    name, and ``fixed_shape_pooler``); both are stateless, so checkpoints are unaffected.
    """

    def init_roi_pooling(
        self, *, output_size: int, scales: Sequence[float], sampling_ratio: int, pooler_type: str
    ) -> None:
        """Create the pooler; called from the head's ``__init__`` (after ``nn.Module.__init__``).
        Arguments as detectron2's :class:`ROIPooler`'s (``scales``: 1/stride of each level,
        finest first)."""
        self.box_pooler = ThreadedROIPooler(
            output_size=output_size,
            scales=tuple(scales),
            sampling_ratio=sampling_ratio,
            pooler_type=pooler_type,
        )
        # What use_fixed_shape_pooling needs to build the other pooler lazily.
        self._fixed_shape_args = dict(
            scales=tuple(scales), sampling_ratio=sampling_ratio, pooler_type=pooler_type
        )
        self.fixed_shape_pooler = None
        self.fixed_shape_pooling = False

    def use_fixed_shape_pooling(self, enabled: bool) -> None:
        """Pool with :class:`FixedShapeROIPooler` (no data-dependent shapes, no host syncs; what
        a fullgraph compile or a CUDA graph needs) instead of detectron2's pooler. Equal within
        float rounding; the pooler is stateless, so checkpoints are unaffected. Built once, so a
        compiled step keeps seeing the same module."""
        if enabled and self.fixed_shape_pooler is None:
            self.fixed_shape_pooler = FixedShapeROIPooler(
                output_size=self.box_pooler.output_size, **self._fixed_shape_args
            )
        self.fixed_shape_pooling = enabled

    def prepare_features(self, features: List[torch.Tensor]):
        """What to give the head's ``forward`` for many calls on the same features: with
        fixed-shape pooling the packed levels (packing is then done once, not once per call),
        else ``features`` itself."""
        return self.fixed_shape_pooler.pack(features) if self.fixed_shape_pooling else features

    def pool(self, features: List[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """RoI-pool ``boxes`` (B, N, 4) abs xyxy from ``features`` (L × (B, D, H_l, W_l)) with
        detectron2's pooler.

        Returns:
            (B·N, D, R, R) in image-major order.
        """
        return self.box_pooler(features, [Boxes(image_boxes) for image_boxes in boxes])

    def roi_pooling(
        self, features: Union[List[torch.Tensor], PackedFeatures]
    ) -> Tuple[PoolFn, torch.dtype]:
        """The pooling of one forward call, for all its stages.

        Args:
            features: L feature maps (B, D, H_l, W_l), or their :meth:`prepare_features`.

        Returns:
            ``pool``: boxes (B, N, 4) -> (B·N, D, R, R) image-major; and the features' dtype.
        """
        dtype = (features.table if isinstance(features, PackedFeatures) else features[0]).dtype
        if self.fixed_shape_pooling:
            # Packed once per call (not per stage), or once per image by prepare_features.
            packed = features if isinstance(features, PackedFeatures) else self.fixed_shape_pooler.pack(features)
            return functools.partial(self.fixed_shape_pooler, packed), dtype
        if isinstance(features, PackedFeatures):
            raise ValueError("packed features need use_fixed_shape_pooling(True)")
        return functools.partial(self.pool, features), dtype


def pools_with_fixed_shapes(model) -> bool:
    """Whether ``model``'s sampling pools with the head's fixed-shape pooler: the graph sampler
    needs it, and CPU inference is faster with it (``model.fixed_shape_pooling``, the config's
    FIXED_SHAPE_POOLING); training never does."""
    cpu_fixed = model.fixed_shape_pooling and model.device.type == "cpu"
    return model.sampler.fixed_shape_pooling or cpu_fixed


@contextlib.contextmanager
def pooling_for_sampling(model, features: List[torch.Tensor]):
    """Within the block, ``model.head`` pools as :func:`pools_with_fixed_shapes` says; after it,
    with detectron2's pooler again.

    Yields:
        what to give the head for all the model calls of the block: the packed features (packed
        once) or ``features`` itself.
    """
    model.head.use_fixed_shape_pooling(pools_with_fixed_shapes(model))
    try:
        yield model.head.prepare_features(features)
    finally:
        model.head.use_fixed_shape_pooling(False)
