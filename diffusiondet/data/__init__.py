"""Data: the synthetic crowded dataset, dataset registration, augmentation and the train mapper."""
from . import datasets  # noqa: F401  registers the built-in datasets (synthetic_crowd_*)
from .augmentation import (
    RandomChoiceOfAugmentations,
    build_diffusiondet_train_augmentation,
    diffusiondet_train_augmentation,
)
from .dataset_mapper import DiffusionDetDatasetMapper, ImageLoadError
from .synthetic import SYNTHETIC_CROWD_CLASSES, generate_synthetic_crowd

__all__ = [
    "DiffusionDetDatasetMapper",
    "ImageLoadError",
    "RandomChoiceOfAugmentations",
    "SYNTHETIC_CROWD_CLASSES",
    "build_diffusiondet_train_augmentation",
    "diffusiondet_train_augmentation",
    "generate_synthetic_crowd",
]
