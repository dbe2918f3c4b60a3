#!/usr/bin/env python
"""Run a trained DiffusionDet on images, a folder/glob, a video file or a webcam and save
visualisations (detectron2 Visualizer). Works on CPU.

    python tools/demo.py --config-file configs/diffdet.synthetic.res18.yaml \
        --input 'datasets/synthetic_crowd/val/*.png' --output output/demo \
        --steps 4 --boxes 300 --confidence-threshold 0.5 \
        --opts MODEL.WEIGHTS output/synthetic_res18/model_final.pth
"""
import argparse
import glob
import logging
import os
import time

import cv2
import numpy as np
import tqdm

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from diffusiondet.engine import build_config

logger = logging.getLogger("diffusiondet.demo")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="image files, folders or glob patterns")
    src.add_argument("--video-input", help="path to a video file")
    src.add_argument("--webcam", action="store_true", help="read frames from camera 0")
    p.add_argument("--output", help="output folder (images) or file (video); shown in a window if omitted")
    p.add_argument("--steps", type=int, default=None, help="DDIM sampling steps")
    p.add_argument("--boxes", type=int, default=None, help="number of boxes at inference")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score to draw")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def expand_inputs(patterns):
    """Files, folders (all images inside) and glob patterns -> sorted list of image paths."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths += [os.path.join(pattern, f) for f in sorted(os.listdir(pattern))]
        else:
            paths += sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]
    return [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isdir(p)]


class Demo:
    """Predictor + visualiser; keeps only detections above the confidence threshold."""

    def __init__(self, cfg, confidence_threshold):
        self.predictor = DefaultPredictor(cfg)
        names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")
        self.threshold = confidence_threshold
        self.video_visualizer = VideoVisualizer(self.metadata, ColorMode.IMAGE)

    def predict(self, image_bgr):
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        return instances[instances.scores >= self.threshold]

    def draw_image(self, image_rgb, instances):
        vis = Visualizer(image_rgb, self.metadata, instance_mode=ColorMode.IMAGE)
        return vis.draw_instance_predictions(instances).get_image()  # RGB

    def run_video(self, capture):
        while capture.isOpened():
            ok, frame = capture.read()
            if not ok:
                break
            instances = self.predict(frame)
            drawn = self.video_visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield cv2.cvtColor(drawn.get_image(), cv2.COLOR_RGB2BGR)


def run_images(demo, paths, output):
    if output:
        os.makedirs(output, exist_ok=True)
    for path in tqdm.tqdm(paths, disable=not output):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:  # unreadable file: say which, keep going with the others
            logger.warning("Skipping %s: cannot read image (%s)", path, e)
            continue
        start = time.perf_counter()
        instances = demo.predict(image)
        logger.info("%s: %d detections in %.2f s", path, len(instances), time.perf_counter() - start)
        drawn = demo.draw_image(image[:, :, ::-1], instances)
        if output:
            cv2.imwrite(os.path.join(output, os.path.basename(path)), drawn[:, :, ::-1])
        else:
            cv2.imshow("DiffusionDet", drawn[:, :, ::-1])
            if cv2.waitKey(0) == 27:
                break


def run_stream(demo, capture, output):
    writer = None
    for frame in demo.run_video(capture):
        if output:
            if writer is None:
                h, w = frame.shape[:2]
                fps = capture.get(cv2.CAP_PROP_FPS) or 15
                writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            writer.write(frame)
        else:
            cv2.imshow("DiffusionDet", frame)
            if cv2.waitKey(1) == 27:
                break
    capture.release()
    if writer is not None:
        writer.release()


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="diffusiondet")
    cfg = build_config(args.config_file, args.opts, steps=args.steps, boxes=args.boxes)
    cfg.freeze()
    demo = Demo(cfg, args.confidence_threshold)
    if args.input:
        run_images(demo, expand_inputs(args.input), args.output)
    else:
        source = 0 if args.webcam else args.video_input
        capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            raise SystemExit(f"Cannot open video source {source!r}")
        output = args.output
        if output and os.path.isdir(output):
            output = os.path.join(output, "demo.mp4")
        run_stream(demo, capture, output)


if __name__ == "__main__":
    main()
