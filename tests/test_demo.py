"""tools/demo.py end to end on CPU with a tiny random-weight model: images and a video file.

Shape legend: H×W image size; OpenCV images are (H, W, 3) uint8 BGR.
"""
import importlib.util
import logging
import os

import cv2
import numpy as np
import pytest

from tests.utils import TINY_OPTS

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(ROOT, "configs", "diffdet.synthetic.res18.yaml")
SIZES = {"a.png": (64, 80), "b.png": (72, 96)}  # name -> (H, W)


@pytest.fixture(scope="module")
def demo():
    path = os.path.join(ROOT, "tools", "demo.py")
    spec = importlib.util.spec_from_file_location("demo_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_project_logger():
    # demo.main() calls detectron2's setup_logger, which stops "diffusiondet" records from
    # propagating; other tests read those records through pytest's root-level caplog.
    logger = logging.getLogger("diffusiondet")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in SIZES.items():
        assert cv2.imwrite(str(folder / name), rng.integers(0, 256, (height, width, 3), np.uint8))
    (folder / "broken.png").write_bytes(b"this is not a png")
    return folder


def _argv(*source):
    # Threshold 0 so that the random model's low-score detections are drawn too.
    return ["--config-file", CONFIG, *source, "--steps", "2", "--boxes", "10",
            "--confidence-threshold", "0", "--opts", *map(str, TINY_OPTS)]  # fmt: skip


def _assert_visualisations(out_dir, image_dir, names):
    assert sorted(os.listdir(out_dir)) == sorted(names)
    for name in names:
        drawn = cv2.imread(os.path.join(out_dir, name))
        assert drawn is not None and drawn.shape == (*SIZES[name], 3)
        assert (drawn != cv2.imread(os.path.join(image_dir, name))).any()  # boxes were drawn


def test_files_and_glob_inputs_write_visualisations(demo, image_dir, tmp_path):
    out_dir = tmp_path / "out"
    demo.main(_argv("--input", str(image_dir / "a.png"), str(image_dir / "b*.png"),
                    "--output", str(out_dir)))  # fmt: skip
    _assert_visualisations(out_dir, image_dir, ["a.png", "b.png"])


def test_folder_with_an_unreadable_file_skips_it_with_a_warning(demo, image_dir, tmp_path):
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusiondet.demo").addHandler(handler)
    try:
        out_dir = tmp_path / "out"
        demo.main(_argv("--input", str(image_dir), "--output", str(out_dir)))
    finally:
        logging.getLogger("diffusiondet.demo").removeHandler(handler)
    _assert_visualisations(out_dir, image_dir, ["a.png", "b.png"])
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.png" in warnings[0]


def test_video_file_gives_a_video_with_every_frame(demo, tmp_path):
    height, width, num_frames = 64, 80, 3
    video_in, video_out = str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4")
    writer = cv2.VideoWriter(video_in, cv2.VideoWriter_fourcc(*"mp4v"), 5, (width, height))
    assert writer.isOpened()
    rng = np.random.default_rng(1)
    for _ in range(num_frames):
        writer.write(rng.integers(0, 256, (height, width, 3), np.uint8))
    writer.release()

    demo.main(_argv("--video-input", video_in, "--output", video_out))
    capture = cv2.VideoCapture(video_out)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == num_frames
    assert all(frame.shape == (height, width, 3) for frame in frames)
