#!/usr/bin/env python
"""Run a trained DiffusionDet or DiffusionInst on images, a folder/glob, a video file or a webcam
and save visualisations; ``--help`` for the options, ``diffusiondet/tooling/demo.py`` for the code.

    python tools/demo.py --config-file configs/diffdet.synthetic.res18.yaml \
        --input 'datasets/synthetic_crowd/val/*.png' --output output/demo \
        --steps 4 --boxes 300 --confidence-threshold 0.5 \
        --opts MODEL.WEIGHTS output/synthetic_res18/model_final.pth
"""
from diffusiondet.tooling.demo import main
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs alike

if __name__ == "__main__":
    main(build_config=build_config)
