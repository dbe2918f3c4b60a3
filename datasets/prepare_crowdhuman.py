#!/usr/bin/env python
"""Convert CrowdHuman's .odgt files to the COCO jsons that crowdhuman_{train,val} load.

    python datasets/prepare_crowdhuman.py                 # root: $DETECTRON2_DATASETS or datasets
    python datasets/prepare_crowdhuman.py --root /data --splits val

Reads ``<root>/crowdhuman/annotation_<split>.odgt`` and the image sizes from
``<root>/crowdhuman/Images``; writes ``<root>/crowdhuman/annotations/<split>.json``. See
``diffusiondet/data/datasets/crowdhuman.py`` for the conversion rules.
"""
import argparse
import json
import os
import sys

from diffusiondet.data.datasets import datasets_root
from diffusiondet.data.datasets.crowdhuman import odgt_to_coco, split_paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or datasets)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    args = parser.parse_args(argv)
    root = args.root or datasets_root()
    for split in args.splits:
        paths = split_paths(root, split)
        coco = odgt_to_coco(paths["odgt_file"], paths["image_root"])
        os.makedirs(os.path.dirname(paths["json_file"]), exist_ok=True)
        tmp = paths["json_file"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(coco, f)
        os.replace(tmp, paths["json_file"])
        crowd = sum(a["iscrowd"] for a in coco["annotations"])
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations']) - crowd} persons, "
              f"{crowd} ignore regions -> {paths['json_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
