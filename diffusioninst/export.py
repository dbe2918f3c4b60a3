"""DiffusionInst's masks in the exported graph and in its onnxruntime predictor
(``diffusiondet.export``; docs/deploy.md).

Shape legend: B images, K detection rows per image, P filter length, C × h_s × w_s the mask feature
map at the mask stride s of the padded canvas (h_s = H / s).

In the graph: the mask branch (once per batch), each selected detection's filter run on its
image's mask feature, sigmoid: ``mask_probs`` (B, K, h_s, w_s), as the PyTorch model's
``build_instances`` computes them. On the host, after the boxes are rescaled: the paste of
``masks_to_image`` (upsample to the canvas, crop to the image, resize to the output size,
threshold, clip to the box). That part stays outside the graph because its shapes are the
per-image sizes (a crop to each image's (h, w), a resize to each input's original
(height, width)) and its box clip takes integer box corners as slice bounds.
"""
from typing import Dict, List

import torch
from torch import Tensor

from diffusiondet.export import ExportableDetector, OnnxPredictor

from .modeling.dynamic_mask_head import dynamic_mask_logits
from .modeling.mask_postprocess import masks_to_image

__all__ = ["ExportableDiffusionInst", "OnnxInstPredictor"]


class ExportableDiffusionInst(ExportableDetector):
    """:class:`ExportableDetector` of a DiffusionInst, with the output ``mask_probs``
    (B, K, h_s, w_s) float32: each detection row's mask probabilities at the mask stride."""

    extra_output_names = ("mask_probs",)

    def extra_outputs(self, selected: Dict[str, Tensor], features: List[Tensor]) -> Dict[str, Tensor]:
        head = self.model.head
        mask_feat = head.per_image_outputs(features)["mask_feat"].float()  # (B, C, h_s, w_s)
        kernels = selected["pred_kernels"].float()  # (B, K, P)
        batch, rows = kernels.shape[:2]
        image_index = torch.arange(batch, device=kernels.device).repeat_interleave(rows)
        boxes = selected["boxes"].float().flatten(0, 1)  # (B·K, 4) input-pixel xyxy
        logits = dynamic_mask_logits(
            mask_feat, kernels.flatten(0, 1), image_index, head.mask_head_spec, boxes, head.mask_stride
        )
        return {"mask_probs": logits.sigmoid().view(batch, rows, *logits.shape[1:])}

    def metadata(self) -> Dict[str, str]:
        model = self.model
        return {
            **super().metadata(),
            "mask_stride": str(model.head.mask_stride),
            "mask_threshold": repr(float(model.mask_threshold)),
            "clip_masks_to_boxes": str(int(model.clip_masks_to_boxes)),
        }


class OnnxInstPredictor(OnnxPredictor):
    """:class:`OnnxPredictor` of an exported DiffusionInst: Instances also carry ``pred_masks``
    (M, height, width) bool, pasted as the PyTorch model's ``finish_instances`` does."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.mask_stride = int(self.metadata["mask_stride"])
        self.mask_threshold = float(self.metadata["mask_threshold"])
        self.clip_masks_to_boxes = bool(int(self.metadata["clip_masks_to_boxes"]))

    def build_instances(self, fields, image_size):
        inst = super().build_instances(fields, image_size)
        inst.pred_mask_probs = fields["mask_probs"]
        return inst

    def finish_instances(self, inst, image_size, output_size):
        probs = inst.pred_mask_probs
        inst.remove("pred_mask_probs")
        boxes = inst.pred_boxes.tensor if self.clip_masks_to_boxes else None
        inst.pred_masks = masks_to_image(
            probs, self.mask_stride, image_size, tuple(output_size), boxes, self.mask_threshold
        )
        return inst
