"""Training augmentation of DiffusionDet: flip + multi-scale resize, optionally a DETR-style crop.

With cropping enabled each image takes, with probability ``crop_prob`` (0.5 in DiffusionDet),
the branch [flip, resize to a pre-crop scale, random crop, multi-scale resize] instead of the base
[flip, multi-scale resize]. Every step is a detectron2 augmentation, so the returned transforms
also apply to boxes (abs xyxy) and polygons.
"""
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "DEFAULT_PRE_CROP_MAX_SIZE",
    "DEFAULT_PRE_CROP_MIN_SIZES",
    "RandomChoiceOfAugmentations",
    "build_diffusiondet_train_augmentation",
    "diffusiondet_train_augmentation",
]

# Shortest-edge sizes applied before cropping in the crop branch (DETR / DiffusionDet COCO values).
DEFAULT_PRE_CROP_MIN_SIZES = (400, 500, 600)
# Cap on the longest edge of that resize. The official code has none (an image of aspect 3000:1
# becomes 600 x 1.8M pixels before the crop); 4000 leaves every image of aspect up to 6.67 at the
# 600 scale (every COCO image) as the official code resizes it.
DEFAULT_PRE_CROP_MAX_SIZE = 4000


class RandomChoiceOfAugmentations(T.Augmentation):
    """Apply one of several augmentation sequences, chosen at random for each image."""

    def __init__(
        self,
        choices: Sequence[Sequence[T.Augmentation]],
        probs: Optional[Sequence[float]] = None,
    ):
        """
        Args:
            choices: candidate sequences; each is applied in order, like ``T.AugmentationList``.
            probs: probability of each sequence (uniform if None); must sum to 1.
        """
        super().__init__()
        self.choices = [T.AugmentationList(list(c)) for c in choices]
        if probs is None:
            probs = [1.0 / len(self.choices)] * len(self.choices)
        self.probs = np.asarray(probs, dtype=np.float64)
        if len(self.probs) != len(self.choices) or not np.isclose(self.probs.sum(), 1.0):
            raise ValueError(f"probs {list(probs)} must have one entry per choice and sum to 1")

    def __call__(self, aug_input) -> T.Transform:
        """Applies the chosen sequence to ``aug_input`` in place and returns its transforms."""
        # np.random, like detectron2's own augmentations, so per-worker seeding covers it.
        index = np.random.choice(len(self.choices), p=self.probs)
        return self.choices[index](aug_input)

    def __repr__(self):
        branches = ", ".join(f"p={p:g}: {c}" for p, c in zip(self.probs, self.choices))
        return f"RandomChoiceOfAugmentations({branches})"


def _flip(random_flip: str) -> List[T.Augmentation]:
    if random_flip == "none":
        return []
    if random_flip not in ("horizontal", "vertical"):
        raise ValueError(f"random_flip must be horizontal, vertical or none, got '{random_flip}'")
    horizontal = random_flip == "horizontal"
    return [T.RandomFlip(horizontal=horizontal, vertical=not horizontal)]


def diffusiondet_train_augmentation(
    *,
    min_size_train: Sequence[int],
    max_size_train: int,
    min_size_train_sampling: str = "choice",
    random_flip: str = "horizontal",
    crop_enabled: bool = False,
    crop_type: str = "absolute_range",
    crop_size: Sequence[int] = (384, 600),
    pre_crop_min_sizes: Sequence[int] = DEFAULT_PRE_CROP_MIN_SIZES,
    pre_crop_max_size: int = DEFAULT_PRE_CROP_MAX_SIZE,
    crop_prob: float = 0.5,
) -> List[T.Augmentation]:
    """Build the training augmentation list (the official implementation's dataset mapper: flip,
    multi-scale resize, and DETR's crop branch) from plain values.

    Args:
        min_size_train: shortest-edge sizes (pixels) of the final multi-scale resize.
        max_size_train: cap on the longest edge after resizing (pixels).
        min_size_train_sampling: "choice" (pick one of ``min_size_train``) or "range".
        random_flip: "horizontal", "vertical" or "none"; flips with probability 0.5.
        crop_enabled: add the DETR-style crop branch.
        crop_type, crop_size: arguments of ``T.RandomCrop`` (e.g. "absolute_range", (384, 600):
            crop height and width each drawn from [384, min(600, image side)]).
        pre_crop_min_sizes: shortest-edge sizes to choose from before cropping.
        pre_crop_max_size: cap on the longest edge after that resize (pixels).
        crop_prob: probability of taking the crop branch instead of the base one.

    Returns:
        A list of augmentations for ``T.AugmentationList`` / a dataset mapper.
    """
    final_resize = T.ResizeShortestEdge(
        min_size_train, max_size_train, sample_style=min_size_train_sampling
    )
    base = _flip(random_flip) + [final_resize]
    if not crop_enabled:
        return base
    crop_branch = _flip(random_flip) + [
        T.ResizeShortestEdge(list(pre_crop_min_sizes), pre_crop_max_size, sample_style="choice"),
        T.RandomCrop(crop_type, list(crop_size)),
        final_resize,
    ]
    return [RandomChoiceOfAugmentations([base, crop_branch], probs=[1.0 - crop_prob, crop_prob])]


def build_diffusiondet_train_augmentation(cfg) -> List[T.Augmentation]:
    """Training augmentations from a detectron2 config.

    Reads INPUT.{MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING, RANDOM_FLIP} and
    INPUT.CROP.{ENABLED, TYPE, SIZE}, plus INPUT.CROP.PRE_CROP_MIN_SIZES and PRE_CROP_MAX_SIZE when
    present (defaults :data:`DEFAULT_PRE_CROP_MIN_SIZES`, :data:`DEFAULT_PRE_CROP_MAX_SIZE`), so
    small-image configs can scale the crop branch.
    """
    return diffusiondet_train_augmentation(
        min_size_train=cfg.INPUT.MIN_SIZE_TRAIN,
        max_size_train=cfg.INPUT.MAX_SIZE_TRAIN,
        min_size_train_sampling=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        random_flip=cfg.INPUT.RANDOM_FLIP,
        crop_enabled=cfg.INPUT.CROP.ENABLED,
        crop_type=cfg.INPUT.CROP.TYPE,
        crop_size=cfg.INPUT.CROP.SIZE,
        pre_crop_min_sizes=cfg.INPUT.CROP.get("PRE_CROP_MIN_SIZES", DEFAULT_PRE_CROP_MIN_SIZES),
        pre_crop_max_size=cfg.INPUT.CROP.get("PRE_CROP_MAX_SIZE", DEFAULT_PRE_CROP_MAX_SIZE),
    )
