#!/usr/bin/env python
"""Convert a torchvision ImageNet ResNet checkpoint to the detectron2 ``.pkl`` the configs load.

    python tools/convert_torchvision_resnet_to_d2.py \
        resnet101-63fe2227.pth models/torchvision-R-101.pkl

The input is a torchvision state dict (as downloaded from torchvision), or a dict holding one
under ``"state_dict"`` or ``"model"``; any depth works (18/34 BasicBlock, 50/101/152
Bottleneck).  The output is read by ``DetectionCheckpointer`` through ``MODEL.WEIGHTS`` (the
official ResNet-101 configs expect ``models/torchvision-R-101.pkl``, with
``RESNETS.STRIDE_IN_1X1 False`` since torchvision strides in the 3x3 conv).  The renaming lives in
``diffusiondet.modeling.backbone.resnet_weights``.
"""
import argparse
import sys

import torch

from diffusiondet.modeling.backbone.resnet_weights import save_d2_pickle, torchvision_resnet_to_d2


def load_state_dict(path):
    """The tensors of the checkpoint at ``path`` (unwrapped from a state_dict/model entry)."""
    # weights_only: a torchvision checkpoint is plain tensors; refuse to run pickled code.
    data = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            return data[wrapper]
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="torchvision ResNet checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 pickle to write (.pkl)")
    args = parser.parse_args(argv)
    state_dict = load_state_dict(args.input)
    try:
        converted = torchvision_resnet_to_d2(state_dict)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {args.input}: {e}\n")
    count = save_d2_pickle(converted, args.output, author="torchvision")
    dropped = len(state_dict) - count
    print(f"Converted {count} tensors ({dropped} dropped: fc, num_batches_tracked) "
          f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
