"""Run a trained DiffusionDet on images, a folder/glob, a video file or a webcam and save
visualisations (detectron2 Visualizer; boxes, labels and, when predicted, instance masks).
Works on CPU. Images whose shorter side is under --draw-min-size pixels (default 480) are drawn
enlarged by an integer factor (nearest neighbour) and annotated as a native image of that size,
so that labels stay readable and small on small images; saved images have the enlarged size.
Video frames are drawn at their own size.

    python tools/demo.py --config-file configs/diffdet.synthetic.res18.yaml \
        --input 'datasets/synthetic_crowd/val/*.png' --output output/demo \
        --steps 4 --boxes 300 --confidence-threshold 0.5 \
        --opts MODEL.WEIGHTS output/synthetic_res18/model_final.pth
"""
import argparse
import glob
import logging
import math
import os
import time

import cv2
import numpy as np
import torch
import tqdm

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from diffusiondet.engine.checkpoint import load_model_weights

logger = logging.getLogger("diffusiondet.demo")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DRAW_MIN_SIZE = 480


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
    p.add_argument("--draw-min-size", type=int, default=DRAW_MIN_SIZE,
                   help="draw images enlarged by an integer factor until their shorter side has "
                        "at least this many pixels (0: draw at the image's own size)")  # fmt: skip
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


def draw_scale(height, width, min_size=DRAW_MIN_SIZE):
    """Integer factor by which an H×W image is drawn so that its shorter side reaches
    ``min_size`` pixels (1 for images that are large enough, or when ``min_size`` <= 0)."""
    short_side = min(height, width)
    if min_size <= 0 or short_side >= min_size:
        return 1
    return math.ceil(min_size / short_side)


def draw_predictions(image_rgb, instances, metadata, min_size=DRAW_MIN_SIZE):
    """Draw ``instances`` (``pred_boxes``, ``scores``, ``pred_classes``, optional ``pred_masks``
    (N, H, W) bool or probabilities) on an (H, W, 3) uint8 RGB image.

    Returns an (s*H, s*W, 3) uint8 RGB image, s = ``draw_scale(H, W, min_size)``: the image is
    enlarged (nearest neighbour), boxes and masks with it, and Visualizer then draws as on a
    native image of that size (line widths and text sized for s*H×s*W).
    """
    if instances.has("pred_masks"):
        masks = instances.pred_masks
        masks = masks.tensor if isinstance(masks, BitMasks) else torch.as_tensor(masks)
        instances = Instances(instances.image_size, **instances.get_fields())
        instances.pred_masks = masks >= 0.5 if masks.dtype.is_floating_point else masks.bool()
    scale = draw_scale(*image_rgb.shape[:2], min_size)
    if scale > 1:
        image_rgb, instances = _enlarge(image_rgb, instances, scale)
    vis = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()  # RGB


def _enlarge(image_rgb, instances, scale):
    """Image and prediction boxes/masks enlarged by an integer factor (other fields copied)."""
    image_rgb = np.repeat(np.repeat(image_rgb, scale, axis=0), scale, axis=1)
    enlarged = Instances(image_rgb.shape[:2])
    for name, value in instances.get_fields().items():
        if name == "pred_boxes":
            value = Boxes(value.tensor * scale)
        elif name == "pred_masks":  # (N, H, W) bool
            value = value.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        enlarged.set(name, value)
    return image_rgb, enlarged


class Demo:
    """Predictor + visualiser; keeps only detections above the confidence threshold."""

    def __init__(self, cfg, confidence_threshold, draw_min_size=DRAW_MIN_SIZE):
        # DefaultPredictor would load MODEL.WEIGHTS with detectron2's checkpointer (full pickle
        # for .pkl files, mismatched tensors skipped with a warning): build it without weights
        # and load them with the checks of training.
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""
        self.predictor = DefaultPredictor(unloaded)
        load_model_weights(self.predictor.model, cfg)
        names = cfg.DATASETS.TEST or cfg.DATASETS.TRAIN
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")
        self.threshold = confidence_threshold
        self.draw_min_size = draw_min_size
        self.video_visualizer = VideoVisualizer(self.metadata, ColorMode.IMAGE)

    def predict(self, image_bgr):
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        return instances[instances.scores >= self.threshold]

    def draw_image(self, image_rgb, instances):
        return draw_predictions(image_rgb, instances, self.metadata, self.draw_min_size)

    def run_video(self, capture):
        while capture.isOpened():
            ok, frame = capture.read()
            if not ok:
                break
            instances = self.predict(frame)
            drawn = self.video_visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield cv2.cvtColor(drawn.get_image(), cv2.COLOR_RGB2BGR)


def write_image(path, image_bgr):
    """Write ``image_bgr`` to ``path`` or raise ``OSError`` naming it.

    ``cv2.imwrite`` reports a failure only by returning False, and not even that on a full disk
    (its buffered write to /dev/full returns True): encode with OpenCV, write with Python, whose
    file object raises on a short write.
    """
    ok, encoded = cv2.imencode(os.path.splitext(path)[1] or ".png", image_bgr)
    if not ok:
        raise OSError(f"cannot encode the visualisation of {path}")
    try:
        with open(path, "wb") as f:
            f.write(encoded.tobytes())
    except OSError as e:
        raise OSError(e.errno, f"cannot write the visualisation {path}: {e.strerror or e}") from e


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
            write_image(os.path.join(output, os.path.basename(path)), drawn[:, :, ::-1])
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
                if not writer.isOpened():  # OpenCV's writer fails silently: every frame would be lost
                    capture.release()
                    raise OSError(f"cannot write the video {output} (missing folder, read-only or no codec)")
            writer.write(frame)
        else:
            cv2.imshow("DiffusionDet", frame)
            if cv2.waitKey(1) == 27:
                break
    capture.release()
    if writer is not None:
        writer.release()


def main(argv=None, *, build_config):
    """``tools/demo.py``'s command line. ``build_config(config_file, opts, steps=, boxes=)``
    builds the config: the script passes diffusioninst's, which builds DiffusionDet and
    DiffusionInst configs alike (diffusiondet is built under diffusioninst, never imports it)."""
    args = parse_args(argv)
    setup_logger(name="diffusiondet")
    cfg = build_config(args.config_file, args.opts, steps=args.steps, boxes=args.boxes)
    cfg.freeze()
    demo = Demo(cfg, args.confidence_threshold, args.draw_min_size)
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

