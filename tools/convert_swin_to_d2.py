#!/usr/bin/env python
"""Convert an original Swin Transformer ImageNet checkpoint (.pth) to a detectron2 .pkl.

    python tools/convert_swin_to_d2.py swin_base_patch4_window7_224_22k.pth models/swin_base_patch4_window7_224_22k.pkl

The .pkl is what the *.swinbase.yaml configs name in MODEL.WEIGHTS; detectron2's checkpointer
matches its keys (layers.*, patch_embed.*) to backbone.bottom_up.* by suffix. The classifier
(head.*, norm.*) and the attention masks are left out: see
diffusiondet.modeling.backbone.swin_fpn.convert_swin_classification_checkpoint.
"""
import argparse

import torch

from diffusiondet.modeling.backbone.d2_pickle import write_d2_pickle
from diffusiondet.modeling.backbone.swin_fpn import convert_swin_classification_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="original Swin .pth ({'model': state_dict})")
    parser.add_argument("output", help="detectron2 .pkl to write")
    args = parser.parse_args(argv)

    # weights_only: the release files hold tensors and plain containers only.
    checkpoint = torch.load(args.source, map_location="cpu", weights_only=True)
    converted = convert_swin_classification_checkpoint(checkpoint)
    write_d2_pickle(converted, args.output)
    print(f"wrote {len(converted['model'])} tensors to {args.output}")


if __name__ == "__main__":
    main()
