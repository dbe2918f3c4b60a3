"""tools/demo.py end to end on CPU with a tiny random-weight model: images and a video file; and
its drawing of small images (enlarged, small labels, masks). The code is
diffusiondet.tooling.demo, run here as the script runs it (with diffusioninst's build_config).

Shape legend: H×W image size, s the integer factor small images are drawn enlarged by; OpenCV
images are (H, W, 3) uint8 BGR, Visualizer images (H, W, 3) uint8 RGB.
"""
import logging
import os
import shutil
import tempfile

import cv2
import numpy as np
import pytest
import torch
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances

from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES
from diffusiondet.tooling import demo
from diffusioninst import build_config
from tests.utils import TINY_OPTS

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(ROOT, "configs", "diffdet.synthetic.res18.yaml")
SIZES = {"a.png": (64, 80), "b.png": (72, 96)}  # name -> (H, W)
FACTORS = {"a.png": 8, "b.png": 7}  # ceil(480 / H): the shorter side drawn with >= 480 pixels
METADATA = Metadata(thing_classes=list(SYNTHETIC_CROWD_CLASSES))


@pytest.fixture(autouse=True)
def _restore_project_logger():
    # The demo's main calls detectron2's setup_logger, which stops "diffusiondet" records from
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


def _main(argv):
    """What tools/demo.py runs: the demo with diffusioninst's config builder, given the weights of
    a randomly initialised model of the requested architecture (the demo refuses to run without
    MODEL.WEIGHTS)."""
    from detectron2.modeling import build_model

    args = demo.parse_args(argv)
    cfg = build_config(args.config_file, args.opts, steps=args.steps, boxes=args.boxes)
    folder = tempfile.mkdtemp(prefix="demo-weights-")
    weights = os.path.join(folder, "random.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    try:
        demo.main([*argv, "MODEL.WEIGHTS", weights], build_config=build_config)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _argv(*source):
    # Threshold 0 so that the random model's low-score detections are drawn too.
    return ["--config-file", CONFIG, *source, "--steps", "2", "--boxes", "10",
            "--confidence-threshold", "0", "--opts", *map(str, TINY_OPTS)]  # fmt: skip


def _enlarge(image, factor):
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _assert_visualisations(out_dir, image_dir, names, enlarged=True):
    assert sorted(os.listdir(out_dir)) == sorted(names)
    for name in names:
        factor = FACTORS[name] if enlarged else 1
        drawn = cv2.imread(os.path.join(out_dir, name))
        height, width = SIZES[name]
        assert drawn is not None and drawn.shape == (factor * height, factor * width, 3)
        original = _enlarge(cv2.imread(os.path.join(image_dir, name)), factor)
        changed = (drawn != original).any(axis=-1)
        assert changed.any()  # boxes were drawn
        assert not changed.all()  # on the image, which is still visible


def test_files_and_glob_inputs_write_visualisations(image_dir, tmp_path):
    out_dir = tmp_path / "out"
    _main(_argv("--input", str(image_dir / "a.png"), str(image_dir / "b*.png"),
                "--output", str(out_dir)))  # fmt: skip
    _assert_visualisations(out_dir, image_dir, ["a.png", "b.png"])


def test_draw_min_size_zero_keeps_the_image_size(image_dir, tmp_path):
    out_dir = tmp_path / "out"
    _main(_argv("--input", str(image_dir / "a.png"), "--output", str(out_dir),
                "--draw-min-size", "0"))  # fmt: skip
    _assert_visualisations(out_dir, image_dir, ["a.png"], enlarged=False)


def test_folder_with_an_unreadable_file_skips_it_with_a_warning(image_dir, tmp_path):
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusiondet.demo").addHandler(handler)
    try:
        out_dir = tmp_path / "out"
        _main(_argv("--input", str(image_dir), "--output", str(out_dir)))
    finally:
        logging.getLogger("diffusiondet.demo").removeHandler(handler)
    _assert_visualisations(out_dir, image_dir, ["a.png", "b.png"])
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.png" in warnings[0]


def test_video_file_gives_a_video_with_every_frame(tmp_path):
    height, width, num_frames = 64, 80, 3
    video_in, video_out = str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4")
    writer = cv2.VideoWriter(video_in, cv2.VideoWriter_fourcc(*"mp4v"), 5, (width, height))
    assert writer.isOpened()
    rng = np.random.default_rng(1)
    for _ in range(num_frames):
        writer.write(rng.integers(0, 256, (height, width, 3), np.uint8))
    writer.release()

    _main(_argv("--video-input", video_in, "--output", video_out))
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


def _instances(height, width, boxes, labels=True, masks=None):
    instances = Instances((height, width))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    if labels:
        instances.scores = torch.full((len(boxes),), 0.87)
        instances.pred_classes = torch.arange(len(boxes)) % len(SYNTHETIC_CROWD_CLASSES)
    if masks is not None:
        instances.pred_masks = masks
    return instances


def _draw(image, instances, **kwargs):
    np.random.seed(0)  # Visualizer picks instance colours with np.random
    return demo.draw_predictions(image, instances, METADATA, **kwargs)


@pytest.mark.parametrize(
    "height, width, factor",
    [(50, 70, 10), (70, 50, 10), (64, 80, 8), (160, 160, 3), (220, 150, 4), (479, 900, 2),
     (480, 600, 1)],
)  # fmt: skip
def test_small_images_are_drawn_enlarged_by_an_integer_factor(height, width, factor):
    assert demo.draw_scale(height, width) == factor
    assert demo.draw_scale(height, width, min_size=0) == 1
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    drawn = _draw(image, _instances(height, width, []))
    assert drawn.shape == (factor * height, factor * width, 3)
    np.testing.assert_array_equal(drawn, _enlarge(image, factor))  # nearest neighbour, aligned


def test_labels_cover_a_small_part_of_a_small_image():
    # Four objects on a 48×72 image; labels such as "yellow_diamond 87%". Drawn at the image's
    # own size (the old behaviour), the labels hide about 40 % of the picture.
    height, width = 48, 72
    image = np.full((height, width, 3), 128, np.uint8)
    boxes = [[4, 4, 24, 20], [40, 6, 66, 26], [8, 26, 30, 44], [44, 30, 68, 44]]

    def label_fraction(**kwargs):
        with_labels = _draw(image, _instances(height, width, boxes), **kwargs)
        boxes_only = _draw(image, _instances(height, width, boxes, labels=False), **kwargs)
        assert with_labels.shape == boxes_only.shape
        return (with_labels != boxes_only).any(axis=-1).mean()

    enlarged = label_fraction()
    assert 0.005 < enlarged < 0.06  # drawn, and small (about 2.5 %)
    assert label_fraction(min_size=0) > 0.3  # what the test guards against


@pytest.mark.parametrize("kind", ["bool", "probabilities"])
def test_predicted_masks_are_drawn(kind):
    height, width, factor = 40, 64, 12
    image = np.full((height, width, 3), 128, np.uint8)
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[0, 8:32, 10:40] = True
    masks = mask if kind == "bool" else torch.where(mask, 0.9, 0.1)
    box = [[10, 8, 40, 32]]
    drawn = _draw(image, _instances(height, width, box, masks=masks))
    without_masks = _draw(image, _instances(height, width, box))
    assert drawn.shape == without_masks.shape == (factor * height, factor * width, 3)

    inside = (slice(14 * factor, 26 * factor), slice(18 * factor, 32 * factor))
    assert (drawn[inside] != 128).any(axis=-1).all()  # the whole interior is tinted
    assert len(np.unique(drawn[inside].reshape(-1, 3), axis=0)) == 1  # by one flat colour
    assert (without_masks[inside] == 128).all()  # which is the mask, not the box
    box_edges = without_masks[8 * factor, 20 * factor : 30 * factor], without_masks[
        12 * factor : 28 * factor, 40 * factor
    ]  # top and right sides of the enlarged box
    assert all((edge != 128).any(axis=-1).all() for edge in box_edges)
    far_outside = (slice(None), slice(50 * factor, None))  # right of the box and its label
    assert (drawn[far_outside] == 128).all()
    changed = (drawn != without_masks).any(axis=-1)
    ys, xs = np.nonzero(changed)  # the mask drawing stays on the (enlarged) mask
    assert ys.min() >= 8 * factor - 3 and ys.max() < 32 * factor + 3
    assert xs.min() >= 10 * factor - 3 and xs.max() < 40 * factor + 3


def test_diffusioninst_config_draws_masks(image_dir, tmp_path):
    # The demo on a DiffusionInst config: predictions carry masks, which change the pixels
    # inside detections beyond the box outlines (compared with the same run without masks).
    inst_config = os.path.join(ROOT, "configs", "diffinst.synthetic.res18.yaml")
    inst_opts = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", "16", "MODEL.DiffusionInst.MASK_NUM_CONVS",
                 "1", "MODEL.DiffusionInst.MASK_NORM", "BN"]  # fmt: skip
    outputs = {}
    for arch in ("DiffusionInst", "DiffusionDet"):
        out_dir = tmp_path / arch
        argv = _argv("--input", str(image_dir / "a.png"), "--output", str(out_dir))
        argv[1] = inst_config
        _main(argv + [*inst_opts, "MODEL.META_ARCHITECTURE", arch, "MODEL.MASK_ON", str(arch == "DiffusionInst")])
        outputs[arch] = cv2.imread(str(out_dir / "a.png"))
    original = _enlarge(cv2.imread(str(image_dir / "a.png")), FACTORS["a.png"])
    with_masks = (outputs["DiffusionInst"] != original).any(-1).mean()
    boxes_only = (outputs["DiffusionDet"] != original).any(-1).mean()
    assert with_masks > boxes_only


def test_a_visualisation_on_a_full_disk_is_an_error_naming_it(tmp_path):
    # cv2.imwrite returns True on /dev/full; the demo's own write must not.
    from tests.drill.evaluation import demo_image_on_a_full_disk

    assert str(tmp_path / "drawn.png") in demo_image_on_a_full_disk(str(tmp_path))


def test_a_video_writer_that_does_not_open_is_an_error_naming_it(tmp_path):
    from tests.drill.evaluation import demo_video_writer_not_opened

    assert str(tmp_path / "missing" / "out.mp4") in demo_video_writer_not_opened(str(tmp_path))
