#!/usr/bin/env python
"""Speed of DiffusionDet inference and training: the fast path against a plain reference path,
both measured in the same run on the same random-weight model.

    python tools/benchmark.py                    # R-50-FPN, 512x512, CPU: about 11 min on 2 cores
    python tools/benchmark.py --quick            # smoke run, about 3 min
    python tools/benchmark.py --device cuda --image-size 800 --amp bf16 --compile
    python tools/benchmark.py --quick --roofline  # time against the fp32 GEMM peak (floor)

Reference path (the official code's way): one image per call, detectron2's serial RoI pooling,
the dynamic layer unchunked, all S model calls (the official ensemble ignores the last), fp32. Its images/s is measured once per (steps, boxes) with batch 1;
at batch B it is B such calls, so the same rate applies. Fast path: the model's defaults, B
images per call. Every image draws its noise from its own seeded generator, so both paths see the
same noise and "max |Δbox|" / "max |Δscore|" compare image 0's detections across the two paths:
0 = identical, inf = different detection sets. Batched runs can differ in the last float bits
(oneDNN convolutions and ATen's vectorised elementwise kernels round differently per batch size)
and a random-weight head amplifies that; AMP rows are approximate by design, so "same top-100"
also reports how many of the reference's best detections are found again.

Shape legend: B images per call, N boxes per image, S DDIM steps (model calls).
"""
import argparse
import contextlib
import copy
import sys
from math import nan

import torch

from detectron2.modeling import build_model
from detectron2.structures import Instances, pairwise_iou

from diffusiondet.diffusion import TorchRandom
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs alike
from diffusiondet.modeling.acceleration import set_head_speed_options
from diffusiondet.modeling.acceleration.frozen_bn_folding import FoldedFrozenBNConv2d
from diffusiondet.modeling.builders import sampler_kwargs
from diffusiondet.modeling.graph_sampler import GraphBoxSampler
from diffusiondet.tooling import chunk_sweep, roofline
from diffusiondet.tooling.bench_timing import HeadTimer, PeakMemory, measure
from diffusiondet.tooling.bench_training import benchmark_training, random_images
from diffusiondet.utils.cpu_info import describe_cpu

FULL_CASES = ((1, 300), (4, 300), (1, 1000), (4, 1000), (4, 2000))
QUICK_CASES = ((1, 300), (4, 300))
UNCHUNKED = 1 << 30  # a DynamicConv chunk larger than any B·N: the official single GEMM


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="configs/diffdet.coco.res50.yaml")
    parser.add_argument("--image-size", type=int, help="input height (pixels; 512, --quick 384)")
    parser.add_argument("--image-width", type=int, default=0, help="input width (default: square)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per row, after two untimed ones (mean)")
    parser.add_argument("--batches", help="comma-separated batch sizes (1,4; --quick 1,2)")
    parser.add_argument("--cases", help="steps@boxes list replacing the default cases, e.g. 1@300,4@500")
    parser.add_argument("--roofline", action="store_true",
                        help="instead: head and backbone time against the fp32 GEMM peak")
    parser.add_argument(
        "--amp", default="bf16", choices=["", "bf16", "fp16"],
        help="also time INFERENCE_AMP at batch 1 ('' = no AMP rows)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time COMPILE_HEAD at batch 1")
    parser.add_argument("--tf32", action="store_true", help="also time TF32 matmuls (CUDA) at every batch")
    parser.add_argument(
        "--graph", action="store_true",
        help="also time SAMPLING_MODE graph, eager and with COMPILE_SAMPLING_STEP, at every batch",
    )  # fmt: skip
    parser.add_argument("--graph-backend", default="inductor", help="torch.compile backend of --graph")
    parser.add_argument("--train-iters", type=int, default=1, help="timed training iterations")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: steps/boxes (1,300),(4,300); batches 1,2 and 384 px unless given",
    )  # fmt: skip
    parser.add_argument("--chunk-sweep", action="store_true",
                        help="time DynamicConv at several chunk sizes instead (diffusiondet.tooling.chunk_sweep)")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="with --chunk-sweep: run as an AVX2-only machine with one thread")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args()


def set_path(model, reference: bool, amp: str = "") -> None:
    """Switch ``model`` between the reference and the fast path in place (weights untouched)."""
    set_head_speed_options(
        model.head,
        dynamic_chunk_size=UNCHUNKED if reference else 0,
        pooler_threads=1 if reference else 0,
    )
    model.sampler.skip_unused_calls = not reference
    model.inference_amp = amp
    model.fixed_shape_pooling = not reference
    for layer in model.backbone.modules():  # FOLD_FROZEN_BN: the reference runs detectron2's BN
        if isinstance(layer, FoldedFrozenBNConv2d):
            layer.fold = not reference


def per_image_rngs(count: int):
    return [TorchRandom(generator=torch.Generator().manual_seed(seed)) for seed in range(count)]


def timed_inference(model, images, head_timer, memory, repeats):
    """Mean seconds per call (whole call, head only) of ``model.inference`` after the timer's
    warm-up calls (which also compile a compiled model); peak MB of the first call; the outputs."""
    outputs, result = [], {}

    def infer():
        # Probed on the first call, an untimed warm-up: the cold call's peak, as a single call
        # has it, and the probe's /proc reads stay out of the timed calls.
        probe = memory.measure(result) if not result else contextlib.nullcontext()
        with probe:
            outputs[:] = model.inference(images, per_image_rng=per_image_rngs(len(images)))

    wall = measure(infer, model.device, repeats, setup=head_timer.reset).mean
    return wall, head_timer.total / repeats, result["peak_mb"], outputs


def detection_difference(a: Instances, b: Instances):
    """(max |Δbox|, max |Δscore|) of two detection sets; inf if their sizes or classes differ."""
    if len(a) != len(b) or not torch.equal(a.pred_classes, b.pred_classes):
        return float("inf"), float("inf")
    if len(a) == 0:
        return 0.0, 0.0
    box = (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max().item()
    return box, (a.scores - b.scores).abs().max().item()


def shared_fraction(a: Instances, b: Instances, top: int = 100, min_iou: float = 0.9) -> float:
    """Share of b's ``top`` best detections that ``a`` also has (same class, IoU >= min_iou)."""
    order = torch.argsort(b.scores, descending=True)[:top]
    if len(order) == 0:
        return 1.0
    if len(a) == 0:
        return 0.0
    iou = pairwise_iou(b.pred_boxes[order], a.pred_boxes)  # (top, len(a))
    same_class = b.pred_classes[order][:, None] == a.pred_classes[None, :]
    return ((iou >= min_iou) & same_class).any(dim=1).float().mean().item()


def benchmark_inference(model, compiled, graph_models, args, cases, batches, head_timer, memory):
    """One row per (mode, steps, boxes, batch); the reference runs once per (steps, boxes).
    ``graph_models``: mode name -> a copy of the model with the graph sampler."""
    rows = []
    images = random_images(max(batches), args.image_size, width=args.image_width)
    for steps, boxes in cases:
        for m in (model, compiled):
            if m is not None:
                m.sampler.steps, m.eval_num_proposals = steps, boxes
        set_path(model, reference=True)
        ref_wall, ref_head, ref_mem, ref_out = timed_inference(
            model, images[:1], head_timer, memory, args.repeats
        )
        reference = ref_out[0]["instances"]
        modes = [("fast", b, "") for b in batches]
        modes += [(f"fast+{args.amp}", 1, args.amp)] if args.amp else []
        modes += [("fast+tf32", b, "tf32") for b in batches] if args.tf32 else []
        modes += [("fast+compile", 1, "compile")] if compiled is not None else []
        for name, graph_model in graph_models.items():
            graph_model.sampler.steps, graph_model.eval_num_proposals = steps, boxes
            modes += [(name, b, name) for b in batches]
        for mode, batch, amp in modes:
            run_model = {"compile": compiled, **graph_models}.get(amp, model)
            set_path(run_model, reference=False, amp=amp if amp in ("bf16", "fp16") else "")
            tf32 = torch.backends.cuda.matmul.allow_tf32  # ALLOW_TF32's switch
            torch.backends.cuda.matmul.allow_tf32 = tf32 or amp == "tf32"
            wall, head, mem, out = timed_inference(
                run_model, images[:batch], head_timer, memory, args.repeats
            )
            torch.backends.cuda.matmul.allow_tf32 = tf32
            fast = out[0]["instances"]
            dbox, dscore = detection_difference(fast, reference)
            rows.append(dict(
                mode=mode, steps=steps, boxes=boxes, batch=batch, dbox=dbox, dscore=dscore,
                ips=batch / wall, ref_ips=1 / ref_wall, head_ips=batch / head if head else nan,
                ref_head_ips=1 / ref_head, shared=shared_fraction(fast, reference),
                mem=mem, ref_mem=ref_mem,
            ))  # fmt: skip
            print(f"  {mode} S={steps} N={boxes} B={batch}: {wall:.2f} s "
                  f"(reference {ref_wall * batch:.2f} s)", flush=True)  # fmt: skip
    return rows


def print_table(rows, args, backbone_s, train_ips, model) -> None:
    size = f"{args.image_size}x{args.image_width or args.image_size}"
    print(f"\n## {model.__class__.__name__} benchmark: {args.config_file}, {size}, device {args.device}, "
          f"{describe_cpu()}, repeats {args.repeats}, random weights\n")
    print(f"Backbone alone, 1 image: {backbone_s:.2f} s. head img/s = images / time inside the "
          "head (all steps). peak MB = peak memory above the level before the call (CPU: "
          "process RSS). same top-100 = share of the reference's 100 best detections found "
          "again (same class, IoU >= 0.9).\n")
    print("| mode | steps | boxes | batch | img/s fast | img/s ref | ratio | head img/s fast "
          "| head img/s ref | head ratio | max abs Δbox | max abs Δscore | same top-100 "
          "| peak MB fast | peak MB ref |")
    print("|" + " --- |" * 15)
    for r in rows:
        print(f"| {r['mode']} | {r['steps']} | {r['boxes']} | {r['batch']} | {r['ips']:.3f} "
              f"| {r['ref_ips']:.3f} | {r['ips'] / r['ref_ips']:.2f} | {r['head_ips']:.3f} "
              f"| {r['ref_head_ips']:.3f} | {r['head_ips'] / r['ref_head_ips']:.2f} "
              f"| {r['dbox']:.1e} | {r['dscore']:.1e} | {r['shared']:.0%} | {r['mem']:.0f} "
              f"| {r['ref_mem']:.0f} |")
    if train_ips is not None:
        fast, ref, loss_diff = train_ips
        print(f"\nTraining (batch 2, {size}, {model.num_proposals} proposals): {fast:.3f} "
              f"iterations/s, reference path {ref:.3f}, time ratio fast/reference "
              f"{ref / fast:.2f}; first-iteration losses max |Δ| {loss_diff:.1e}")


def main():
    args = parse_args()
    if args.chunk_sweep:
        return chunk_sweep.run(repeats=max(args.repeats, 5), emulate_avx2=args.emulate_avx2)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        cases = [tuple(int(v) for v in case.split("@")) for case in args.cases.split(",")]
    if args.quick:  # --quick's sizes, unless --batches / --image-size are given
        args.batches, args.image_size = args.batches or "1,2", args.image_size or 384
    args.batches, args.image_size = args.batches or "1,4", args.image_size or 512
    batches = [int(b) for b in args.batches.split(",")]
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device] + args.opts
    cfg = build_config(args.config_file, opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.roofline:  # a mode of its own: the head alone on precomputed features, fp32
        print(roofline.report(model, args.config_file, args.image_size, cases, batches, args.repeats))
        return 0
    compiled = None
    if args.compile:  # a copy, so that the reference path stays eager
        compiled = copy.deepcopy(model)
        for stage in compiled.head.head_series:
            stage.compile(dynamic=True)
    graph_models = {}
    if args.graph:  # copies made before the timing hooks: a fullgraph step cannot call them
        for name, compile_step in (("graph", False), ("graph+compile", True)):
            graph_models[name] = copy.deepcopy(model)
            graph_models[name].sampler = GraphBoxSampler(
                compile_step=compile_step, compile_backend=args.graph_backend, **sampler_kwargs(cfg)
            )
    head_timer = HeadTimer(model.device)
    for m in (model, compiled, graph_models.get("graph")):
        if m is not None:
            head_timer.attach(m.head)
    memory = PeakMemory(model.device)

    # Warm-up (allocator, MKL / cuDNN plans) on a tiny case, then the backbone alone.
    model.sampler.steps, model.eval_num_proposals = 1, 50
    model.inference(random_images(1, args.image_size))
    with torch.no_grad():
        images, _ = model.preprocess_image(random_images(1, args.image_size, width=args.image_width))
        backbone_s = measure(lambda: model.extract_features(images), model.device, 1).mean

    rows = benchmark_inference(
        model, compiled, graph_models, args, cases, batches, head_timer, memory
    )
    train_ips = benchmark_training(cfg, model, args) if args.train_iters > 0 else None
    print_table(rows, args, backbone_s, train_ips, model)


if __name__ == "__main__":
    sys.exit(main())
