"""detectron2 ``DatasetEvaluator`` for CrowdHuman: AP50 / mMR / Recall of the person detections.

Ground truth comes from the registered dataset dicts (``iscrowd`` boxes are the ignore regions,
see ``diffusiondet.data.datasets.crowdhuman``); detections are every predicted box of the model
(no cap at 100 per image: the model's own DETECTIONS_PER_IMAGE applies), in original-image pixels.
They can be saved as odgt lines in CrowdDet's result format, which CrowdDet's toolkit and
``python -m diffusiondet.evaluation.crowdhuman`` both read.
"""
import copy
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from .crowdhuman import CrowdHumanImage, evaluate_crowdhuman

__all__ = ["CrowdHumanEvaluator"]

logger = logging.getLogger(__name__)


def ground_truth_from_dicts(dataset_dicts: List[dict]) -> Dict[str, CrowdHumanImage]:
    """{image id (str): CrowdHumanImage} from detectron2 dataset dicts (boxes in any BoxMode)."""
    images = {}
    for d in dataset_dicts:
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d.get("annotations", [])]
        ignore = [bool(a.get("iscrowd", 0)) for a in d.get("annotations", [])]
        images[str(d["image_id"])] = CrowdHumanImage(
            float(d["width"]), float(d["height"]), np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(ignore, dtype=bool),
        )  # fmt: skip
    return images


def write_odgt_detections(path: str, records: List[dict], sizes: Mapping[str, Tuple[float, float]]):
    """One odgt line per record ({"image_id", "boxes" (D, 4) abs xyxy, "scores" (D,)}):
    ``{"ID", "width", "height", "dtboxes": [{"box": [x, y, w, h], "score", "tag": 1}]}``.

    ``tag`` 1 is the person's class index in CrowdDet's files: other tools then take every box as
    a person, as the evaluator did. ``width`` / ``height`` come from ``sizes`` {ID: (w, h)} and are
    left out for an image not in it; CrowdHuman's ground-truth odgt has no sizes of its own.
    """
    with open(path, "w") as f:
        for r in records:
            image_id = str(r["image_id"])
            line = {"ID": image_id}
            if image_id in sizes:
                line["width"], line["height"] = sizes[image_id]
            line["dtboxes"] = [{"box": [x1, y1, x2 - x1, y2 - y1], "score": score, "tag": 1}
                               for (x1, y1, x2, y2), score in zip(r["boxes"].tolist(), r["scores"].tolist())]
            f.write(json.dumps(line) + "\n")


class CrowdHumanEvaluator(DatasetEvaluator):
    """AP, mMR and Recall (reported in percent, as the paper does) on one dataset."""

    def __init__(self, dataset_name: str, output_dir: str = "", count_images_without_gt: bool = False,
                 distributed: bool = True, person_class: Optional[int] = 0):  # fmt: skip
        """
        Args:
            dataset_name: a registered dataset whose dicts carry the CrowdHuman ground truth.
            output_dir: if set, detections are saved there as ``crowdhuman_detections.odgt``
                (see ``write_odgt_detections``).
            count_images_without_gt: count images without any GT box (see the metric module).
            distributed: gather detections from every process before evaluating.
            person_class: the model's class id of "person" (0 for a CrowdHuman model and for a
                COCO model evaluated zero-shot); other classes are not evaluated. None keeps all.
        """
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.count_images_without_gt = count_images_without_gt
        self.distributed = distributed
        self.person_class = person_class
        self._records: List[dict] = []

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            if self.person_class is not None:
                inst = inst[inst.pred_classes == self.person_class]
            self._records.append({
                "image_id": x["image_id"],
                "boxes": inst.pred_boxes.tensor.numpy().astype(np.float64),  # (D, 4) abs xyxy
                "scores": inst.scores.numpy().astype(np.float64),
            })  # fmt: skip

    def evaluate(self):
        records = self._records
        if self.distributed:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(records, dst=0)))
            if not comm.is_main_process():
                return {}
        dataset_dicts = DatasetCatalog.get(self.dataset_name)
        ground_truth = ground_truth_from_dicts(dataset_dicts)
        missing = set(ground_truth) - {str(r["image_id"]) for r in records}
        if missing:
            logger.warning("%d images of %s have no detections record", len(missing), self.dataset_name)
        detections = {str(r["image_id"]): (r["boxes"], r["scores"]) for r in records}
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            sizes = {str(d["image_id"]): (d["width"], d["height"]) for d in dataset_dicts}
            write_odgt_detections(os.path.join(self.output_dir, "crowdhuman_detections.odgt"), records, sizes)
        metrics = evaluate_crowdhuman(ground_truth, detections, self.count_images_without_gt)
        result = {"AP50": 100 * metrics["AP"], "mMR": 100 * metrics["mMR"], "Recall": 100 * metrics["Recall"]}
        logger.info("CrowdHuman %s: %s", self.dataset_name, json.dumps({k: round(v, 2) for k, v in result.items()}))
        return OrderedDict({"crowdhuman": copy.deepcopy(result)})
