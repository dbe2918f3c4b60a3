"""DiffusionDet inference (SAMPLING_MODE "graph") as one module with fixed input and output shapes,
the form ``torch.onnx.export`` (``torch.export``) captures.

Shape legend: B images, 3 × H × W the padded input canvas, N proposals, D noise draws, M candidates
per image (the top N of every ensembled model call), K detections per image (DETECTIONS_PER_IMAGE,
or M when it is 0). Boxes are abs xyxy in each image's un-padded network-input frame, not clipped:
what the model's sampler returns before ``detector_postprocess``.

The module reuses the model's own inference pieces (normalisation constants, backbone, head,
GraphBoxSampler's loop, its batched class NMS); what differs is how the final selection is laid
out: a keep mask, then the top K by score, padded, instead of one variable-length list per image.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import ImageList
from torch import Tensor, nn

from ..diffusion import RandomSource, ReplayRandom
from ..modeling.acceleration import pooling_for_sampling
from ..modeling.graph_sampler import GraphBoxSampler, SamplingSchedule, batched_class_nms

__all__ = [
    "NOISE_MODES",
    "OUTPUT_NAMES",
    "ExportableDetector",
    "canvas_size",
    "class_nms_keep",
    "noise_draws",
    "sampling_noise",
]

# "input": the sampling noise is a graph input (reproducible, equal to eager given the same
# draws); "internal": drawn inside the graph (ONNX RandomNormal), fresh at every run.
NOISE_MODES = ("input", "internal")
OUTPUT_NAMES = ("boxes", "scores", "classes", "num_detections")
NMS_OP = "diffusiondet::class_nms_keep"


@torch.library.custom_op(NMS_OP, mutates_args=())
def class_nms_keep(
    boxes: Tensor, scores: Tensor, classes: Tensor, num_classes: int, iou_threshold: float
) -> Tensor:
    """Which candidates survive class-aware NMS, image by image: (B, M) bool.

    Args:
        boxes: (B, M, 4) abs xyxy; scores: (B, M); classes: (B, M) long in [0, num_classes).
        num_classes: how many classes exist (the ONNX translation builds one score row each).
        iou_threshold: same-class boxes of an image with IoU > threshold are suppressed.

    Eagerly this is graph mode's own :func:`batched_class_nms`. An operator of its own (with a
    fixed output shape), so that the exporter maps it to one ONNX NonMaxSuppression over
    (image, class) (``onnx_export.py``) instead of tracing the kernel.
    """
    keep, _ = batched_class_nms(boxes, scores, classes, iou_threshold)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[keep] = True
    return mask.view(scores.shape)


@class_nms_keep.register_fake
def _class_nms_keep_fake(boxes, scores, classes, num_classes, iou_threshold):
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


class _InGraphNormal(RandomSource):
    """``randn`` as the plain ``torch.randn`` (ONNX RandomNormal): ``TorchRandom`` passes a
    ``generator`` argument, an overload the exporter cannot translate."""

    def __init__(self, device: torch.device):
        self.device = device

    def randn(self, shape) -> Tensor:
        return torch.randn(tuple(shape), device=self.device)


def noise_draws(sampler: GraphBoxSampler) -> int:
    """D, the (B, N, 4) standard-normal draws of one graph-mode inference: x_T, then for each of
    the S − 1 non-final steps its DDIM noise and, with box renewal, its refill."""
    return 1 + (sampler.steps - 1) * (2 if sampler.box_renewal else 1)


def sampling_noise(sources: Sequence[RandomSource], num_boxes: int, draws: int) -> Tensor:
    """The ``noise`` input (D, B, N, 4) float32 that reproduces graph-mode inference with per-image
    sources (``per_image_rng``, or the seeded sources of ``SEED`` >= 0): noise[d, b] is image b's
    d-th draw, in the order the sampler draws them."""
    per_image = [torch.stack([s.randn((num_boxes, 4)) for _ in range(draws)]) for s in sources]
    return torch.stack(per_image, dim=1).float()


def canvas_size(model, height: int, width: int) -> Tuple[int, int]:
    """The padded (H, W) the model's backbone gives an image of ``height`` × ``width`` (its
    size_divisibility and padding constraints), i.e. the smallest exportable canvas for it."""
    padded = ImageList.from_tensors(
        [torch.zeros(1, height, width)],
        model.backbone.size_divisibility,
        padding_constraints=model.backbone.padding_constraints,
    )
    return tuple(padded.tensor.shape[-2:])


class ExportableDetector(nn.Module):
    """A DiffusionDet model's inference with fixed shapes: images in, K padded detections out.

    forward(images, image_sizes[, noise]):
        images: (B, 3, H, W) float32 pixel values 0-255 in the model's input channel order
            (``INPUT.FORMAT``), each image in the top-left corner of the canvas; what lies outside
            it is ignored (the graph normalises with PIXEL_MEAN / PIXEL_STD and zeroes the padding,
            as ``ImageList`` pads the normalised images).
        image_sizes: (B, 2) int64 (h, w) of each un-padded image.
        noise: (D, B, N, 4) float32 standard-normal draws (noise mode "input" only), see
            :func:`sampling_noise`.
    Returns, in ``output_names`` order:
        boxes (B, K, 4) float32 abs xyxy; scores (B, K) float32, descending per image;
        classes (B, K) int64; num_detections (B,) int64: rows [0, n_b) of image b are its
        detections, the other rows are zero (class -1); then :meth:`extra_outputs`.

    Args:
        model: a DiffusionDet in eval mode with SAMPLING_MODE "graph", no INFERENCE_AMP and no
            COMPILE_SAMPLING_STEP (the export captures fp32 eager operations).
        batch, height, width: B and the canvas H × W (a padded size of the backbone, see
            :func:`canvas_size`).
        noise: one of ``NOISE_MODES``.
    """

    extra_output_names: Tuple[str, ...] = ()

    def __init__(self, model, batch: int, height: int, width: int, noise: str = "input"):
        super().__init__()
        sampler = model.sampler
        if not isinstance(sampler, GraphBoxSampler):
            raise ValueError("export needs MODEL.DiffusionDet.SAMPLING_MODE 'graph' (fixed shapes)")
        if sampler.compile_step or model.inference_amp:
            raise ValueError(
                "export captures fp32 eager operations: set MODEL.DiffusionDet.COMPILE_SAMPLING_STEP"
                " False and MODEL.DiffusionDet.INFERENCE_AMP ''"
            )
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if batch < 1 or canvas_size(model, height, width) != (height, width):
            raise ValueError(
                f"batch {batch} must be >= 1 and {height}x{width} a padded size of the backbone "
                f"(e.g. {canvas_size(model, height, width)})"
            )
        self.model = model.eval()
        self.batch, self.height, self.width, self.noise = batch, height, width, noise
        self.num_boxes = model.eval_num_proposals
        self.draws = noise_draws(sampler)
        # ᾱ is read on the host here, once: under torch.export it could not be (data-dependent).
        schedule = sampler.sampling_schedule(model.alphas_cumprod, model.device)
        self.pairs = schedule.pairs
        self.register_buffer("coefficients", schedule.coefficients, persistent=False)
        self.register_buffer("times", schedule.times, persistent=False)
        # Build the (stateless) fixed-shape pooler now rather than inside the traced call.
        model.head.use_fixed_shape_pooling(True)
        model.head.use_fixed_shape_pooling(False)

    @property
    def input_names(self) -> List[str]:
        return ["images", "image_sizes"] + (["noise"] if self.noise == "input" else [])

    @property
    def output_names(self) -> List[str]:
        return list(OUTPUT_NAMES + self.extra_output_names)

    def example_inputs(self) -> Tuple[Tensor, ...]:
        """Inputs of the right shapes and dtypes (full-canvas images) to trace the module with."""
        device = self.model.device
        images = torch.rand(self.batch, 3, self.height, self.width, device=device) * 255
        sizes = torch.tensor([[self.height, self.width]] * self.batch, device=device)
        if self.noise == "internal":
            return images, sizes
        return images, sizes, torch.randn(self.draws, self.batch, self.num_boxes, 4, device=device)

    def forward(self, images: Tensor, image_sizes: Tensor, noise: Optional[Tensor] = None):
        model = self.model
        if (noise is None) != (self.noise == "internal"):
            raise ValueError(f"noise mode {self.noise!r}: noise input {'missing' if noise is None else 'unexpected'}")
        rows = torch.arange(self.height, device=images.device)[None, :, None]
        cols = torch.arange(self.width, device=images.device)[None, None, :]
        inside = (rows < image_sizes[:, 0, None, None]) & (cols < image_sizes[:, 1, None, None])
        normalized = (images.float() - model.pixel_mean) / model.pixel_std
        canvas = torch.where(inside[:, None], normalized, 0.0)  # (B, 3, H, W)
        features = model.extract_features(ImageList(canvas, [(self.height, self.width)] * self.batch))
        whwh = image_sizes[:, [1, 0, 1, 0]].float()  # (B, 4), as preprocess_image's
        if noise is None:
            rng = _InGraphNormal(images.device)
        else:
            rng = ReplayRandom(list(noise.float().unbind(0)))
        schedule = SamplingSchedule(self.pairs, self.coefficients, self.times)
        with pooling_for_sampling(model, features) as pool_input:
            candidates = model.sampler.sample_candidates(
                lambda boxes, t: model.denoise(pool_input, boxes, t),
                model.alphas_cumprod, whwh, self.num_boxes, rng=rng, schedule=schedule,
            )  # fmt: skip
        if noise is not None and rng.remaining:
            raise RuntimeError(f"the sampler left {rng.remaining} of the {self.draws} noise draws unused")
        fields = {name: torch.stack([c[0][name] for c in candidates]) for name in candidates[0][0]}
        selected = self.select(fields)
        selected.update(self.extra_outputs(selected, features))
        return tuple(selected[name] for name in self.output_names)

    def select(self, fields: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Class-aware NMS (as the sampler's ``select_batch``) and the cap, with fixed shapes.

        Args:
            fields: the candidates of all images, ``boxes`` (B, M, 4), ``scores`` (B, M),
                ``classes`` (B, M) and any extra per-candidate field (B, M, ...).
        Returns:
            the same fields with K rows, plus ``num_detections`` (B,).
        """
        sampler = self.model.sampler
        scores = fields["scores"].float()
        if sampler.use_nms:
            keep = class_nms_keep(
                fields["boxes"].float(), scores, fields["classes"],
                self.model.head.num_classes, float(sampler.nms_threshold),
            )  # fmt: skip
        else:
            keep = torch.ones_like(scores, dtype=torch.bool)
        num_candidates = scores.shape[1]
        cap = sampler.detections_per_image
        k = min(cap, num_candidates) if cap > 0 else num_candidates
        # Scores are probabilities (>= 0): -1 sorts every suppressed row after every kept one.
        top, index = torch.where(keep, scores, -1.0).topk(k, dim=1)  # (B, K), descending
        valid = top >= 0
        out = {"num_detections": valid.sum(dim=1)}
        for name, value in fields.items():
            rows = torch.gather(value, 1, index.view(*index.shape, *[1] * (value.dim() - 2)).expand(
                *index.shape, *value.shape[2:]))  # fmt: skip
            mask = valid.view(*valid.shape, *[1] * (value.dim() - 2))
            out[name] = torch.where(mask, rows, -1 if name == "classes" else 0)
        return out

    def extra_outputs(self, selected: Dict[str, Tensor], features: List[Tensor]) -> Dict[str, Tensor]:
        """Hook for subclasses (DiffusionInst): outputs named ``extra_output_names``, from the
        selected detections' fields (B, K, ...) and the backbone features; none here."""
        return {}

    def metadata(self) -> Dict[str, str]:
        """What a predictor needs to feed the graph and read its outputs (ONNX metadata_props)."""
        model = self.model
        return {
            "meta_architecture": type(model).__name__,
            "batch": str(self.batch),
            "height": str(self.height),
            "width": str(self.width),
            "num_boxes": str(self.num_boxes),
            "steps": str(model.sampler.steps),
            "noise": self.noise,
            "noise_draws": str(self.draws),
            "sampling_seed": str(model.sampling_seed),
        }
