#!/usr/bin/env python
"""Host syncs of one batched inference in each sampling mode, counted on CPU.

    python tools/dev/count_host_syncs.py --steps 4 --boxes 100 --batch 2

Counts the operations that make a GPU host wait (``diffusiondet.tooling.host_syncs``) inside the
sampling loop and over sampling + post-processing, for SAMPLING_MODE parity (with detectron2's
pooler, as on a GPU) and graph, on random images and random weights.
"""
import argparse
import sys

import torch

from detectron2.modeling import build_model

from diffusioninst import build_config
from diffusiondet.modeling.acceleration import pooling_for_sampling
from diffusiondet.tooling.host_syncs import HostSyncCounter


def count(cfg, batch: int):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    size = cfg.INPUT.MIN_SIZE_TEST
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, size, size + 16 * b), generator=g, dtype=torch.uint8)}
              for b in range(batch)]  # fmt: skip
    images, whwh, features = model.inference_features(inputs)
    with HostSyncCounter() as loop, pooling_for_sampling(model, features) as pool_input:
        model.sampler.sample_candidates(
            lambda boxes, t: model.denoise(pool_input, boxes, t), model.alphas_cumprod, whwh,
            model.eval_num_proposals,
        )  # fmt: skip
    with HostSyncCounter() as whole:
        model.sample_detections(inputs, images, whwh, features)
    return loop, whole


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/diffdet.synthetic.res18.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    print("| mode | in the sampling loop | sampling + post-processing | by op (whole) |")
    print("| --- | ---: | ---: | --- |")
    for mode in ("parity", "graph"):
        opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.DiffusionDet.SAMPLING_MODE", mode,
                "MODEL.DiffusionDet.SAMPLE_STEP", args.steps, "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS",
                args.boxes, "MODEL.DiffusionDet.FIXED_SHAPE_POOLING", False, *args.opts]  # fmt: skip
        loop, whole = count(build_config(args.config_file, opts), args.batch)
        by_op = ", ".join(f"{k} {v}" for k, v in sorted(whole.by_op.items()))
        print(f"| {mode} | {loop.total} | {whole.total} | {by_op} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
