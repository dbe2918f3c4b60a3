"""How far the head and the backbone run from this machine's fp32 GEMM peak (a roofline floor).

The floor of a model part is its FLOPs divided by the peak GFLOP/s of one large fp32 ``torch.mm``
on the same device and thread count; "× floor" = measured time / floor. It tells whether a
speed-up can still come from the code (large ratio: time goes to memory traffic, pooling,
small GEMMs, Python) or only from the arithmetic itself (ratio near 1: bf16 / TF32, fewer FLOPs).

Head FLOPs are counted analytically (:func:`head_flops`) from the built head's real dimensions,
per model call, GEMMs only (2·m·n·k each): RoI pooling, LayerNorm and elementwise work add time
but no FLOPs, so they show up in the ratio. ``tests/test_roofline.py`` checks the count against
``torch.utils.flop_counter.FlopCounterMode``. The backbone's FLOPs come from that counter.

Shape legend: B images, N boxes per image, M = B·N proposals, D = hidden_dim, DD = dim_dynamic,
P = pooler_resolution² RoI bins, U distinct timesteps in one call (1 at inference).
"""
from typing import Callable, Dict, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusiondet.modeling.acceleration import pooling_for_sampling
from diffusiondet.tooling.bench_timing import best_of, measure
from diffusiondet.utils.cpu_info import describe_cpu

__all__ = [
    "backbone_roofline", "count_flops", "describe_device", "format_roofline", "gemm_peak_gflops",
    "head_flops", "head_roofline", "random_boxes", "report", "roofline_row", "run",
]  # fmt: skip

# Linears of a stage that head_flops counts under their own component; every other Linear of
# the stage (towers, logits, box deltas, a subclass's extra layers) goes to "towers".
_OWN_COMPONENT = ("inst_interact.", "linear1", "linear2", "block_time_mlp.", "self_attn.")


def gemm_peak_gflops(device: torch.device, n: int = 2048, repeats: int = 3) -> float:
    """fp32 GFLOP/s of an n×n×n ``torch.mm`` (2·n³ FLOPs), best of ``repeats``.

    The best, not the median: the peak is the machine's ceiling, and on a shared machine the
    slower runs measure the other jobs. Runs with the current torch thread count.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    return 2 * n**3 / best_of(lambda: torch.mm(a, b), device, repeats) / 1e9


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs that FlopCounterMode sees in one call of ``fn`` (mm, addmm, bmm, convs, attention)."""
    # The counter knows no formula for the fused CPU attention kernel and would count its Q·Kᵀ
    # and softmax·V as 0; the math backend runs them as bmm, which it counts.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _linear(layer: nn.Linear, rows: int) -> float:
    return 2.0 * rows * layer.in_features * layer.out_features


def head_flops(head: nn.Module, num_boxes: int, batch: int = 1, timesteps: int = 1) -> Dict[str, float]:
    """GEMM FLOPs of one call of a :class:`DynamicHead`, by component (keys below) and "total".

    Dimensions are read off ``head`` itself, so any config (and DiffusionInst's extra stage
    Linears, under "towers") is counted as built. ``timesteps`` = U, distinct timesteps.
    """
    m = batch * num_boxes
    flops = dict.fromkeys(
        ("dynamic_params", "dynamic_bmm", "projection", "attention", "ffn", "towers", "time_mlp"), 0.0
    )
    flops["time_mlp"] = sum(_linear(l, timesteps) for l in head.time_mlp if isinstance(l, nn.Linear))
    for stage in head.head_series:
        conv = stage.inst_interact
        d, dd = conv.hidden_dim, conv.dim_dynamic
        bins = conv.out_layer.in_features // d  # P
        # Per proposal: a D → 2·D·DD Linear makes its two 1×1 conv weights, (P, D)·(D, DD) and
        # (P, DD)·(DD, D) apply them, and a (P·D) → D Linear projects the result.
        flops["dynamic_params"] += _linear(conv.dynamic_layer, m)
        flops["dynamic_bmm"] += 2.0 * (2 * m * bins * d * dd)
        flops["projection"] += _linear(conv.out_layer, m)
        # Q, K, V and output projections, then Q·Kᵀ and softmax·V within each image (N² per
        # image, summed over heads = full width D).
        attn = stage.self_attn
        flops["attention"] += 2.0 * m * d * attn.in_proj_weight.shape[0] + _linear(attn.out_proj, m)
        flops["attention"] += 2.0 * (2 * batch * num_boxes**2 * d)
        flops["ffn"] += _linear(stage.linear1, m) + _linear(stage.linear2, m)
        flops["time_mlp"] += _linear(stage.block_time_mlp[1], timesteps)
        for name, layer in stage.named_modules():
            if isinstance(layer, nn.Linear) and not name.startswith(_OWN_COMPONENT):
                flops["towers"] += _linear(layer, m)
    flops["total"] = sum(flops.values())
    return flops


def roofline_row(name: str, flops: float, seconds: float, peak_gflops: float) -> Dict:
    """Achieved GFLOP/s and time / (FLOPs / peak) ("× floor") of one measured part."""
    floor = flops / (peak_gflops * 1e9)
    return dict(name=name, gflop=flops / 1e9, seconds=seconds, gflops=flops / seconds / 1e9,
                floor_s=floor, x_floor=seconds / floor)  # fmt: skip


def random_boxes(batch: int, num_boxes: int, height: int, width: int, device) -> torch.Tensor:
    """(B, N, 4) abs xyxy boxes inside the image, at least 8 px wide and high."""
    g = torch.Generator().manual_seed(0)
    size = torch.tensor([width, height], dtype=torch.float32)
    xy = torch.rand(batch, num_boxes, 2, generator=g) * (size - 8)
    wh = 8 + torch.rand(batch, num_boxes, 2, generator=g) * (size - 8 - xy)
    return torch.cat([xy, xy + wh], dim=-1).to(device)


def head_roofline(model, features: Sequence[torch.Tensor], image_hw, num_boxes: int,
                  peak_gflops: float, repeats: int = 3) -> Dict:  # fmt: skip
    """Mean time of ``model.head`` alone (one call, one shared timestep, pooling as at
    inference, the features' packing included) on ``features``."""
    batch = features[0].shape[0]
    boxes = random_boxes(batch, num_boxes, *image_hw, device=features[0].device)
    t = torch.full((batch,), 999, dtype=torch.long, device=boxes.device)
    with pooling_for_sampling(model, list(features)), torch.no_grad():
        seconds = measure(lambda: model.head(list(features), boxes, t), boxes.device, repeats).mean
    flops = head_flops(model.head, num_boxes, batch)["total"]
    row = roofline_row(f"head N={num_boxes} B={batch}", flops, seconds, peak_gflops)
    return dict(row, boxes=num_boxes, batch=batch)


def backbone_roofline(model, images: torch.Tensor, peak_gflops: float, repeats: int = 3) -> Dict:
    """Counted FLOPs and mean time of ``model.backbone`` on a (B, 3, H, W) normalised batch."""
    flops = count_flops(lambda: model.backbone(images))
    with torch.no_grad():
        seconds = measure(lambda: model.backbone(images), images.device, repeats).mean
    name = f"backbone {images.shape[-2]}x{images.shape[-1]} B={images.shape[0]}"
    return roofline_row(name, flops, seconds, peak_gflops)


def run(model, image_size: int, cases, batches, repeats: int = 3, gemm_n: int = 2048) -> Dict:
    """Peak, backbone row (batch 1) and one head row per distinct (boxes, batch) of ``cases``."""
    peak = gemm_peak_gflops(model.device, gemm_n)
    g = torch.Generator().manual_seed(0)
    shape = (3, image_size, image_size)
    raw = [{"image": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)}
           for _ in range(max(batches))]  # fmt: skip
    with torch.no_grad():
        images, _ = model.preprocess_image(raw)
        backbone = backbone_roofline(model, images.tensor[:1], peak, repeats)
        features = model.extract_features(images)
    heads = [head_roofline(model, [f[:b] for f in features], images.image_sizes[0], n, peak, repeats)
             for n in sorted({n for _, n in cases}) for b in batches]  # fmt: skip
    # Model calls per image of S steps: the sampler skips the last call when nothing uses it.
    calls = [(s, n, model.sampler.model_calls(s)) for s, n in cases]
    return dict(peak_gflops=peak, gemm_n=gemm_n, backbone=backbone, heads=heads, calls=calls,
                parts=head_flops(model.head, cases[0][1]), parts_boxes=cases[0][1])  # fmt: skip


def describe_device(device: torch.device) -> str:
    """The accelerator's name on CUDA, else the CPU line of ``describe_cpu``."""
    cpu = describe_cpu()
    return f"{torch.cuda.get_device_name(device)}; host {cpu}" if device.type == "cuda" else cpu


def format_roofline(result: Dict, header: str = "") -> str:
    """Markdown table of :func:`run`'s result, then per-case totals and the FLOP breakdown."""
    n = result["gemm_n"]
    lines = [header] if header else []
    lines.append(f"fp32 GEMM peak ({n}x{n}x{n} torch.mm, best of 3): {result['peak_gflops']:.1f} GFLOP/s\n")
    lines.append("| part | GFLOP / call | ms / call | GFLOP/s | floor ms | × floor |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in [result["backbone"]] + result["heads"]:
        lines.append(f"| {r['name']} | {r['gflop']:.2f} | {r['seconds'] * 1e3:.1f} | {r['gflops']:.1f} "
                     f"| {r['floor_s'] * 1e3:.1f} | {r['x_floor']:.1f} |")  # fmt: skip
    lines.append("\nHead rows: one model call, all stages, RoI pooling included. FLOPs are GEMMs only: "
                 "pooling, LayerNorm and elementwise work add time but no FLOPs. One shared "
                 "timestep, the model's default speed options, fp32. floor = FLOPs / peak, "
                 "× floor = time / floor.")  # fmt: skip
    for steps, boxes, calls in result["calls"]:
        row = next(r for r in result["heads"] if r["boxes"] == boxes)
        lines.append(f"S={steps}, N={boxes}: {calls} model calls per image, "
                     f"{calls * row['gflop'] / row['batch']:.1f} GFLOP and "
                     f"{calls * row['seconds'] / row['batch']:.2f} s of head per image (B={row['batch']})")
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in result["parts"].items())
    lines.append(f"Head GFLOP per call at N={result['parts_boxes']}, B=1: {parts}")
    return "\n".join(lines)


def report(model, config_file: str, image_size: int, cases, batches, repeats: int = 3) -> str:
    """``tools/benchmark.py --roofline``: measure (:func:`run`) and format, with a header line."""
    result = run(model, image_size, cases, batches, max(repeats, 3))
    header = (f"## Roofline: {config_file}, {image_size}x{image_size}, random weights, "
              f"{describe_device(model.device)}\n")  # fmt: skip
    return format_roofline(result, header)
