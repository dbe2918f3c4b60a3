#!/usr/bin/env python
"""Grow a labelled dataset with the DiffusionEngine data engine: generate images with the frozen
Stable Diffusion model, label each from its own last denoising step, write a COCO folder
(images/ + annotations.json) that DATASETS.GENERATED.DIRS trains on. ``--help`` for the options,
``diffusionengine/generate_cli.py`` for the code.

    python tools/generate_dataset.py --config-file configs/diffengine.coco.sd2.yaml \
        --weights output/diffengine/model_final.pth --out datasets/coco_de --num-images 1000 \
        --captions datasets/coco/annotations/captions_train2017.json --min-per-class 50
"""
import sys

from diffusionengine.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
