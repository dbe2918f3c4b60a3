"""Made-up COCO / LVIS ground truth and detections (no images) for comparing evaluation backends.

Every feature the evaluators treat specially is present: non-square images of several sizes,
object sizes over COCO's small / medium / large ranges, polygon masks, crowd regions stored as
uncompressed RLE (COCO's own format for them), several categories, detections that are jittered
copies of the objects (right or wrong class) and pure false positives, and tied scores. The LVIS
variant has r / c / f categories, per-image negative and not-exhaustive category lists, no crowd.
"""
import numpy as np
import pycocotools.mask as mask_util

__all__ = ["synthetic_case"]

IMAGE_SIZES = ((640, 480), (480, 640), (500, 375), (333, 500), (640, 427), (96, 160))  # (w, h)


def _octagon(x, y, w, h):
    """The octagon inscribed in box (x, y, w, h), as a flat COCO polygon."""
    a, b = 0.29 * w, 0.29 * h
    pts = [(x + a, y), (x + w - a, y), (x + w, y + b), (x + w, y + h - b),
           (x + w - a, y + h), (x + a, y + h), (x, y + h - b), (x, y + b)]  # fmt: skip
    return [round(float(c), 2) for p in pts for c in p]


def _polygon_area(poly):
    xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _uncompressed_rle(x, y, w, h, img_w, img_h):
    """COCO's crowd format: column-major run lengths of a box mask, starting with a 0-run."""
    mask = np.zeros((img_h, img_w), dtype=np.uint8)
    mask[int(y):int(y + h), int(x):int(x + w)] = 1
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"counts": ([0] if flat[0] else []) + runs, "size": [img_h, img_w]}


def _random_box(rng, img_w, img_h):
    """A box whose sqrt(area) is log-uniform in [6, 0.9 * shorter side]: all three COCO sizes."""
    side = np.exp(rng.uniform(np.log(6), np.log(0.9 * min(img_w, img_h))))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    w, h = min(side * np.sqrt(aspect), img_w - 1), min(side / np.sqrt(aspect), img_h - 1)
    return [float(rng.uniform(0, img_w - w)), float(rng.uniform(0, img_h - h)), float(w), float(h)]


def _jitter(rng, box, img_w, img_h, scale):
    x, y, w, h = box
    x0 = np.clip(x + rng.normal(0, scale * w), 0, img_w - 2)
    y0 = np.clip(y + rng.normal(0, scale * h), 0, img_h - 2)
    x1 = np.clip(x + w + rng.normal(0, scale * w), x0 + 1, img_w)
    y1 = np.clip(y + h + rng.normal(0, scale * h), y0 + 1, img_h)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _categories(num_categories, lvis):
    cats = [{"id": i, "name": f"class_{i}", "supercategory": "thing"} for i in range(1, num_categories + 1)]
    if lvis:
        for cat in cats:  # roughly LVIS's mix: a few rare, more common, many frequent
            cat["frequency"] = "rfccfffff"[cat["id"] % 9]
    return cats


def synthetic_case(num_images=200, dets_per_image=100, num_categories=10, seed=0, masks=True, lvis=False,
                   crowd_fraction=0.08):  # fmt: skip
    """``(gt, results)``: a COCO (or LVIS) annotation dict and a detection result list.

    Each image has 1 to 12 objects (``crowd_fraction`` of them crowd regions, COCO only) and
    exactly ``dets_per_image`` detections: up to 3 jittered copies per object (10 % with a wrong
    class), the rest random boxes of random classes with low scores. Scores are rounded to 3
    decimals, so ties occur. ``masks``: detections carry compressed-RLE masks (octagons).
    """
    rng = np.random.RandomState(seed)
    cat_ids = np.arange(1, num_categories + 1)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        img_w, img_h = IMAGE_SIZES[rng.randint(len(IMAGE_SIZES))]
        image = {"id": image_id, "width": img_w, "height": img_h, "file_name": f"{image_id:012d}.jpg"}
        objects = [(int(rng.choice(cat_ids)), _random_box(rng, img_w, img_h)) for _ in range(rng.randint(1, 13))]
        for cat, box in objects:
            crowd = not lvis and rng.rand() < crowd_fraction
            if crowd:
                segm = _uncompressed_rle(*box, img_w, img_h)
                area = float(mask_util.area(mask_util.frPyObjects(segm, img_h, img_w)))
            else:
                segm = [_octagon(*box)]
                area = _polygon_area(segm[0])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [round(c, 2) for c in box], "area": area, "iscrowd": int(crowd),
                                "segmentation": segm})  # fmt: skip
        if lvis:
            present = {cat for cat, _ in objects}
            absent = [int(c) for c in cat_ids if c not in present]
            rng.shuffle(absent)
            image["neg_category_ids"] = sorted(absent[: len(absent) // 2])
            image["not_exhaustive_category_ids"] = sorted(c for c in present if rng.rand() < 0.2)
        images.append(image)
        dets = []
        for cat, box in objects:
            for _ in range(rng.randint(0, 4)):
                wrong = rng.rand() < 0.1
                jittered = _jitter(rng, box, img_w, img_h, rng.uniform(0.02, 0.25))
                dets.append((int(rng.choice(cat_ids)) if wrong else cat, jittered, rng.uniform(0.3, 1.0)))
        while len(dets) < dets_per_image:
            dets.append((int(rng.choice(cat_ids)), _random_box(rng, img_w, img_h), rng.uniform(0.0, 0.6)))
        dets = dets[:dets_per_image]
        rles = mask_util.frPyObjects([_octagon(*box) for _, box, _ in dets], img_h, img_w) if masks else []
        for k, (cat, box, score) in enumerate(dets):
            result = {"image_id": image_id, "category_id": cat, "bbox": [round(c, 2) for c in box],
                      "score": round(float(score), 3)}  # fmt: skip
            if masks:
                result["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
            results.append(result)
    gt = {"images": images, "annotations": annotations, "categories": _categories(num_categories, lvis)}
    return gt, results
