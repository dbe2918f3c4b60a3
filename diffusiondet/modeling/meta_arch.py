"""The DiffusionDet meta-architecture: backbone + noisy-box head, trained by denoising GT boxes.

Shape shorthand: B images, N proposals (noisy boxes), S head stages, K classes, G GT boxes.
Box formats: "abs xyxy" = absolute pixels in the (resized, un-padded) network input image;
"signal" = normalised cxcywh mapped to (2 b - 1) * snr_scale (see ``diffusiondet.diffusion``).

Extension points used by subclasses (DiffusionInst):
  * ``build_head`` / ``build_criterion`` / ``build_sampler`` classmethods (components from cfg);
  * ``build_targets`` (extra GT fields for extra losses);
  * ``sampled_outputs`` (final-stage per-proposal head outputs carried through sampling, the
    ensemble, NMS and the cap, e.g. mask filters);
  * ``build_instances`` / ``resize_instances`` / ``finish_instances`` (extra output fields,
    e.g. masks pasted in the final frame, with the per-image
    :class:`ImageContext`: sizes and the head's per-image outputs such as a mask feature map).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

from ..diffusion import (
    RandomSource,
    TorchRandom,
    corrupt_boxes,
    cosine_beta_schedule,
    diffusion_buffers,
    signal_to_boxes,
    xyxy_to_cxcywh,
)
from ..options import INFERENCE_AMP_DTYPES
from . import builders
from .acceleration import SpeedOptions, accelerate
from .criterion import SetCriterion
from .head import DynamicHead
from .inference import DiffusionInference, ImageContext
from .sampler import DDIMBoxSampler

__all__ = ["DiffusionDet", "INFERENCE_AMP_DTYPES", "ImageContext"]


@META_ARCH_REGISTRY.register()
class DiffusionDet(DiffusionInference, nn.Module):
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
        speed: SpeedOptions = SpeedOptions(),
        sampling_seed: int = -1,
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
            speed: options that trade speed or memory only (``diffusiondet.modeling.acceleration``);
                the default changes nothing.
            sampling_seed: >= 0: inference draws each image's noise from a generator seeded by
                (seed, image_id), so the detections of an image do not depend on the batch it
                is in or on what ran before; < 0: from torch's global generator.
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
        self.sampling_seed = sampling_seed
        accelerate(self, speed)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        shapes = backbone.output_shape()
        d = cfg.MODEL.DiffusionDet
        head = cls.build_head(cfg, [shapes[f] for f in in_features])
        if d.ALLOW_TF32:
            # Process-wide, like detectron2 users set it; it only affects CUDA matmuls.
            torch.backends.cuda.matmul.allow_tf32 = True
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
            "speed": SpeedOptions.from_config(cfg),
            "sampling_seed": cfg.SEED,
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
        # Channels-last maps (FOLD_FROZEN_BN) would be copied by RoIAlign at every stage.
        return [feats[f].contiguous() for f in self.in_features]

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
