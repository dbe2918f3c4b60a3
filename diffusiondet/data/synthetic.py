"""Embedded synthetic crowded-scene dataset: coloured shapes that overlap and occlude each other.

It is the project's default dataset: small enough to train a DiffusionDet on CPU in minutes, and
crowded enough (clusters of same-class objects, partial occlusion) to exercise what DiffusionDet is
for. Every image is a pure function of (seed, split, image index), so the set is reproducible
byte for byte.

Layout written by :func:`generate_synthetic_crowd`::

    <output_dir>/<split>/000001.png ...          RGB images
    <output_dir>/annotations/<split>.json        COCO instances json (bbox, area, polygons)

Shape legend: H, W image height/width in pixels; M annotations of one image.

Annotation conventions: ``bbox`` is the abs xywh box of the VISIBLE (non-occluded) pixels, ``area``
is the visible pixel count, ``segmentation`` holds polygons in abs pixel coordinates traced around
the visible pixels, category ids are 1..K in the order of :data:`SYNTHETIC_CROWD_CLASSES`.
"""
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ..utils.progress import progress_bar

__all__ = ["SYNTHETIC_CROWD_CLASSES", "dataset_statistics", "generate_synthetic_crowd"]

logger = logging.getLogger(__name__)

# (name, shape, RGB colour): one fixed shape and colour per class keeps the task learnable.
_CLASS_SPECS = (
    ("red_circle", "circle", (220, 40, 40)),
    ("green_square", "square", (40, 190, 60)),
    ("blue_triangle", "triangle", (50, 80, 235)),
    ("yellow_diamond", "diamond", (235, 210, 40)),
    ("magenta_cross", "cross", (215, 50, 215)),
)
SYNTHETIC_CROWD_CLASSES: Tuple[str, ...] = tuple(name for name, _, _ in _CLASS_SPECS)

# Bump whenever the rendering changes, so stale data on disk is regenerated.
_GENERATOR_VERSION = 1


def generate_synthetic_crowd(
    output_dir: str,
    *,
    split: str,
    num_images: int,
    seed: int,
    image_size: Tuple[int, int] = (160, 160),
    min_objects: int = 8,
    max_objects: int = 40,
    min_object_size: int = 10,
    max_object_size: int = 48,
    cluster_prob: float = 0.6,
    min_visible_fraction: float = 0.4,
    min_visible_pixels: int = 30,
) -> str:
    """Generate (or reuse) one split of the synthetic crowded dataset.

    Args:
        output_dir: dataset root; images go to ``<output_dir>/<split>/`` and the json to
            ``<output_dir>/annotations/<split>.json``.
        split: split name; it also selects an independent random stream.
        num_images: number of images. Image ``i`` does not depend on ``num_images``, so a small
            set is a prefix of a large one with the same seed.
        seed: base seed.
        image_size: (h, w) in pixels.
        min_objects, max_objects: range of objects drawn per image (before occlusion filtering).
        min_object_size, max_object_size: range of an object's extent in pixels.
        cluster_prob: probability that an object is placed next to an earlier one (mostly of the
            same class), which is what makes the scenes crowded.
        min_visible_fraction, min_visible_pixels: an instance is kept only if its visible area is
            at least this fraction of its full (in-image) area and at least this many pixels.

    Returns:
        Path of the COCO json. An existing set is reused only if its recorded generator
        parameters equal these; otherwise it is regenerated. Generation happens under a file lock
        in a temporary folder and is published by renames, with the json written last, so
        concurrent callers (e.g. DDP processes) never read a half-written set.
    """
    if not 0 < min_objects <= max_objects:
        raise ValueError(f"Need 0 < min_objects <= max_objects, got {min_objects}, {max_objects}")
    params = {
        "name": "diffusiondet.synthetic_crowd",
        "version": _GENERATOR_VERSION,
        "split": split,
        "num_images": int(num_images),
        "seed": int(seed),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
        "min_object_size": int(min_object_size),
        "max_object_size": int(max_object_size),
        "cluster_prob": float(cluster_prob),
        "min_visible_fraction": float(min_visible_fraction),
        "min_visible_pixels": int(min_visible_pixels),
    }
    json_path = os.path.join(output_dir, "annotations", f"{split}.json")
    image_dir = os.path.join(output_dir, split)
    if _is_complete(json_path, image_dir, params):
        return json_path

    os.makedirs(output_dir, exist_ok=True)
    with _exclusive_lock(os.path.join(output_dir, f".{split}.lock")):
        if _is_complete(json_path, image_dir, params):  # another process finished meanwhile
            return json_path
        logger.info("Generating split '%s' (%d images) in %s", split, num_images, output_dir)
        tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=output_dir)
        try:
            tmp_images = os.path.join(tmp_dir, split)
            os.makedirs(tmp_images)
            coco = _render_split(tmp_images, params)
            tmp_json = os.path.join(tmp_dir, f"{split}.json")
            with open(tmp_json, "w") as f:
                json.dump(coco, f, sort_keys=True, separators=(",", ":"))
            # The json marks a set as complete: remove it first and publish it last.
            if os.path.exists(json_path):
                os.remove(json_path)
            if os.path.exists(image_dir):
                os.rename(image_dir, os.path.join(tmp_dir, "stale"))
            os.rename(tmp_images, image_dir)
            os.makedirs(os.path.dirname(json_path), exist_ok=True)
            os.replace(tmp_json, json_path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return json_path


@contextlib.contextmanager
def _exclusive_lock(lock_path: str):
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_complete(json_path: str, image_dir: str, params: dict) -> bool:
    if not os.path.isfile(json_path):
        return False
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (OSError, ValueError):
        return False
    if coco.get("info", {}).get("generator") != params:
        return False
    return all(os.path.isfile(os.path.join(image_dir, im["file_name"])) for im in coco["images"])


def _render_split(image_dir: str, params: dict) -> dict:
    """Render all images of a split into ``image_dir`` and return the COCO dict."""
    split_key = zlib.crc32(params["split"].encode("utf-8"))  # stable, unlike hash()
    image_seeds = np.random.SeedSequence([params["seed"], split_key]).spawn(params["num_images"])
    images, annotations = [], []
    # A bar with an ETA on a terminal (diffusiondet.utils.progress): the 700 images take ~15 s.
    bar = progress_bar(image_seeds, desc=f"synthetic {params['split']}", unit="img")
    for index, image_seed in enumerate(bar):
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        image, instances = _render_image(np.random.default_rng(image_seed), params)
        cv2.imwrite(os.path.join(image_dir, file_name), image[:, :, ::-1])  # RGB -> BGR for cv2
        h, w = params["image_size"]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for inst in instances:
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": image_id, "iscrowd": 0, **inst})
    categories = [
        {"id": k + 1, "name": name, "supercategory": "shape"}
        for k, name in enumerate(SYNTHETIC_CROWD_CLASSES)
    ]
    return {
        "info": {"description": "DiffusionDet synthetic crowded shapes", "generator": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _render_image(rng: np.random.Generator, params: dict) -> Tuple[np.ndarray, List[dict]]:
    """Returns an (H, W, 3) uint8 RGB image and its instance annotations (COCO fields)."""
    h, w = params["image_size"]
    image = _textured_background(rng, h, w)
    label_map = np.full((h, w), -1, dtype=np.int32)  # index of the top-most object per pixel
    objects = _sample_layout(rng, params)
    full_areas = []
    for index, (class_idx, cx, cy, size, aspect) in enumerate(objects):
        mask = _shape_mask(_CLASS_SPECS[class_idx][1], (h, w), cx, cy, size, aspect)
        full_areas.append(int(mask.sum()))
        # Painting in order makes later objects occlude earlier ones; the dark rim keeps touching
        # same-class objects separable.
        interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        jitter = rng.integers(-25, 26, size=3)
        colour = np.clip(np.array(_CLASS_SPECS[class_idx][2]) + jitter, 0, 255)
        image[mask] = (colour * 0.55).astype(np.uint8)
        image[interior] = colour.astype(np.uint8)
        label_map[mask] = index
    noise = rng.normal(0.0, 5.0, size=image.shape)
    image = np.clip(image.astype(np.float64) + noise, 0, 255).astype(np.uint8)

    visible_areas = np.bincount(label_map[label_map >= 0], minlength=len(objects))
    instances = []
    for index, (class_idx, *_unused) in enumerate(objects):
        visible = int(visible_areas[index])
        fraction = params["min_visible_fraction"]
        if visible < max(params["min_visible_pixels"], fraction * full_areas[index]):
            continue
        visible_mask = label_map == index
        polygons = _mask_to_polygons(visible_mask)
        if not polygons:
            continue
        ys, xs = np.nonzero(visible_mask)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        instances.append(
            {"category_id": class_idx + 1, "bbox": bbox, "area": visible, "segmentation": polygons}
        )
    return image, instances


def _textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A desaturated grey with low-frequency blotches, so it never looks like an object colour."""
    base = rng.uniform(70, 150) + rng.uniform(-10, 10, size=3)
    coarse = rng.normal(0.0, 14.0, size=(h // 16 + 2, w // 16 + 2, 1)).astype(np.float32)
    blotches = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[:, :, None]
    return np.clip(base + blotches, 0, 255).astype(np.uint8)


def _sample_layout(rng: np.random.Generator, params: dict) -> List[Tuple[int, float, ...]]:
    """Draw (class index, centre x, centre y, size, aspect) per object, in painting order."""
    h, w = params["image_size"]
    lo, hi = params["min_object_size"], params["max_object_size"]
    num_objects = int(rng.integers(params["min_objects"], params["max_objects"] + 1))
    objects = []
    for _ in range(num_objects):
        if objects and rng.random() < params["cluster_prob"]:
            # A neighbour of an earlier object, mostly of its class: the crowded case where
            # same-class boxes overlap strongly.
            parent = objects[int(rng.integers(len(objects)))]
            class_idx = parent[0] if rng.random() < 0.8 else int(rng.integers(len(_CLASS_SPECS)))
            angle = rng.uniform(0, 2 * np.pi)
            distance = rng.uniform(0.3, 0.7) * parent[3]
            cx = float(np.clip(parent[1] + distance * np.cos(angle), 0, w - 1))
            cy = float(np.clip(parent[2] + distance * np.sin(angle), 0, h - 1))
            size = float(np.clip(parent[3] * rng.uniform(0.8, 1.25), lo, hi))
        else:
            class_idx = int(rng.integers(len(_CLASS_SPECS)))
            cx, cy = float(rng.uniform(0, w - 1)), float(rng.uniform(0, h - 1))
            size = float(rng.uniform(lo, hi))
        objects.append((class_idx, cx, cy, size, float(rng.uniform(0.6, 0.9))))
    return objects


def _shape_mask(
    shape: str, hw: Sequence[int], cx: float, cy: float, size: float, aspect: float
) -> np.ndarray:
    """Filled (H, W) bool mask of one shape centred at (cx, cy) with extent ``size`` pixels."""
    mask = np.zeros(hw, dtype=np.uint8)
    r = size / 2.0
    if shape == "circle":
        cv2.circle(mask, (round(cx), round(cy)), max(1, round(r)), 1, thickness=-1)
        return mask.astype(bool)
    if shape == "square":
        corners = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        corners = [(0, -r), (r, r), (-r, r)]
    elif shape == "diamond":
        corners = [(0, -r), (aspect * r, 0), (0, r), (-aspect * r, 0)]
    elif shape == "cross":
        t = r / 3.0
        corners = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t),
                   (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]  # fmt: skip
    else:
        raise ValueError(f"Unknown shape '{shape}'")
    points = np.round(np.array(corners) + [cx, cy]).astype(np.int32)
    cv2.fillPoly(mask, [points], 1)
    return mask.astype(bool)


def _mask_to_polygons(mask: np.ndarray) -> List[List[int]]:
    """Outer contours of an (H, W) bool mask as COCO polygons [x0, y0, x1, y1, ...] (abs pixels).

    Holes cannot be expressed as COCO polygons; contours with fewer than 3 points are dropped
    because pycocotools would misread 4 numbers as a box.
    """
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [c.reshape(-1).astype(int).tolist() for c in contours if len(c) >= 3]


def dataset_statistics(json_path: str) -> Dict[str, float]:
    """Crowdedness summary of a COCO json (abs xywh boxes).

    Returns:
        ``num_images``, ``mean_objects`` and ``max_objects`` (annotations per image), and
        ``same_class_pairs_iou_gt_0.3`` / ``_0.5``: same-class box pairs above that IoU, summed
        over images.
    """
    with open(json_path) as f:
        coco = json.load(f)
    per_image: Dict[int, List[dict]] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    counts = np.array([len(anns) for anns in per_image.values()] or [0])
    pairs = {0.3: 0, 0.5: 0}
    for anns in filter(None, per_image.values()):
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)  # (M, 4) abs xywh
        iou = np.asarray(mask_util.iou(boxes, boxes, [0] * len(anns)))  # (M, M)
        classes = np.array([a["category_id"] for a in anns])
        same_class = np.triu(classes[:, None] == classes[None, :], k=1)
        for thresh in pairs:
            pairs[thresh] += int(((iou > thresh) & same_class).sum())
    return {
        "num_images": float(len(per_image)),
        "mean_objects": float(counts.mean()),
        "max_objects": float(counts.max()),
        "same_class_pairs_iou_gt_0.3": float(pairs[0.3]),
        "same_class_pairs_iou_gt_0.5": float(pairs[0.5]),
    }
