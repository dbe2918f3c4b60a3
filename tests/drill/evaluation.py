"""Fault-drill cases: bad images met by the real evaluation path.

A registered 3-image COCO dataset (synthetic, 64x48) is evaluated with ``Trainer.test`` and a tiny
untrained model: one bad image must stop the evaluation with an error naming the file (a skipped
image would silently change the AP), and the same dataset with the image repaired must evaluate.
"""
import contextlib
import json
import os
import shutil
import uuid

from .common import Case, check, expect_error
from .images import H, W, scene, tiny_cfg


@contextlib.contextmanager
def _eval_dataset(workdir):
    """Yields (dataset name, image paths) of a registered 3-image synthetic val set."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from diffusiondet.data.datasets import register_coco_json
    from diffusiondet.data.synthetic import generate_synthetic_crowd

    json_file = generate_synthetic_crowd(
        workdir, split="val", num_images=3, image_size=(H, W), min_objects=2, max_objects=5, seed=1
    )
    image_root = os.path.join(workdir, "val")
    with open(json_file) as f:
        paths = [os.path.join(image_root, im["file_name"]) for im in json.load(f)["images"]]
    name = f"drill_eval_{uuid.uuid4().hex[:8]}"
    register_coco_json(name, json_file, image_root)
    try:
        yield name, paths
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _evaluate(workdir, name, *opts):
    from detectron2.modeling import build_model
    from diffusiondet.engine import Trainer

    cfg = tiny_cfg(
        "DATASETS.TRAIN", (), "DATASETS.TEST", (name,), "MODEL.DiffusionDet.NUM_CLASSES", 5,
        "TEST.IMS_PER_BATCH", 2, "OUTPUT_DIR", os.path.join(workdir, "out"), *opts,
    )
    model = build_model(cfg).eval()
    return Trainer.test(cfg, model)


def _bad_image_stops_evaluation(workdir, spoil, *opts):
    """``spoil(path)`` breaks the second image; evaluation must name it, then work once fixed."""
    with _eval_dataset(workdir) as (name, paths):
        backup = os.path.join(workdir, "backup.png")
        shutil.copy(paths[1], backup)
        spoil(paths[1])
        expect_error(lambda: _evaluate(workdir, name, *opts), names=[paths[1], "ImageLoadError"])
        shutil.copy(backup, paths[1])
        results = _evaluate(workdir, name, *opts)
    results = results.get(name, results)  # detectron2 unwraps a single dataset's results
    check("bbox" in results, f"repaired dataset gave no bbox AP: {results}")
    where = " (raised in a loader worker)" if opts else ""
    return (f"Trainer.test stops with ImageLoadError naming '{os.path.basename(paths[1])}'"
            f"{where}; the repaired set evaluates (bbox AP {results['bbox']['AP']:.1f})")


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def unreadable_image(workdir):
    return _bad_image_stops_evaluation(workdir, _truncate)


def size_mismatch_in_worker(workdir):
    # A data-loader worker process: the error must cross the process boundary with its message.
    return _bad_image_stops_evaluation(
        workdir, lambda path: scene(W + 8, H).save(path), "DATALOADER.NUM_WORKERS", 1
    )


CASES = [
    Case("evaluation", "unreadable_image", unreadable_image),
    Case("evaluation", "size_mismatch_in_worker", size_mismatch_in_worker),
]


def _counting_model(cfg):
    """A tiny model that counts its forward calls (the inference that a failed write would waste)."""
    from detectron2.modeling import build_model

    model = build_model(cfg).eval()
    model.calls = 0
    forward = model.forward

    def counted(*args, **kwargs):
        model.calls += 1
        return forward(*args, **kwargs)

    model.forward = counted
    return model


def results_folder_not_writable(workdir, fault="full"):
    """The evaluation's results folder takes no file: Trainer.test must stop before the inference.

    ``full``: the probe file is /dev/full (every write fails with ENOSPC, as on a full disk);
    ``read_only``: creating it fails with EACCES (a chmod 0o555 folder, which root ignores)."""
    import errno
    from unittest import mock

    from diffusiondet.engine import Trainer
    from diffusiondet.engine import output_check

    def full(**kwargs):
        return open("/dev/full", "wb")

    def read_only(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    with _eval_dataset(workdir) as (name, _):
        cfg = tiny_cfg(
            "DATASETS.TRAIN", (), "DATASETS.TEST", (name,), "MODEL.DiffusionDet.NUM_CLASSES", 5,
            "OUTPUT_DIR", os.path.join(workdir, "out"),
        )
        model = _counting_model(cfg)
        folder = os.path.join(workdir, "out", "inference", name)
        probe = full if fault == "full" else read_only
        with mock.patch.object(output_check.tempfile, "NamedTemporaryFile", probe):
            message = expect_error(lambda: Trainer.test(cfg, model), names=[folder, name], exc=(OSError,))
    check(model.calls == 0, f"the inference ran {model.calls} batches before the write error")
    return f"Trainer.test stops before any inference: {message}"


CASES += [
    Case("evaluation", "results_folder_on_a_full_disk", results_folder_not_writable),
    Case("evaluation", "results_folder_read_only",
         lambda workdir: results_folder_not_writable(workdir, "read_only")),
]


def demo_image_on_a_full_disk(workdir):
    """tools/demo.py's visualisation lands on a full disk (a symlink to /dev/full)."""
    import numpy as np

    from diffusiondet.tooling.demo import write_image

    path = os.path.join(workdir, "drawn.png")
    os.symlink("/dev/full", path)
    return expect_error(lambda: write_image(path, np.zeros((8, 8, 3), np.uint8)), names=[path], exc=(OSError,))


class _Capture:
    """A video source of three frames, as much of cv2.VideoCapture as run_stream uses."""

    def __init__(self):
        import numpy as np

        self.frames = [np.zeros((16, 16, 3), np.uint8)] * 3

    def get(self, prop):
        return 5.0

    def release(self):
        self.frames = []


def demo_video_writer_not_opened(workdir):
    """tools/demo.py's video output cannot be opened (its folder does not exist)."""
    from types import SimpleNamespace

    from diffusiondet.tooling.demo import run_stream

    capture = _Capture()
    fake_demo = SimpleNamespace(run_video=lambda cap: iter(list(cap.frames)))
    path = os.path.join(workdir, "missing", "out.mp4")
    return expect_error(lambda: run_stream(fake_demo, capture, path), names=[path], exc=(OSError,))


CASES += [
    Case("evaluation", "demo_image_on_a_full_disk", demo_image_on_a_full_disk),
    Case("evaluation", "demo_video_writer_not_opened", demo_video_writer_not_opened),
]
