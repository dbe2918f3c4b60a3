"""Test-time augmentation for DiffusionDet and DiffusionInst (docs/tta.md).

:class:`DiffusionDetWithTTA` wraps a model like detectron2's ``GeneralizedRCNNWithTTA``: detectron2's
``DatasetMapperTTA`` makes the views of each image (TEST.AUG.MIN_SIZES x MAX_SIZE, and their
horizontal flips with TEST.AUG.FLIP); the model samples every view (the views of an image batched);
each view's detections are mapped back to the original image, filtered by size
(TEST.AUG.SCALE_FILTER / SCALE_RANGES), and all views are merged (TEST.AUG.MERGE when
TEST.AUG.CVPODS_TTA, else class-wise NMS; :mod:`diffusiondet.modeling.tta_merge`).
:func:`evaluate_with_tta` evaluates the wrapped model with the trainer's evaluators, results keyed
"<task>_TTA" as detectron2's ``train_net.py`` keys them.

Shape legend: H x W the original image, M detections of one view, M' merged ones. Boxes are abs
xyxy in the original image from the model's output on.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from detectron2.data import build_detection_test_loader
from detectron2.data.transforms import HFlipTransform, NoOpTransform, ResizeTransform
from detectron2.modeling import DatasetMapperTTA
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .data import DiffusionDetDatasetMapper
from .diffusion import seeded_source
from .engine import Trainer
from .modeling import DiffusionDet
from .modeling.postprocess import cap_detections
from .modeling.tta_merge import in_scale_range, merge_detections

__all__ = ["DiffusionDetWithTTA", "evaluate_with_tta"]

logger = logging.getLogger(__name__)


class DiffusionDetWithTTA(nn.Module):
    """A DiffusionDet (or DiffusionInst) evaluated on augmented views of each image, merged.

    Its ``forward`` has the model's inference interface: a list of detectron2 input dicts (each
    with "image" (C, h, w), "height"/"width" of the original image and, for reproducible noise,
    "image_id") -> a list of {"instances": Instances} at (height, width) with ``pred_boxes`` abs
    xyxy, ``scores``, ``pred_classes`` and, from DiffusionInst, ``pred_masks`` (M', H, W) bool.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size: Optional[int] = None):
        """
        Args:
            cfg: the config (TEST.AUG.*, MODEL.DiffusionDet.{NMS_THRESH, DETECTIONS_PER_IMAGE}).
            model: a built DiffusionDet or subclass, possibly inside DistributedDataParallel.
            tta_mapper: input dict -> list of view dicts with "transforms"; default
                ``DatasetMapperTTA(cfg)`` (views in its order: per size, plain then flipped).
            batch_size: views per model call; default one size's views (plain and flipped have
                the same shape, so nothing is padded).
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, DiffusionDet):
            raise TypeError(f"DiffusionDetWithTTA wraps a DiffusionDet model, got {type(model).__name__}")
        aug = cfg.TEST.AUG
        self.model = model
        self.tta_mapper = tta_mapper or DatasetMapperTTA(cfg)
        # CVPODS_TTA False is detectron2's own TTA merge: class-wise NMS.
        self.merge = aug.MERGE if aug.CVPODS_TTA else "nms"
        self.nms_threshold = cfg.MODEL.DiffusionDet.NMS_THRESH
        self.views_per_size = 2 if aug.FLIP else 1
        self.scale_ranges = [tuple(r) for r in aug.SCALE_RANGES] if aug.SCALE_FILTER else None
        self.batch_size = batch_size or self.views_per_size
        # The official TTA keeps at most NUM_PROPOSALS detections; here the boxes one view samples
        # (the eval count), or DETECTIONS_PER_IMAGE when that caps the model itself.
        self.max_detections = cfg.MODEL.DiffusionDet.DETECTIONS_PER_IMAGE or model.eval_num_proposals

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        if self.training:
            raise RuntimeError("DiffusionDetWithTTA is for inference; call .eval() first")
        return [{"instances": self.inference_one_image(x)} for x in batched_inputs]

    @torch.no_grad()
    def inference_one_image(self, image_input: Dict) -> Instances:
        """All views of one input dict, sampled, mapped back, size-filtered and merged."""
        image_input = dict(image_input)
        image_input.setdefault("height", image_input["image"].shape[1])
        image_input.setdefault("width", image_input["image"].shape[2])
        views = self.tta_mapper(image_input)
        if self.scale_ranges is not None and len(views) != len(self.scale_ranges) * self.views_per_size:
            raise ValueError(
                f"{len(views)} views but {len(self.scale_ranges)} TEST.AUG.SCALE_RANGES for "
                f"{self.views_per_size} view(s) per size"
            )
        height, width = image_input["height"], image_input["width"]
        per_view = self.sample_views(views, self.view_noise_sources(image_input, len(views)))
        kept = []
        for index, (view, inst) in enumerate(zip(views, per_view)):
            inst = self.undo_flip(inst, view["transforms"], width)
            if self.scale_ranges is not None:
                low, high = self.scale_ranges[index // self.views_per_size]
                inst = inst[in_scale_range(inst.pred_boxes.tensor, low, high)]
            kept.append(inst)
        return self.merge_views(Instances.cat(kept), len(views), (height, width))

    def view_noise_sources(self, image_input: Dict, num_views: int):
        """One noise generator per view seeded by (SEED, image_id, view index): views do not
        share noise, and the TTA result is a function of the weights, SEED and the image. None
        (torch's global generator, as the model without a seed) without SEED or image_id."""
        if self.model.sampling_seed < 0 or "image_id" not in image_input:
            return None
        key = image_input["image_id"]
        return [seeded_source(self.model.sampling_seed, f"{key}/tta{view}") for view in range(num_views)]

    def sample_views(self, views: List[Dict], noise) -> List[Instances]:
        """The model's detections of every view at the original size ("height"/"width": boxes
        rescaled and clipped by detector_postprocess, DiffusionInst's masks pasted at H x W),
        still flipped for flipped views. Views of similar area share a batch."""
        order = sorted(range(len(views)), key=lambda i: views[i]["image"][0].numel())  # by area
        results: List[Optional[Instances]] = [None] * len(views)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rngs = None if noise is None else [noise[i] for i in chunk]
            outputs = self.model.inference([views[i] for i in chunk], per_image_rng=rngs, do_postprocess=True)
            for i, out in zip(chunk, outputs):
                results[i] = out["instances"]
        return results

    @staticmethod
    def undo_flip(inst: Instances, transforms, width: int) -> Instances:
        """Detections of a view, already at the original size, mirrored back if the view was
        flipped. The resizes are undone by detector_postprocess, so the flip is mirrored at the
        ORIGINAL width; other transforms are not supported (DatasetMapperTTA makes none)."""
        flipped = False
        for t in transforms.transforms:
            if isinstance(t, HFlipTransform):
                flipped = not flipped
            elif not isinstance(t, (ResizeTransform, NoOpTransform)):
                raise NotImplementedError(f"TTA cannot map {type(t).__name__} back to the image")
        if not flipped:
            return inst
        mirror = HFlipTransform(width)
        boxes = inst.pred_boxes.tensor
        inst.pred_boxes = Boxes(torch.as_tensor(mirror.apply_box(boxes.cpu().numpy()), device=boxes.device))
        if inst.has("pred_masks"):
            # (M, H, W): column j of the flipped view is column W - 1 - j of the image
            # (HFlipTransform.apply_image would read (M, H, W) as (H, W, C)).
            inst.pred_masks = inst.pred_masks.flip(-1)
        return inst

    def merge_views(self, inst: Instances, num_views: int, image_size) -> Instances:
        """Merge the concatenated views' detections and keep the best ``max_detections`` (sorted
        by score). The official TTA clips the merged boxes: every view's boxes are already clipped
        to the image by detector_postprocess and merged boxes are means of them, so they are."""
        masks = inst.pred_masks if inst.has("pred_masks") else None
        merged, masks = merge_detections(
            inst.pred_boxes.tensor, inst.scores, inst.pred_classes, self.merge,
            num_views=num_views, nms_threshold=self.nms_threshold, masks=masks,
        )  # fmt: skip
        fields = {"boxes": merged.boxes, "scores": merged.scores, "classes": merged.classes}
        if masks is not None:
            fields["masks"] = masks
        fields = cap_detections(fields, self.max_detections)
        result = Instances(image_size)
        result.pred_boxes = Boxes(fields["boxes"])
        result.scores = fields["scores"]
        result.pred_classes = fields["classes"]
        if masks is not None:
            result.pred_masks = fields["masks"]
        return result


class _OriginalImageTester(Trainer):
    """The trainer's evaluation with a test loader that does not resize: DatasetMapperTTA then
    resizes each view from the original image instead of from the MIN_SIZE_TEST one."""

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = DiffusionDetDatasetMapper(cfg, is_train=False, augmentations=[])
        # One image at a time: its views are the batch.
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper, batch_size=1)


def evaluate_with_tta(cfg, model) -> "OrderedDict[str, dict]":
    """Evaluate ``model`` with TTA on every cfg.DATASETS.TEST with the trainer's evaluators
    (written under OUTPUT_DIR/inference_TTA/<dataset>); results keyed "<task>_TTA"."""
    logger.info("Running inference with test-time augmentation (TEST.AUG) ...")
    evaluators = [
        Trainer.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
        for name in cfg.DATASETS.TEST
    ]
    results = _OriginalImageTester.test(cfg, DiffusionDetWithTTA(cfg, model), evaluators)
    return OrderedDict((key + "_TTA", value) for key, value in results.items())
