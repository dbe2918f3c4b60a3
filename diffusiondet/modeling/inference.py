"""DiffusionDet inference: backbone once, DDIM sampling, then per-image post-processing.

Shape shorthand: B images, N proposals, M detections of one image. Boxes are abs xyxy in the
(resized, un-padded) network input image until ``resize_instances`` maps them to the output size.

:class:`DiffusionInference` is the inference half of :class:`DiffusionDet` (a mixin, kept apart
so each file stays readable); its extension points for subclasses are ``sampled_outputs``,
``build_instances``, ``resize_instances`` and ``finish_instances``, with the per-image
:class:`ImageContext`.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from ..diffusion import RandomSource, seeded_source
from ..options import INFERENCE_AMP_DTYPES
from .acceleration import pooling_for_sampling

__all__ = ["DiffusionInference", "ImageContext", "to_fp32"]


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


class DiffusionInference:
    """Inference methods of :class:`DiffusionDet` (needs its attributes: backbone, head,
    sampler, alphas_cumprod, eval_num_proposals, inference_amp, ...)."""

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
                so that a batch gives exactly the detections of each image alone). Without
                either, ``image_noise_sources`` decides.
            do_postprocess: rescale to each input's "height"/"width" (otherwise network-input size).
        """
        if rng is None and per_image_rng is None:
            per_image_rng = self.image_noise_sources(batched_inputs)
        images, whwh, features = self.inference_features(batched_inputs)
        return self.sample_detections(
            batched_inputs, images, whwh, features, rng, per_image_rng, do_postprocess
        )

    def image_noise_sources(self, batched_inputs: List[Dict]) -> Optional[List[RandomSource]]:
        """One generator per image seeded by (``sampling_seed``, its ``image_id``): the same
        weights and seed give the same detections at any batch size and in any order. None
        (torch's global generator) without a seed or when an input has no ``image_id``."""
        if self.sampling_seed < 0 or any("image_id" not in x for x in batched_inputs):
            return None
        return [seeded_source(self.sampling_seed, x["image_id"]) for x in batched_inputs]

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
                out = self.denoise(pool_input, boxes, t)
            if not self.inference_amp:
                return out
            # Scores, renewal and NMS stay in fp32: bf16 logits would tie many scores.
            return {k: to_fp32(v) for k, v in out.items()}

        with pooling_for_sampling(self, features) as pool_input:
            candidates = self.sampler.sample_candidates(
                denoise_fn,
                self.alphas_cumprod,
                whwh,
                self.eval_num_proposals,
                rng=rng,
                per_image_rng=per_image_rng,
            )
        detections = self.sampler.select_batch(candidates)  # one batched NMS in graph mode
        contexts = self.image_contexts(batched_inputs, images, features)
        return [
            {"instances": self.postprocess_detections(det, ctx, do_postprocess)}
            for det, ctx in zip(detections, contexts)
        ]

    def image_contexts(
        self, batched_inputs: List[Dict], images: ImageList, features: List[torch.Tensor]
    ) -> List[ImageContext]:
        """One :class:`ImageContext` per image; the head's per-image outputs are computed here,
        once per batch (they depend on neither the boxes nor t)."""
        with self.inference_autocast():
            per_image = self.head.per_image_outputs(features)
        per_image = {k: to_fp32(v) for k, v in per_image.items()}
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
        :meth:`build_instances` in the network-input frame, with ``do_postprocess``
        :meth:`resize_instances` to ``ctx.output_size``, and :meth:`finish_instances` in the
        final frame (``ctx.output_size``, or ``ctx.image_size`` without ``do_postprocess``).
        """
        return self.postprocess_detections(
            self.sampler.select_detections(candidates), ctx, do_postprocess
        )

    def postprocess_detections(
        self, det: Dict[str, torch.Tensor], ctx: ImageContext, do_postprocess: bool = True
    ) -> Instances:
        """One image's selected detections (after NMS and the cap) -> its final Instances."""
        inst = self.build_instances(det, ctx)
        if not do_postprocess:
            return self.finish_instances(inst, ctx, ctx.image_size)
        return self.finish_instances(self.resize_instances(inst, ctx), ctx, ctx.output_size)

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

    def finish_instances(self, inst: Instances, ctx: ImageContext, frame_size) -> Instances:
        """Hook for subclasses: fields made in the final (h, w) ``frame_size``, after boxes are
        final (e.g. DiffusionInst pastes its masks); nothing to do here."""
        return inst


def to_fp32(value):
    """A floating tensor as float32 (AMP outputs); anything else unchanged."""
    return value.float() if torch.is_tensor(value) and value.is_floating_point() else value
