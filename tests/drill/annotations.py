"""Fault-drill cases: annotations and COCO jsons that are empty, invalid or inconsistent.

Box cases run the training mapper on a 64x48 image and check which boxes survive, with their
values; json cases go through ``validate_coco_json`` and through a registered dataset's loading
(``DatasetCatalog.get``), since users may skip the former.
"""
import contextlib
import json
import math
import os
import uuid

from .common import Case, capture_logs, check, expect_error, expect_logged
from .images import BOX, LOGGER, H, W, anno, mapper, record, scene, tiny_cfg


def _image(workdir, name="image.png"):
    path = os.path.join(workdir, name)
    scene().save(path)
    return path


def _map(annotations, workdir):
    """(training output, log messages) for one 64x48 image with ``annotations``."""
    with capture_logs(LOGGER) as messages:
        out = mapper(True, augmentations=[], image_format="RGB")(
            record(_image(workdir), annotations=annotations)
        )
    check(out is not None, "the image was skipped")
    return out, messages


def _short(workdir, text):
    return text.replace(workdir + os.sep, "")


def _train_step(cfg, inputs):
    """One forward/backward pass of a fresh tiny model; returns the finite total loss."""
    import torch
    from detectron2.modeling import build_model

    model = build_model(cfg).train()
    losses = model(inputs)
    total = sum(losses.values())
    values = {k: round(float(v), 3) for k, v in losses.items()}
    check(bool(torch.isfinite(total)), f"non-finite loss {values}")
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    check(grads and all(bool(torch.isfinite(g).all()) for g in grads), "non-finite gradients")
    return float(total)


def empty_annotation_list(workdir):
    out, _ = _map([], workdir)
    check(len(out["instances"]) == 0, "instances invented for an empty annotation list")
    trained = mapper(True)(record(_image(workdir), annotations=[]))
    loss = _train_step(tiny_cfg(), [trained])
    return f"image kept with empty Instances; a training step on it gives finite loss {loss:.3g}"


def all_boxes_invalid(workdir):
    bad = [anno((5, 5, 5, 20)), anno((float("nan"), 1, 9, 9)), anno((30, 20, 10, 40))]
    out, messages = _map(bad, workdir)
    check(len(out["instances"]) == 0, f"{len(out['instances'])} invalid boxes kept")
    logged = expect_logged(messages, ["image.png", "dropped 3"])
    return _short(workdir, "image kept with empty Instances; " + logged)


def nan_inf_negative(workdir):
    nan, inf = float("nan"), float("inf")
    annos = [anno((nan, 1, 9, 9)), anno((1, 1, inf, 9), 1), anno(BOX, 2), anno((20, 20, 10, 30)),
             anno((2, 30, 12, 40), 1)]
    annos[3]["bbox"] = [20, 20, -10, 10]  # negative width
    out, messages = _map(annos, workdir)
    kept = out["instances"]
    check(kept.gt_classes.tolist() == [2, 1], f"kept classes {kept.gt_classes.tolist()}")
    expected = [list(map(float, BOX)), [2.0, 30.0, 12.0, 40.0]]
    check(kept.gt_boxes.tensor.tolist() == expected, f"kept boxes {kept.gt_boxes.tensor.tolist()}")
    logged = expect_logged(messages, ["image.png", "dropped 3"])
    return _short(workdir, "2 valid boxes kept unchanged; " + logged)


def boxes_outside_image(workdir):
    annos = [anno((50, 30, 80, 60), 1), anno((100, 100, 110, 110), 2), anno((-10, -6, 10, 9), 0),
             anno((W - 5, H - 5, W + 0.5, H + 0.5), 1)]  # last: sub-pixel overshoot
    out, messages = _map(annos, workdir)
    kept = out["instances"]
    expected = [[50.0, 30.0, W, H], [0.0, 0.0, 10.0, 9.0], [W - 5.0, H - 5.0, W, H]]
    check(kept.gt_boxes.tensor.tolist() == expected, f"kept boxes {kept.gt_boxes.tensor.tolist()}")
    check(kept.gt_classes.tolist() == [1, 0, 1], f"kept classes {kept.gt_classes.tolist()}")
    logged = expect_logged(messages, ["image.png", "dropped 1 box", "clipped 2 box"])
    return _short(workdir, "partly outside clipped, fully outside dropped; " + logged)


# -- COCO json files --------------------------------------------------------------------------


def _coco(workdir, images=2, **overrides):
    """A valid 2-image COCO json (category ids 3 and 7) with its image folder, then overrides."""
    root = os.path.join(workdir, "images")
    os.makedirs(root, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "a"},
                                                            {"id": 7, "name": "b"}]}
    for i in range(1, images + 1):
        scene().save(os.path.join(root, f"{i}.png"))
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": W, "height": H})
        x0, y0, x1, y1 = BOX
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 3, "iscrowd": 0,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": 480})
    coco.update(overrides)
    return coco, root


def _write(workdir, content, name="instances.json"):
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        json.dump(content, f)
    return path


@contextlib.contextmanager
def _registered(json_file, image_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from diffusiondet.data.datasets import register_coco_json

    name = f"drill_{uuid.uuid4().hex[:8]}"
    register_coco_json(name, json_file, image_root)
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _check_both_paths(json_file, image_root, names):
    """validate_coco_json and a registered dataset's loading must both name ``names``."""
    from detectron2.data import DatasetCatalog
    from diffusiondet.data.datasets import validate_coco_json

    validated = expect_error(lambda: validate_coco_json(json_file, image_root), names=names)
    with _registered(json_file, image_root) as name:
        expect_error(lambda: DatasetCatalog.get(name), names=names)
    return "validate and load: " + validated.replace(os.path.dirname(json_file) + os.sep, "")


def duplicate_image_ids(workdir):
    coco, root = _coco(workdir, images=3)
    coco["images"][2]["id"] = 1  # two different files share id 1
    return _check_both_paths(_write(workdir, coco), root, ["instances.json", "duplicate", "[1]"])


def unknown_category_id(workdir):
    coco, root = _coco(workdir)
    coco["annotations"][1]["category_id"] = 42
    return _check_both_paths(_write(workdir, coco), root, ["instances.json", "category_id", "42"])


def not_coco_json(workdir):
    coco, root = _coco(workdir)
    as_list = _write(workdir, coco["images"], "list.json")
    no_images = _write(workdir, {"annotations": [], "categories": coco["categories"]}, "nope.json")
    details = [_check_both_paths(as_list, root, ["list.json", "list"])]
    details.append(_check_both_paths(no_images, root, ["nope.json", "images"]))
    return " | ".join(details)


def iscrowd_objects(workdir):
    from detectron2.data import DatasetCatalog

    coco, root = _coco(workdir, images=1)
    coco["annotations"].append({"id": 9, "image_id": 1, "category_id": 7, "iscrowd": 1,
                                "bbox": [40, 5, 20, 30], "area": 600,
                                "segmentation": {"size": [H, W], "counts": [H * W]}})
    json_file = _write(workdir, coco)
    with _registered(json_file, root) as name:
        (dict_,) = DatasetCatalog.get(name)
    crowd = [a.get("iscrowd", 0) for a in dict_["annotations"]]
    check(crowd == [0, 1], f"dataset dict iscrowd flags {crowd}: crowd object lost")
    out = mapper(True, augmentations=[], image_format="RGB")(dict_)
    boxes = out["instances"].gt_boxes.tensor.tolist()
    check(boxes == [list(map(float, BOX))], f"training boxes {boxes}: crowd box trained on")
    return ("crowd object kept in the dataset dicts with iscrowd=1 (COCOEvaluator ignores it), "
            "absent from training gt_boxes")


def more_objects_than_proposals(workdir):
    import torch

    cfg = tiny_cfg("MODEL.DiffusionDet.NUM_PROPOSALS", 20)
    corners = [(1 + 1.5 * i, 1 + i % 8 * 5) for i in range(40)]  # overlapping 5x5 boxes
    annos = [anno((x, y, x + 5, y + 5), i % 3) for i, (x, y) in enumerate(corners)]
    out = mapper(True, cfg)(record(_image(workdir), annotations=annos))
    check(len(out["instances"]) == 40, f"mapper kept {len(out['instances'])} of 40 boxes")
    torch.manual_seed(0)
    loss = _train_step(cfg, [out])
    check(not math.isnan(loss), "NaN loss")
    return f"40 GT boxes, 20 proposals: training forward/backward works, loss {loss:.2f}"


CASES = [
    Case("annotations", "empty_annotation_list", empty_annotation_list),
    Case("annotations", "all_boxes_invalid", all_boxes_invalid),
    Case("annotations", "nan_inf_negative_size", nan_inf_negative),
    Case("annotations", "boxes_outside_image", boxes_outside_image),
    Case("annotations", "duplicate_image_ids", duplicate_image_ids),
    Case("annotations", "unknown_category_id", unknown_category_id),
    Case("annotations", "not_coco_json", not_coco_json),
    Case("annotations", "iscrowd_objects", iscrowd_objects),
    Case("annotations", "more_objects_than_proposals", more_objects_than_proposals),
]


# --- masks and file names that are quietly wrong (issue #21) ----------------------------------------


def _mask_sample(workdir, segmentation):
    from PIL import Image

    path = os.path.join(workdir, "masked.png")
    Image.new("RGB", (40, 30)).save(path)
    anno = {"id": 77, "bbox": [2, 2, 10, 10], "bbox_mode": 1, "category_id": 0, "segmentation": segmentation}
    return {"file_name": path, "height": 30, "width": 40, "image_id": 1, "annotations": [anno]}


def _rle_counts_off(delta):
    def case(workdir):
        import pycocotools.mask as mask_util
        from detectron2.data import transforms as T

        from diffusiondet.data import DiffusionDetDatasetMapper

        counts = [600, 600 + delta]  # 30 x 40 = 1200 pixels
        rle = mask_util.frPyObjects({"size": [30, 40], "counts": counts}, 30, 40)
        mapper = DiffusionDetDatasetMapper(True, augmentations=[T.ResizeShortestEdge(32, 1000)],
                                           mask_on=True, mask_format="bitmask")
        with capture_logs("diffusiondet") as logs:
            out = mapper(_mask_sample(workdir, rle))
        check(out is not None and len(out["instances"]) == 0, "the RLE annotation was kept")
        return expect_logged(logs, ["masked.png", "annotation ids [77]"])

    return case


def short_polygons(workdir):
    from diffusiondet.data.datasets.coco_json import check_coco_dict

    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 1, 1]]},
                            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": [[]]}]}  # fmt: skip
    with capture_logs("diffusiondet") as logs:
        check_coco_dict(coco, "train.json")
    return expect_logged(logs, ["train.json", "ids [5, 6]", "fewer than 3 points"])


def _file_name_outside(name):
    def case(workdir):
        from diffusiondet.data.datasets import register_coco_json

        images = os.path.join(workdir, "images")
        os.makedirs(images)
        json_file = os.path.join(workdir, "train.json")
        with open(json_file, "w") as f:
            json.dump({"images": [{"id": 3, "file_name": name, "height": 8, "width": 8}],
                       "categories": [{"id": 1, "name": "x"}], "annotations": []}, f)
        dataset = "drill_outside_" + os.path.basename(workdir)
        register_coco_json(dataset, json_file, images)
        from detectron2.data import DatasetCatalog

        return expect_error(lambda: DatasetCatalog.get(dataset), names=["image id 3", name, "ALLOW_OUTSIDE_IMAGE_ROOT"],
                            exc=(ValueError,))

    return case


CASES += [
    Case("annotations", "rle_counts_below_hxw", _rle_counts_off(-5)),
    Case("annotations", "rle_counts_above_hxw", _rle_counts_off(7)),
    Case("annotations", "polygons_short_or_empty", short_polygons),
    Case("annotations", "file_name_dotdot", _file_name_outside("../outside/secret.png")),
    Case("annotations", "file_name_absolute", _file_name_outside("/etc/passwd")),
]
