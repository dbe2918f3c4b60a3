"""The DiffusionDet meta-architecture: backbone + noisy-box head, trained by denoising GT boxes.

Shape shorthand: B images, N proposals (noisy boxes), S head stages, K classes, G GT boxes.
Box formats: "abs xyxy" = absolute pixels in the (resized, un-padded) network input image;
"signal" = normalised cxcywh mapped to (2 b - 1) * snr_scale (see ``diffusiondet.diffusion``).

Extension points used by subclasses (DiffusionInst):
  * ``build_head`` / ``build_criterion`` / ``build_sampler`` classmethods (components from cfg);
  * ``build_targets`` (extra GT fields for extra losses);
  * ``sampled_outputs`` (final-stage per-proposal head outputs carried through sampling, the
    ensemble, NMS and the cap, e.g. mask filters);
  * ``build_instances`` / ``resize_instances`` (extra output fields, with the per-image
    :class:`ImageContext`: sizes and the head's per-image outputs such as a mask feature map).
"""
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from ..diffusion import (
    RandomSource,
    TorchRandom,
    boxes_to_signal,
    corrupt_boxes,
    cosine_beta_schedule,
    diffusion_buffers,
    signal_to_boxes,
    xyxy_to_cxcywh,
)
from ..options import INFERENCE_AMP_DTYPES
from . import builders
from .criterion import SetCriterion
from .head import DynamicHead
from .sampler import DDIMBoxSampler

__all__ = ["DiffusionDet", "INFERENCE_AMP_DTYPES", "ImageContext"]


@dataclass
class ImageContext:
    """What post-processing may need to know about one image of an inference batch.

    Attributes:
        index: position of the image in the batch.
        image_size: (h, w) of the resized, un-padded network input.
        padded_size: (H, W) of the padded batch tensor (same for all images of a batch).
        output_size: (height, width) requested for the outputs (the original image size).
        per_image: the head's per-image outputs for this image, name -> (...) tensor (e.g.
            DiffusionInst's mask feature map (C, H/4, W/4)); empty for DiffusionDet.
    """

    index: int
    image_size: Tuple[int, int]
    padded_size: Tuple[int, int]
    output_size: Tuple[int, int]
    per_image: Dict[str, torch.Tensor] = field(default_factory=dict)

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class DiffusionDet(nn.Module):
    """DiffusionDet (Chen et al., 2023): detection as denoising diffusion over boxes."""

    # Final-stage head outputs handed to the sampler at every call (all (B, N, ...)); extra
    # entries are carried row-aligned with the boxes into ``build_instances``.
    sampled_outputs: Tuple[str, ...] = ("pred_logits", "pred_boxes")

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: DynamicHead,
        criterion: SetCriterion,
        sampler: DDIMBoxSampler,
        in_features: Sequence[str],
        num_proposals: int,
        eval_num_proposals: int,
        num_timesteps: int,
        snr_scale: float,
        padding: str,
        placeholder_std: float,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        inference_amp: str = "",
        compile_head: bool = False,
    ):
        """
        Args:
            backbone: detectron2 backbone whose ``in_features`` outputs share one channel count.
            head: the multi-stage denoising head.
            criterion: matcher + losses; computes the weighted loss dict.
            sampler: DDIM sampler used at inference.
            in_features: backbone feature names pooled by the head (e.g. p2..p5).
            num_proposals: N during training.
            eval_num_proposals: N during inference (independent of training).
            num_timesteps: T of the cosine schedule.
            snr_scale: signal scale s.
            padding: how GT boxes are padded to N (see ``diffusiondet.diffusion.PADDING_STRATEGIES``).
            placeholder_std: std of the Gaussian placeholder boxes.
            pixel_mean, pixel_std: per-channel normalisation of the input image.
            inference_amp: autocast backbone and head at inference, one of
                ``INFERENCE_AMP_DTYPES`` ("" = off); the sampler keeps working in fp32.
            compile_head: ``torch.compile`` each head stage in place (state-dict keys unchanged).
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.criterion = criterion
        self.sampler = sampler
        self.in_features = list(in_features)
        self.num_proposals = num_proposals
        self.eval_num_proposals = eval_num_proposals
        self.num_timesteps = num_timesteps
        self.snr_scale = snr_scale
        self.padding = padding
        self.placeholder_std = placeholder_std
        # Persistent and float64 with the official names, so official checkpoints load key for key.
        for name, value in diffusion_buffers(cosine_beta_schedule(num_timesteps)).items():
            self.register_buffer(name, value)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if inference_amp not in INFERENCE_AMP_DTYPES:
            raise ValueError(
                f"inference_amp must be one of {sorted(INFERENCE_AMP_DTYPES)}, "
                f"got {inference_amp!r}"
            )
        self.inference_amp = inference_amp
        if compile_head:
            # Per stage: the pooler between stages has data-dependent shapes (level split).
            for stage in self.head.head_series:
                stage.compile(dynamic=True)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        shapes = backbone.output_shape()
        d = cfg.MODEL.DiffusionDet
        head = cls.build_head(cfg, [shapes[f] for f in in_features])
        return {
            "backbone": backbone,
            "head": head,
            "criterion": cls.build_criterion(cfg, head),
            "sampler": cls.build_sampler(cfg),
            "in_features": in_features,
            "num_proposals": d.NUM_PROPOSALS,
            "eval_num_proposals": d.EVAL_NUM_PROPOSALS or d.NUM_PROPOSALS,
            "num_timesteps": d.NUM_TIMESTEPS,
            "snr_scale": d.SNR_SCALE,
            "padding": d.PADDING,
            "placeholder_std": d.PLACEHOLDER_STD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "inference_amp": d.INFERENCE_AMP,
            "compile_head": d.COMPILE_HEAD,
        }

    @classmethod
    def build_head(cls, cfg, input_shapes) -> DynamicHead:
        """The head for ``input_shapes`` (ShapeSpecs of the pooled levels); override to extend."""
        return builders.build_head(cfg, input_shapes)

    @classmethod
    def build_criterion(cls, cfg, head: DynamicHead) -> SetCriterion:
        """The criterion; ``head`` is given for losses that depend on its layout."""
        return builders.build_criterion(cfg)

    @classmethod
    def build_sampler(cls, cfg) -> DDIMBoxSampler:
        return builders.build_sampler(cfg)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ shared
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 dicts with "image" (C, H, W) and, in training, "instances";
                at inference optional "height"/"width" give the output resolution.
        Returns:
            training: dict of weighted losses; inference: list of {"instances": Instances}.
        """
        if self.training:
            return self.forward_training(batched_inputs)
        return self.inference(batched_inputs)

    def preprocess_image(self, batched_inputs: List[Dict]):
        """Normalise, pad to the backbone's divisibility; also return (B, 4) whwh of each image."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(
            images, self.backbone.size_divisibility, padding_constraints=self.backbone.padding_constraints
        )
        whwh = torch.tensor(
            [[w, h, w, h] for (h, w) in images.image_sizes], dtype=torch.float32, device=self.device
        )  # (B, 4)
        return images, whwh

    def extract_features(self, images: ImageList) -> List[torch.Tensor]:
        feats = self.backbone(images.tensor)
        return [feats[f] for f in self.in_features]

    def denoise(self, features: List[torch.Tensor], boxes: torch.Tensor, t: torch.Tensor) -> Dict:
        """One model call of the sampler: the final stage's ``sampled_outputs`` (B, N, ...) for
        (B, N, 4) abs xyxy boxes at t (B,)."""
        out = self.head(features, boxes, t)
        return {key: out[key][-1] for key in self.sampled_outputs}

    # ---------------------------------------------------------------- training
    def forward_training(self, batched_inputs: List[Dict], rng: Optional[RandomSource] = None):
        images, whwh = self.preprocess_image(batched_inputs)
        features = self.extract_features(images)
        targets = self.build_targets(batched_inputs, whwh)
        noisy_boxes, t = self.corrupt_targets(targets, whwh, rng)
        outputs = self.head(features, noisy_boxes, t)
        return self.criterion(outputs, targets, self.head.per_image_outputs(features))

    def build_targets(self, batched_inputs: List[Dict], whwh: torch.Tensor) -> List[Dict]:
        """Per-image dicts: labels (G,), boxes_xyxy (G, 4) abs, image_size_xyxy (4,) whwh."""
        targets = []
        for x, size in zip(batched_inputs, whwh):
            inst = x["instances"].to(self.device)
            targets.append(
                {
                    "labels": inst.gt_classes.long(),
                    "boxes_xyxy": inst.gt_boxes.tensor.float(),
                    "image_size_xyxy": size,
                }
            )
        return targets

    def corrupt_targets(self, targets: List[Dict], whwh: torch.Tensor, rng: Optional[RandomSource] = None):
        """Pad each image's GT to N boxes and noise them at a random t.

        Returns:
            noisy boxes (B, N, 4) abs xyxy and t (B,) long.
        """
        rng = rng or TorchRandom(device=self.device)
        noisy, times = [], []
        for tgt, size in zip(targets, whwh):
            gt = xyxy_to_cxcywh(tgt["boxes_xyxy"] / size)  # (G, 4) normalised cxcywh
            c = corrupt_boxes(
                gt, self.num_proposals, self.alphas_cumprod, self.snr_scale,
                self.padding, self.placeholder_std, rng,
            )
            noisy.append(c.x_t)
            times.append(c.t)
        x_t = torch.stack(noisy)  # (B, N, 4) signal
        return signal_to_boxes(x_t, whwh, self.snr_scale).float(), torch.cat(times)

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def inference(
        self,
        batched_inputs: List[Dict],
        rng: Optional[RandomSource] = None,
        per_image_rng: Optional[Sequence[RandomSource]] = None,
        do_postprocess: bool = True,
    ):
        """Run DDIM from pure noise.

        Args:
            rng / per_image_rng: optional injected randomness (replay, or per-image generators
                so that a batch gives exactly the detections of each image alone).
            do_postprocess: rescale to each input's "height"/"width" (otherwise network-input size).
        """
        images, whwh, features = self.inference_features(batched_inputs)
        return self.sample_detections(
            batched_inputs, images, whwh, features, rng, per_image_rng, do_postprocess
        )

    @torch.no_grad()
    def inference_features(self, batched_inputs: List[Dict]):
        """The backbone part of inference, reusable across sampling settings (``tools/sweep.py``).

        Returns:
            images (ImageList), whwh (B, 4), features: list of (B, C, H_l, W_l) pooled levels.
        """
        images, whwh = self.preprocess_image(batched_inputs)
        with self.inference_autocast():
            features = self.extract_features(images)
        if self.inference_amp:
            # detectron2's ROIAlign casts box coordinates to the features' dtype: a bf16 box
            # corner at x = 1000 would move by up to 4 px. Pooling reads fp32 features instead.
            features = [f.float() for f in features]
        return images, whwh, features

    @torch.no_grad()
    def sample_detections(
        self,
        batched_inputs: List[Dict],
        images: ImageList,
        whwh: torch.Tensor,
        features: List[torch.Tensor],
        rng: Optional[RandomSource] = None,
        per_image_rng: Optional[Sequence[RandomSource]] = None,
        do_postprocess: bool = True,
    ):
        """The sampling part of inference on precomputed ``inference_features``; the current
        ``sampler.steps`` and ``eval_num_proposals`` apply. Arguments as :meth:`inference`."""

        def denoise_fn(boxes: torch.Tensor, t: torch.Tensor) -> Dict:
            with self.inference_autocast():
                out = self.denoise(features, boxes, t)
            if not self.inference_amp:
                return out
            # Scores, renewal and NMS stay in fp32: bf16 logits would tie many scores.
            return {k: _to_fp32(v) for k, v in out.items()}

        candidates = self.sampler.sample_candidates(
            denoise_fn,
            self.alphas_cumprod,
            whwh,
            self.eval_num_proposals,
            rng=rng,
            per_image_rng=per_image_rng,
        )
        contexts = self.image_contexts(batched_inputs, images, features)
        return [
            {"instances": self.postprocess(image_candidates, ctx, do_postprocess)}
            for image_candidates, ctx in zip(candidates, contexts)
        ]

    def image_contexts(
        self, batched_inputs: List[Dict], images: ImageList, features: List[torch.Tensor]
    ) -> List[ImageContext]:
        """One :class:`ImageContext` per image; the head's per-image outputs are computed here,
        once per batch (they depend on neither the boxes nor t)."""
        with self.inference_autocast():
            per_image = self.head.per_image_outputs(features)
        per_image = {k: _to_fp32(v) for k, v in per_image.items()}
        padded = tuple(images.tensor.shape[-2:])
        contexts = []
        for b, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            contexts.append(
                ImageContext(
                    index=b,
                    image_size=tuple(size),
                    padded_size=padded,
                    output_size=(x.get("height", size[0]), x.get("width", size[1])),
                    per_image={k: v[b] for k, v in per_image.items()},
                )
            )
        return contexts

    def postprocess(
        self, candidates: List[Dict[str, torch.Tensor]], ctx: ImageContext, do_postprocess: bool = True
    ) -> Instances:
        """One image's candidates (one dict per ensembled call) -> its final Instances.

        Merge, class-aware NMS and the cap (``sampler.select_detections``), then
        :meth:`build_instances` in the network-input frame and, with ``do_postprocess``,
        :meth:`resize_instances` to ``ctx.output_size``.
        """
        det = self.sampler.select_detections(candidates)
        inst = self.build_instances(det, ctx)
        return self.resize_instances(inst, ctx) if do_postprocess else inst

    def inference_autocast(self):
        """The autocast context of ``inference_amp`` on the model's device (a no-op when off)."""
        dtype = INFERENCE_AMP_DTYPES[self.inference_amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def build_instances(self, det: Dict[str, torch.Tensor], ctx: ImageContext) -> Instances:
        """Detections (boxes (M, 4) abs xyxy, scores, classes, extra fields) of one image ->
        Instances in the network-input frame ``ctx.image_size``."""
        inst = Instances(ctx.image_size)
        inst.pred_boxes = Boxes(det["boxes"])
        inst.scores = det["scores"]
        inst.pred_classes = det["classes"]
        return inst

    def resize_instances(self, inst: Instances, ctx: ImageContext) -> Instances:
        """Rescale to ``ctx.output_size``, clip the boxes and drop empty ones."""
        return detector_postprocess(inst, *ctx.output_size)


def _to_fp32(value):
    return value.float() if torch.is_tensor(value) and value.is_floating_point() else value
