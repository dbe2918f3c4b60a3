"""Register the generated folders of ``DATASETS.GENERATED.DIRS`` and train on them with the real
sets (DiffusionEngine, arXiv 2309.03893, "Data scaling-up": the detector is trained on the real
set plus COCO-DE / VOC-DE).

This is DiffusionEngine's config ``prepare`` step (``diffusiondet.config_extensions``): it runs
after the config is validated and after the core registered its own datasets (``DATASETS.CUSTOM``),
and imports neither diffusers nor transformers.
"""
import json
import logging
import os
import zlib
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.datasets.coco_json import validate_coco_json

from .coco_writer import ANNOTATIONS_FILE, IMAGES_DIR

__all__ = ["generated_dataset_name", "register_generated_sets", "thing_classes_of"]

logger = logging.getLogger(__name__)

# Samplers that weight datasets by DATASETS.TRAIN_REPEAT_FACTOR (detectron2's build.py).
_WEIGHTED_SAMPLERS = ("WeightedTrainingSampler", "WeightedCategoryTrainingSampler")


def generated_dataset_name(index: int, folder: str) -> str:
    """``generated_<index>_<folder's base name>_<CRC32 of its absolute path>``: stable across
    runs for the same DIRS list, and two folders of the same base name (two runs' ``generated/``)
    can be trained on in one process."""
    path = os.path.abspath(os.path.normpath(folder))
    return f"generated_{index}_{os.path.basename(path)}_{zlib.crc32(path.encode()):08x}"


def thing_classes_of(dataset_name: str) -> List[str]:
    """Class names of a registered dataset, in contiguous-id order.

    A COCO json registered lazily has no ``thing_classes`` until it is loaded: they are then read
    from its ``json_file`` (categories by increasing id, as ``load_coco_json`` orders them), or,
    without one, the dataset is loaded once to fill its metadata.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(f"dataset '{dataset_name}' (DATASETS.TRAIN) is not registered")
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("thing_classes")
    if classes is None and meta.get("json_file") and os.path.isfile(meta.json_file):
        with open(meta.json_file) as f:
            categories = json.load(f).get("categories") or []
        classes = [c["name"] for c in sorted(categories, key=lambda c: c["id"])] or None
    if classes is None:
        DatasetCatalog.get(dataset_name)  # loading sets thing_classes for COCO-style loaders
        classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    if not classes:
        raise ValueError(f"dataset '{dataset_name}' has no thing_classes in its metadata")
    return list(classes)


def _check_layout(folder: str):
    json_file = os.path.join(folder, ANNOTATIONS_FILE)
    image_root = os.path.join(folder, IMAGES_DIR)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"DATASETS.GENERATED.DIRS: folder not found: '{folder}'")
    missing = [p for p in (json_file, image_root) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"DATASETS.GENERATED.DIRS: '{folder}' is not a generated dataset (tools/generate_dataset.py"
            f" writes {ANNOTATIONS_FILE} and {IMAGES_DIR}/): missing {missing}"
        )
    return json_file, image_root


def register_generated_sets(cfg) -> List[str]:
    """Register every folder of ``DATASETS.GENERATED.DIRS`` and train on it next to the real sets.

    For folder i: check its layout, register it as :func:`generated_dataset_name` (a COCO json
    dataset, evaluator "coco"), check that its categories are those of the first real training
    set (``DATASETS.TRAIN[0]``, same names in the same order), and append it to
    ``DATASETS.TRAIN``. With ``DATASETS.GENERATED.REPEAT_FACTOR`` != 1 the generated sets get
    that factor in ``DATASETS.TRAIN_REPEAT_FACTOR`` and ``DATALOADER.SAMPLER_TRAIN`` becomes
    detectron2's "WeightedTrainingSampler" (a weighted sampler already chosen stays).

    Calling it again with the same config changes nothing. Returns the generated dataset names.

    Raises:
        FileNotFoundError: a folder, its json or its image folder is missing (the folder named).
        ValueError: categories differ from the real set's (both lists named), a bad repeat
            factor, or a sampler that ignores dataset repeat factors.
    """
    dirs = list(cfg.DATASETS.GENERATED.DIRS)
    if not dirs:
        return []
    factor = cfg.DATASETS.GENERATED.REPEAT_FACTOR
    if not factor > 0:
        raise ValueError(f"DATASETS.GENERATED.REPEAT_FACTOR must be > 0, got {factor}")
    names = [generated_dataset_name(i, folder) for i, folder in enumerate(dirs)]
    real = [n for n in cfg.DATASETS.TRAIN if n not in names]
    if not real:
        raise ValueError(
            "DATASETS.GENERATED.DIRS needs a real training set in DATASETS.TRAIN (whose categories"
            f" the generated sets share); DATASETS.TRAIN is {tuple(cfg.DATASETS.TRAIN)}"
        )
    real_classes = thing_classes_of(real[0])
    allow_outside = cfg.DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT
    for name, folder in zip(names, dirs):
        json_file, image_root = _check_layout(folder)
        validate_coco_json(json_file, image_root, allow_outside)
        with open(json_file) as f:
            categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
        classes = [c["name"] for c in categories]
        if classes != real_classes:
            raise ValueError(
                f"generated dataset '{folder}' ({json_file}) has categories {classes}, but the real"
                f" training set '{real[0]}' has {real_classes}: generate it with that set as reference"
            )
        register_coco_json(
            name, json_file, image_root, metadata={"thing_classes": classes}, allow_outside_root=allow_outside
        )
    train = list(cfg.DATASETS.TRAIN) + [n for n in names if n not in cfg.DATASETS.TRAIN]
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.DATASETS.TRAIN = tuple(train)
    if factor != 1:
        sampler = cfg.DATALOADER.SAMPLER_TRAIN
        if sampler not in _WEIGHTED_SAMPLERS and sampler != "TrainingSampler":
            raise ValueError(
                f"DATASETS.GENERATED.REPEAT_FACTOR {factor} needs DATALOADER.SAMPLER_TRAIN"
                f" 'WeightedTrainingSampler' (or TrainingSampler, replaced by it); got {sampler!r},"
                " which ignores dataset repeat factors"
            )
        if sampler == "TrainingSampler":
            cfg.DATALOADER.SAMPLER_TRAIN = "WeightedTrainingSampler"
        pairs = [tuple(p) for p in cfg.DATASETS.TRAIN_REPEAT_FACTOR if p[0] not in names]
        cfg.DATASETS.TRAIN_REPEAT_FACTOR = tuple(pairs + [(n, float(factor)) for n in names])
    if was_frozen:
        cfg.freeze()
    logger.info("Training on %s (generated: %s, repeat factor %s)", train, names, factor)
    return names
