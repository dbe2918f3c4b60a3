"""Parameters and FLOPs of a built detector, per component, per call and per image
(``tools/analyze_model.py``; docs/speed.md, "Parameters and FLOPs").

What one image of (H, W) pixels costs at S sampling steps, N boxes and M detections:

==========================================  ==================================================
component                                   calls per image
==========================================  ==================================================
backbone (incl. FPN), or its parts          1
head, one sampling step (all stages)        ``sampler.model_calls(S)``: S, or S - 1 when
                                            SKIP_UNUSED_CALLS drops an unused last call
per-image head outputs (DiffusionInst:      1 (``head.per_image_outputs``)
the mask branch)
per-detection outputs (DiffusionInst: the   M (``build_instances`` of one detection)
dynamic mask head)
==========================================  ==================================================

Counting: ``torch.utils.flop_counter.FlopCounterMode`` through :func:`roofline.count_flops`,
the counter the roofline already uses, so both report the same numbers. It counts at the
dispatcher, so it needs no tracing and runs on ``meta`` tensors, where a model costs its shapes
only. fvcore's ``FlopCountAnalysis`` was the alternative: it traces with ``torch.jit`` (real
tensors, a graph per input, warnings on the head's Python control flow) and counts one per
multiply-add. Convention: **FLOPs = 2 × MACs**. Counted ops: ``mm``, ``addmm``, ``bmm``,
``baddbmm`` (every Linear, einsum and matmul lowers to them), convolutions, and attention (run
on the math backend, i.e. as ``bmm``). Not counted: normalisation, activations, softmax,
elementwise and pointwise work, RoI pooling, interpolation, NMS, the DDIM update.

Where it runs: the model is built on CPU with random weights (nothing is loaded). The head's
step runs there once, at the real N: its RoI pooling assigns boxes to levels with
data-dependent shapes and asks autocast about the features' device, which ``meta`` tensors
cannot answer; its counted FLOPs depend on N and the widths only, not on the values or the
feature maps' size. Then the model moves to ``meta`` and everything else is counted there
(shapes only: milliseconds whatever the image size).

Shape legend: (H, W) image size, (Hp, Wp) padded to the backbone's divisibility, C channels.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from detectron2.structures import ImageList

from diffusiondet.modeling.acceleration import pooling_for_sampling
from diffusiondet.modeling.inference import ImageContext
from diffusiondet.tooling.roofline import count_flops, random_boxes

__all__ = [
    "Analysis", "BackboneParts", "Component", "analyze_model", "backbone_components",
    "count_with_modules", "format_analysis", "padded_size", "params_of",
]  # fmt: skip

BACKBONE, HEAD, PER_IMAGE, PER_DETECTION = "backbone", "head", "per_image", "per_detection"


@dataclass(frozen=True)
class Component:
    """One row: ``flops`` per call, ``calls`` per image, ``kind`` one of the names above (or a
    caller's own, e.g. a frozen part run once at build time with 0 calls)."""

    name: str
    params: int
    flops: float
    calls: int
    kind: str

    @property
    def total(self) -> float:
        return self.flops * self.calls


@dataclass
class Analysis:
    """The components of one model at (steps, boxes, detections, image_size)."""

    components: List[Component]
    steps: int
    boxes: int
    detections: int
    image_size: Tuple[int, int]
    padded_size: Tuple[int, int]
    notes: List[str] = field(default_factory=list)

    @property
    def total_flops(self) -> float:
        return sum(c.total for c in self.components)

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components)

    def of_kind(self, kind: str) -> List[Component]:
        return [c for c in self.components if c.kind == kind]


# Backbone parts: (backbone, (1, 3, Hp, Wp) meta images) -> its components, its output features.
BackboneParts = Callable[[nn.Module, torch.Tensor], Tuple[List[Component], Dict[str, torch.Tensor]]]


def params_of(modules: Iterable[nn.Module]) -> int:
    """Parameters of ``modules`` and their submodules, each tensor once."""
    unique = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(unique.values())


def count_with_modules(fn: Callable[[], object], modules: Iterable[nn.Module]):
    """(FLOPs, result, the modules of ``modules`` that ran) of one call of ``fn``."""
    called, result = {}, {}

    def record(module, _inputs):  # returns None: the inputs pass unchanged
        called[id(module)] = module

    hooks = [m.register_forward_pre_hook(record) for m in modules]
    try:
        flops = count_flops(lambda: result.setdefault("out", fn()))
    finally:
        for hook in hooks:
            hook.remove()
    return flops, result["out"], list(called.values())


def padded_size(backbone: nn.Module, image_hw: Tuple[int, int]) -> Tuple[int, int]:
    """(Hp, Wp): the size ``preprocess_image`` pads an (H, W) image to for this backbone."""
    images = ImageList.from_tensors([torch.empty(3, *image_hw, device="meta")], backbone.size_divisibility,
                                    padding_constraints=backbone.padding_constraints)  # fmt: skip
    return tuple(images.tensor.shape[-2:])


def backbone_components(backbone: nn.Module, images: torch.Tensor):
    """The default :data:`BackboneParts`: the whole backbone as one component."""
    flops, features, _ = count_with_modules(lambda: backbone(images), ())
    return [Component("backbone (incl. FPN)", params_of([backbone]), flops, 1, BACKBONE)], features


def _head_step(model, image_hw, padded, num_boxes: int):
    """FLOPs of one sampling step's model call (on CPU, pooling as at inference) and its
    final-stage outputs: zero (1, C, ceil(Hp/s), ceil(Wp/s)) maps, N random boxes inside the
    image, t = T - 1."""
    shapes = model.backbone.output_shape()
    features = [torch.zeros(1, shapes[f].channels, math.ceil(padded[0] / shapes[f].stride),
                            math.ceil(padded[1] / shapes[f].stride)) for f in model.in_features]  # fmt: skip
    boxes = random_boxes(1, num_boxes, *image_hw, device="cpu")
    t = torch.full((1,), model.num_timesteps - 1, dtype=torch.long)
    with pooling_for_sampling(model, features) as pool_input:
        flops, out, _ = count_with_modules(lambda: model.denoise(pool_input, boxes, t), ())
    return flops, out, [tuple(f.shape) for f in features]


def analyze_model(model, steps: int, boxes: int, image_hw: Sequence[int], detections: Optional[int] = None,
                  backbone_parts: BackboneParts = backbone_components) -> Analysis:  # fmt: skip
    """Count ``model`` (built on CPU) at S = ``steps``, N = ``boxes`` and an (H, W) ``image_hw``
    input. **Moves the model to the meta device**: it is of no use afterwards.

    Args:
        detections: M, detections per image that get per-detection outputs (DiffusionInst's
            masks); default the model's cap (DETECTIONS_PER_IMAGE) or, uncapped, N.
        backbone_parts: how the backbone splits into components (a frozen SD backbone: VAE
            encoder, U-Net, channel mapper); default the whole backbone as one.
    """
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    model.eval()
    cap = model.sampler.detections_per_image
    count = detections if detections is not None else (cap or boxes)
    padded = padded_size(model.backbone, image_hw)
    head_flops, head_out, head_shapes = _head_step(model, image_hw, padded, boxes)

    model.to("meta")
    images = torch.empty(1, 3, *padded, device="meta")
    components, features = backbone_parts(model.backbone, images)
    features = [features[f] for f in model.in_features]
    if [tuple(f.shape) for f in features] != head_shapes:  # the head must have seen these maps
        raise RuntimeError(f"backbone maps {[tuple(f.shape) for f in features]}, head ran on {head_shapes}")

    head = model.head
    image_flops, per_image, used = count_with_modules(lambda: head.per_image_outputs(features), head.modules())
    image_params = params_of(used)
    stages, calls = len(head.head_series), model.sampler.model_calls(steps)
    components.append(Component(f"head, one sampling step ({stages} stages)", params_of([head]) - image_params,
                                head_flops, calls, HEAD))  # fmt: skip
    if per_image:
        components.append(Component(f"per-image head outputs ({', '.join(per_image)})", image_params,
                                    image_flops, 1, PER_IMAGE))  # fmt: skip
    # One detection with the final stage's per-proposal outputs; its cost is per detection
    # (each one's own filters run on the image's map), so M of them cost M times as much.
    det = {"boxes": torch.zeros(1, 4, device="meta"), "scores": torch.zeros(1, device="meta"),
           "classes": torch.zeros(1, dtype=torch.long, device="meta")}  # fmt: skip
    det.update({k: torch.zeros(1, *v.shape[2:], dtype=v.dtype, device="meta")
                for k, v in head_out.items() if k not in ("pred_logits", "pred_boxes")})  # fmt: skip
    ctx = ImageContext(index=0, image_size=image_hw, padded_size=padded, output_size=image_hw,
                       per_image={k: v[0] for k, v in per_image.items()})  # fmt: skip
    det_flops, instances, _ = count_with_modules(lambda: model.build_instances(det, ctx), ())
    if det_flops:
        fields = [k for k in instances.get_fields() if k not in ("pred_boxes", "scores", "pred_classes")]
        components.append(Component(f"per-detection outputs ({', '.join(fields)})", 0, det_flops,
                                    count, PER_DETECTION))  # fmt: skip
    other = params_of([model]) - params_of([model.backbone, head])
    if other:
        components.append(Component("other parameters", other, 0.0, 0, "other"))
    notes = [] if calls == steps else [f"{steps} steps make {calls} model calls: SKIP_UNUSED_CALLS drops the "
                                       "last one, whose outputs the official ensemble ignores."]  # fmt: skip
    if det_flops and detections is None and not cap:
        notes.append(f"M = N = {boxes} by default: the model keeps every detection after NMS (how many "
                     "survive depends on the image); --detections sets M.")  # fmt: skip
    return Analysis(components, steps, boxes, count, image_hw, padded, notes)


def _num(value: float) -> str:
    return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def format_analysis(analysis: Analysis, title: str = "") -> str:
    """A Markdown table of ``analysis``: params (millions), GFLOPs per call, calls per image and
    GFLOPs per image, then the total row and the counting convention."""
    a = analysis
    lines = [title] if title else []
    (h, w), (hp, wp) = a.image_size, a.padded_size
    lines.append(f"S = {a.steps} steps, N = {a.boxes} boxes, M = {a.detections} detections, "
                 f"image {h}×{w} (padded {hp}×{wp})\n")  # fmt: skip
    lines.append("| component | params (M) | GFLOPs / call | calls / image | GFLOPs / image |")
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for c in a.components:
        row = (c.name, _num(c.params / 1e6), _num(c.flops / 1e9), c.calls, _num(c.total / 1e9))
        lines.append("| " + " | ".join(map(str, row)) + " |")
    lines.append(f"| **total** | {_num(a.total_params / 1e6)} | | | **{_num(a.total_flops / 1e9)}** |")
    lines.append("\nFLOPs = 2 × MACs (torch.utils.flop_counter.FlopCounterMode): matmuls, Linear layers, "
                 "convolutions and attention; norms, activations, elementwise ops, RoI pooling, "
                 "interpolation and NMS are not counted.")  # fmt: skip
    lines.extend(a.notes)
    return "\n".join(lines)
