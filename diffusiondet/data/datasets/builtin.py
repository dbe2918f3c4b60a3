"""Built-in datasets of the project: the embedded synthetic crowded-shapes set, and CrowdHuman.

``register_all_builtin`` runs once at import of ``diffusiondet.data.datasets`` with the root from
``$DETECTRON2_DATASETS`` (default ``datasets``), as detectron2 does for its own built-ins. The data
is generated lazily under ``<root>/synthetic_crowd`` on first load, or eagerly with
:func:`ensure_synthetic_crowd` (call it before starting several processes, and before building a
COCOEvaluator, which reads the json when it is constructed).
"""
import os
from typing import Dict, Mapping, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..synthetic import SYNTHETIC_CROWD_CLASSES, generate_synthetic_crowd
from .crowdhuman import register_crowdhuman

__all__ = [
    "SYNTHETIC_CROWD_SEED",
    "SYNTHETIC_CROWD_SPLITS",
    "datasets_root",
    "ensure_synthetic_crowd",
    "register_all_builtin",
    "register_synthetic_crowd",
]

SYNTHETIC_CROWD_SEED = 20221118
# dataset name -> (split, number of images). 600 images of 160x160 keep a CPU epoch short while
# giving ~8.5k training instances; generating both splits takes ~13-16 s on 2 cores.
SYNTHETIC_CROWD_SPLITS: Dict[str, Tuple[str, int]] = {
    "synthetic_crowd_train": ("train", 600),
    "synthetic_crowd_val": ("val", 100),
}

_builtin_registered = False


def _synthetic_dir(root: str) -> str:
    return os.path.join(root, "synthetic_crowd")


def _split_paths(root: str, split: str) -> Tuple[str, str]:
    """(json_file, image_root) of a split; generate_synthetic_crowd writes exactly these."""
    out = _synthetic_dir(root)
    return os.path.join(out, "annotations", f"{split}.json"), os.path.join(out, split)


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS``, or ``datasets`` (relative to the working directory)."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def ensure_synthetic_crowd(
    root: Optional[str] = None, splits: Optional[Mapping[str, Tuple[str, int]]] = None
) -> Dict[str, Dict[str, str]]:
    """Generate (or reuse) every synthetic split now.

    Args:
        root: datasets root, default :func:`datasets_root` (the root the built-in names were
            registered with); data goes to ``<root>/synthetic_crowd``.
        splits: dataset name -> (split, num_images); defaults to :data:`SYNTHETIC_CROWD_SPLITS`.

    Returns:
        dataset name -> {"json_file": ..., "image_root": ...}.
    """
    root = root or datasets_root()
    paths = {}
    for name, (split, num_images) in (splits or SYNTHETIC_CROWD_SPLITS).items():
        json_file = generate_synthetic_crowd(
            _synthetic_dir(root), split=split, num_images=num_images, seed=SYNTHETIC_CROWD_SEED
        )
        paths[name] = {"json_file": json_file, "image_root": _split_paths(root, split)[1]}
    return paths


def register_synthetic_crowd(
    root: str, splits: Optional[Mapping[str, Tuple[str, int]]] = None
) -> None:
    """Register the synthetic splits; loading one generates it first if needed.

    Args:
        root: datasets root; see :func:`ensure_synthetic_crowd`.
        splits: dataset name -> (split, num_images); defaults to :data:`SYNTHETIC_CROWD_SPLITS`.

    Metadata: ``thing_classes`` (:data:`SYNTHETIC_CROWD_CLASSES`), ``evaluator_type`` "coco",
    ``json_file`` and ``image_root``. Re-registering a name with the same root is a no-op; with
    another root it raises ``ValueError``.
    """
    for name, (split, num_images) in (splits or SYNTHETIC_CROWD_SPLITS).items():
        json_file, image_root = _split_paths(root, split)
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file")
            if registered is not None and os.path.abspath(registered) == os.path.abspath(json_file):
                continue
            raise ValueError(f"Dataset '{name}' is already registered with json {registered!r}")

        def load(name=name, split=split, num_images=num_images):
            path = generate_synthetic_crowd(
                _synthetic_dir(root), split=split, num_images=num_images, seed=SYNTHETIC_CROWD_SEED
            )
            return load_coco_json(path, _split_paths(root, split)[1], dataset_name=name, extra_annotation_keys=["id"])

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=list(SYNTHETIC_CROWD_CLASSES),
            evaluator_type="coco",
            json_file=json_file,
            image_root=image_root,
        )


def register_all_builtin(root: Optional[str] = None) -> None:
    """Register all built-in datasets once per process (later calls are no-ops).

    Args:
        root: datasets root; defaults to :func:`datasets_root`.
    """
    global _builtin_registered
    if _builtin_registered:
        return
    register_synthetic_crowd(root or datasets_root())
    register_crowdhuman(root or datasets_root())
    _builtin_registered = True
