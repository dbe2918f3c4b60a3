"""The training part of ``tools/benchmark.py``: the default path against the reference path
(serial RoIAlign backward, torch's unfused AdamW) from the same weights, batch and noise; and the
random images and training batch that ``tools/dev/profile_speed.py`` profiles too."""
import copy
import itertools

import torch

from detectron2.structures import BitMasks, Boxes, Instances

from diffusiondet.engine import build_optimizer
from diffusiondet.tooling.bench_timing import measure


def random_images(count: int, size: int, seed: int = 0, width: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, size, width or size)
    return [{"image": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)}
            for _ in range(count)]  # fmt: skip


def training_batch(cfg, size: int):
    """Two random images with 8 random GT boxes each (and box-filling masks for DiffusionInst)."""
    g = torch.Generator().manual_seed(1)
    batch, num_gt = [], 8
    for image in random_images(2, size, seed=1):
        xy = torch.rand(num_gt, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(num_gt, 2, generator=g) * size * 0.3
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        num_classes = cfg.MODEL.DiffusionDet.NUM_CLASSES
        inst.gt_classes = torch.randint(0, num_classes, (num_gt,), generator=g)
        if cfg.MODEL.MASK_ON:  # DiffusionInst: each object's mask fills its box
            inst.gt_masks = BitMasks.from_polygon_masks(
                [[box[[0, 1, 2, 1, 2, 3, 0, 3]].numpy()] for box in inst.gt_boxes.tensor], size, size
            )
        batch.append(dict(image, instances=inst))
    return batch


def benchmark_training(cfg, model, args):
    """Training iterations/s of the default path and of the reference path (serial RoIAlign
    backward, torch's unfused AdamW), batch 2, after the timer's two untimed warm-up iterations,
    both from the same weights; and the largest difference of their first losses (same batch,
    same noise)."""
    batch, results = training_batch(cfg, args.image_size), {}
    for path in ("reference", "fast"):
        run_cfg = cfg.clone()
        run_cfg.defrost()
        run_cfg.SOLVER.FUSED_ADAMW = path == "fast"
        run_model = copy.deepcopy(model).train()
        run_model.head.box_pooler.threaded_backward = path == "fast"
        optimizer = build_optimizer(run_cfg, run_model)
        seeds, first = itertools.count(), {}

        def iteration():
            torch.manual_seed(next(seeds))  # the same noise on both paths
            losses = run_model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            if not first:
                first.update({k: v.item() for k, v in losses.items()})

        seconds = measure(iteration, run_model.device, args.train_iters).mean
        results[path] = (1 / seconds, first)
    loss_diff = max(abs(results["fast"][1][k] - v) for k, v in results["reference"][1].items())
    return results["fast"][0], results["reference"][0], loss_diff
