"""The mask AP a perfect mask head could reach at a given mask stride (tools/diagnose_inst.py).

DiffusionInst predicts each mask on the mask feature's grid (stride s of the network input) and
pastes it back with :func:`masks_to_image`; a target is the GT mask sampled on that grid
(:func:`masks_at_stride`, "center" or "area" targets: MODEL.DiffusionInst.MASK_TARGET). Sending
every GT mask through that round trip, with its GT box, class and score 1, and scoring the result
with COCO's segm evaluation measures what the stride alone costs: the AP of a head that predicts
every target exactly. Stride 1 gives 100 when the test resize is the identity.

Shape legend: G GT objects of an image, H × W the image, h × w the resized network input.
"""
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .modeling.mask_losses import masks_at_stride
from .modeling.mask_postprocess import masks_to_image

__all__ = ["gt_masks_of_record", "round_trip_masks", "stride_ceiling_ap"]


def gt_masks_of_record(record: Dict) -> tuple:
    """The non-crowd GT of one dataset record at its image size.

    Returns:
        (masks (G, H, W) bool, boxes (G, 4) abs xyxy float32, the G contiguous class ids).
    """
    height, width = record["height"], record["width"]
    masks, boxes, classes = [], [], []
    for anno in record.get("annotations", []):
        if anno.get("iscrowd", 0) or "segmentation" not in anno:
            continue
        segm = anno["segmentation"]
        if isinstance(segm, list):
            rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
        elif isinstance(segm.get("counts"), list):
            rle = mask_util.frPyObjects(segm, height, width)
        else:
            rle = segm
        masks.append(torch.from_numpy(mask_util.decode(rle).astype(bool)))
        boxes.append(BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS))
        classes.append(anno["category_id"])
    if not masks:
        return torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0, 4), []
    return torch.stack(masks), torch.tensor(boxes, dtype=torch.float32), classes


def round_trip_masks(masks: torch.Tensor, boxes: torch.Tensor, input_hw, stride: int,
                     clip_to_boxes: bool = True, mode: str = "center") -> torch.Tensor:
    """GT masks resized to the network input, sampled at ``stride``, pasted back.

    Args:
        masks: (G, H, W) bool at the image size.
        boxes: (G, 4) abs xyxy in the (H, W) frame (the paste clips to them when asked).
        input_hw: (h, w) the network-input size after the test resize.
        stride: the mask stride s.
        clip_to_boxes: zero the pasted masks outside their boxes, as the model does.
        mode: the target mode of :func:`masks_at_stride`.

    Returns:
        (G, H, W) bool: what a head predicting each target exactly would output.
    """
    height, width = masks.shape[1:]
    h, w = input_hw
    resized = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0]
    grid = (math.ceil(h / stride), math.ceil(w / stride))
    targets = masks_at_stride(resized, grid, stride, mode)  # (G, h_s, w_s) in [0, 1]
    return masks_to_image(targets, stride, (h, w), (height, width),
                          boxes if clip_to_boxes else None)


def stride_ceiling_ap(cfg, dataset_name: str, strides: Sequence[int] = (1, 2, 4, 8),
                      mode: Optional[str] = None) -> Dict:
    """COCO segm AP of the round-tripped GT masks of ``dataset_name`` for each stride.

    Images are resized as at test time (MIN_SIZE_TEST / MAX_SIZE_TEST); masks are clipped to
    their boxes when MODEL.DiffusionInst.CLIP_MASKS_TO_BOXES is on, as the model's are.
    ``mode`` (default MODEL.DiffusionInst.MASK_TARGET) is how targets are sampled.

    Returns:
        {"dataset", "mode", "num_objects", "by_stride": {str(s): {"AP", "AP50", "AP75", "APs", "APm",
        "APl"}}}, AP in percent.
    """
    records = DatasetCatalog.get(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    coco_gt = COCO(metadata.json_file)
    # detectron2 made the category ids contiguous; the json has the original ones.
    to_json_id = {v: k for k, v in getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).items()}
    clip = bool(cfg.MODEL.DiffusionInst.CLIP_MASKS_TO_BOXES)
    mode = mode or cfg.MODEL.DiffusionInst.MASK_TARGET
    gt = [gt_masks_of_record(r) for r in records]
    out = {"dataset": dataset_name, "mode": mode, "num_objects": sum(len(g[2]) for g in gt), "by_stride": {}}
    for stride in strides:
        results = []
        for record, (masks, boxes, classes) in zip(records, gt):
            if not classes:
                continue
            input_hw = (record["height"], record["width"])
            if cfg.INPUT.MIN_SIZE_TEST > 0:
                input_hw = ResizeShortestEdge.get_output_shape(
                    record["height"], record["width"], cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
                )
            pasted = round_trip_masks(masks, boxes, input_hw, int(stride), clip, mode).numpy()
            for mask, box, category in zip(pasted, boxes.tolist(), classes):
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                results.append({"image_id": record["image_id"],
                                "category_id": to_json_id.get(category, category),
                                "segmentation": rle, "score": 1.0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        out["by_stride"][str(stride)] = {n: float(100 * v) for n, v in zip(names, evaluation.stats)}
    return out
