"""Fault-drill cases: image files that are broken, unusual or inconsistent with their json.

Every broken-file case builds a 3-image dataset (two good 64x48 images around the bad one) and
checks both mappers: the training loader logs a skip naming the bad file and still produces both
good images; the evaluation mapper raises ``ImageLoadError`` naming it. The other cases check
values: 16-bit and CMYK pixels, EXIF-rotated and huge images whose GT box must still cover the
bright rectangle drawn around the object.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

from .common import Case, capture_logs, check, expect_error, expect_logged

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
W, H = 64, 48  # non-square on purpose
BOX = (10, 8, 34, 28)  # abs xyxy of the bright rectangle drawn by save_scene
LOGGER = "diffusiondet"


def tiny_cfg(*opts):
    """``tests.utils.tiny_cfg`` (ResNet-18, 32 channels, 20 proposals, 64-96 px inputs)."""
    from tests.utils import tiny_cfg as make

    return make(*opts, config_file=os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml"))


def scene(width=W, height=H, box=BOX) -> Image.Image:
    """An RGB image: dark noise with a bright rectangle at ``box`` (abs xyxy, end exclusive)."""
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 240
    return Image.fromarray(pixels)


def anno(xyxy, category_id=0, **extra):
    """A detectron2 annotation with an abs xywh box from abs xyxy numbers."""
    from detectron2.structures import BoxMode

    x0, y0, x1, y1 = xyxy
    return {"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": category_id, "iscrowd": 0, **extra}


def record(path, width=W, height=H, annotations=None, image_id=1):
    annotations = [anno(BOX)] if annotations is None else annotations
    return {"file_name": str(path), "image_id": image_id, "width": width, "height": height,
            "annotations": annotations}


def mapper(is_train, cfg=None, **kwargs):
    """The project mapper, from the tiny config, or with explicit keyword arguments."""
    from diffusiondet.data import DiffusionDetDatasetMapper

    if kwargs:
        return DiffusionDetDatasetMapper(is_train, **kwargs)
    return DiffusionDetDatasetMapper(cfg or tiny_cfg(), is_train=is_train)


def train_file_names(records, num_batches=3):
    """File names produced by detectron2's train loader (2 images a batch) over ``records``."""
    from detectron2.data import build_detection_train_loader

    loader = build_detection_train_loader(
        records, mapper=mapper(True), total_batch_size=2, num_workers=0
    )
    names = []
    for index, batch in enumerate(loader):
        names += [d["file_name"] for d in batch]
        if index + 1 == num_batches:
            return names


def bright_box(image_chw):
    """abs xyxy bounds of the bright pixels of a (3, H, W) uint8 tensor."""
    ys, xs = np.nonzero(image_chw.float().mean(0).numpy() > 150)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def check_box_on_object(out, tolerance=2.0):
    """The single GT box of a mapped training dict must cover the bright rectangle."""
    boxes = out["instances"].gt_boxes.tensor.numpy()
    check(len(boxes) == 1, f"expected 1 GT box, got {len(boxes)}")
    error = np.abs(boxes[0] - bright_box(out["image"])).max()
    check(error <= tolerance, f"GT box {boxes[0].round(1)} is {error:.1f} px off the object")


def check_bad_image(workdir, bad_path, log_names=()):
    """Train loader over good/bad/good: skip logged and good images kept; eval: clear error."""
    from diffusiondet.data import ImageLoadError

    good = [os.path.join(workdir, f"good{i}.png") for i in range(2)]
    for path in good:
        scene().save(path)
    bad = record(bad_path, image_id=2)
    records = [record(good[0], image_id=1), bad, record(good[1], image_id=3)]
    with capture_logs(LOGGER) as messages:
        names = train_file_names(records)
    expect_logged(messages, [os.path.basename(bad_path), "Skipping", *log_names])
    check(bad["file_name"] not in names, "the bad image reached the training batch")
    check(set(names) == set(good), f"good images lost: produced {sorted(set(names))}")
    error = expect_error(
        lambda: mapper(False)(bad), names=[os.path.basename(bad_path)], exc=(ImageLoadError,)
    )
    return f"train: skip logged, good images kept; eval: {error}".replace(workdir + os.sep, "")


def _truncated(workdir, ext):
    path = os.path.join(workdir, f"truncated.{ext}")
    scene().save(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return check_bad_image(workdir, path)


def _write_bytes(name, data):
    def run(workdir):
        path = os.path.join(workdir, name)
        if data is not None:
            open(path, "wb").write(data)
        return check_bad_image(workdir, path)

    return run


def png_16bit(workdir):
    values = np.full((H, W), 3000, dtype=np.uint16)
    values[BOX[1]:BOX[3], BOX[0]:BOX[2]] = 60000
    path = os.path.join(workdir, "depth16.png")
    Image.fromarray(values).save(path)
    check(Image.open(path).mode == "I;16", f"fixture is {Image.open(path).mode}, not I;16")
    check_box_on_object(mapper(True)(record(path)))
    values[-1, :8] = [0, 255, 256, 4095, 32767, 32768, 65280, 65535]  # the whole 16-bit range
    Image.fromarray(values).save(path)
    plain = mapper(False, augmentations=[], image_format="RGB")
    image = plain(record(path))["image"].numpy()  # (3, H, W)
    expected = (values >> 8).astype(np.uint8)
    check(all(np.array_equal(c, expected) for c in image), f"16-bit pixels {image[0, -1, :8]}")
    return f"16-bit I;16 read as v>>8 (60000 -> {image[0, BOX[1], BOX[0]]}), box stays on object"


def cmyk_jpeg(workdir):
    path = os.path.join(workdir, "cmyk.jpg")
    rgb = scene()
    rgb.convert("CMYK").save(path, quality=95)
    check(Image.open(path).mode == "CMYK", "fixture is not CMYK")
    image = mapper(False, augmentations=[], image_format="RGB")(record(path))["image"]
    error = np.abs(image.numpy().transpose(1, 2, 0).astype(int) - np.asarray(rgb, int)).mean()
    check(image.shape == (3, H, W) and error < 8, f"CMYK -> RGB differs by {error:.1f} per pixel")
    check_box_on_object(mapper(True)(record(path)))
    return f"CMYK JPEG converted to RGB (mean abs error {error:.1f}), box stays on object"


def exif_rotated(workdir):
    displayed = scene()
    details = []
    # Orientation 6 / 8: the viewer rotates the stored pixels 90 degrees clockwise / counter-.
    turns = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    for orientation, stored_turn in turns.items():
        path = os.path.join(workdir, f"exif{orientation}.jpg")
        exif = Image.Exif()
        exif[0x0112] = orientation
        displayed.transpose(stored_turn).save(path, exif=exif.tobytes(), quality=95)
        check(Image.open(path).size == (H, W), "fixture is not stored rotated")
        check_box_on_object(mapper(True)(record(path)))
        details.append(str(orientation))
    # A json written from the stored (unrotated) size: skipped, and the log says why.
    stored = record(path, width=H, height=W, annotations=[anno((8, 10, 28, 34))])
    with capture_logs(LOGGER) as messages:
        check(mapper(True)(stored) is None, "json with the stored size was not skipped")
    expect_logged(messages, ["exif8.jpg", "EXIF orientation 8"])
    return (f"EXIF {'/'.join(details)} applied, boxes stay on the object; a json with the stored "
            "size is skipped with a log naming the EXIF orientation")


def size_mismatch(workdir):
    path = os.path.join(workdir, "resized.png")
    scene(W + 16, H).save(path)
    return check_bad_image(workdir, path)


def _peak_rss_reset():
    """Reset the process's peak RSS (Linux clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))


def huge_image(workdir):
    side = 8000  # 64 MP: below Pillow's 89 MP warning threshold, must load untouched
    box = (3000, 2000, 5000, 4000)
    path = os.path.join(workdir, "huge.png")
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    canvas.save(path, compress_level=1)
    del canvas
    huge = record(path, side, side, [anno(box)])
    measured = _peak_rss_reset()
    start = _peak_rss_mb()
    out = mapper(True)(huge)
    check(out is not None, "the 64 MP image was skipped")
    check(max(out["image"].shape[1:]) <= 96, f"not resized: {tuple(out['image'].shape)}")
    check_box_on_object(out)
    growth = _peak_rss_mb() - start
    rgb_mb = side * side * 3 / 2**20
    check(not measured or growth < 5 * rgb_mb, f"peak memory grew {growth} MB")
    test_out = mapper(False)(huge)
    check(tuple(test_out["image"].shape) == (3, 64, 64), "eval mapper did not resize")
    return (f"{side}x{side} PNG resized to {tuple(out['image'].shape[1:])}, box on object, "
            f"peak memory +{growth} MB ({rgb_mb:.0f} MB as RGB)")


def decompression_bomb(workdir):
    path = os.path.join(workdir, "bomb.png")
    scene(4 * W, 4 * H).save(path)
    limit = Image.MAX_IMAGE_PIXELS
    # The good 64x48 images stay under the limit; the bomb is 5x it, over Pillow's 2x error.
    Image.MAX_IMAGE_PIXELS = 16 * W * H // 5
    try:
        return check_bad_image(workdir, path, log_names=["MAX_IMAGE_PIXELS"])
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def tiny_image(workdir):
    import torch
    from detectron2.modeling import build_model

    path = os.path.join(workdir, "tiny.png")
    scene(8, 8, (2, 2, 6, 6)).save(path)
    tiny = record(path, 8, 8, [anno((2, 2, 6, 6))])
    check_box_on_object(mapper(True)(tiny), tolerance=8.0)  # 8 px -> 64 px: 8x resampling
    model = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        (result,) = model([mapper(False)(tiny)])
    instances = result["instances"]
    boxes = instances.pred_boxes.tensor
    check(instances.image_size == (8, 8), f"output size {instances.image_size}")
    check(len(boxes) > 0 and bool(torch.isfinite(boxes).all()), "no finite detections")
    check(bool((boxes >= 0).all() and (boxes <= 8).all()), "detections outside the 8x8 image")
    return f"8x8 image upscaled for the model, {len(boxes)} finite detections inside 8x8"


CASES = [
    Case("images", "truncated_jpeg", lambda d: _truncated(d, "jpg")),
    Case("images", "truncated_png", lambda d: _truncated(d, "png")),
    Case("images", "missing_file", _write_bytes("missing.jpg", None)),
    Case("images", "zero_byte_file", _write_bytes("empty.jpg", b"")),
    Case("images", "text_named_jpg", _write_bytes("notes.jpg", b"name,x,y\ncat,1,2\n" * 20)),
    Case("images", "png_16bit", png_16bit),
    Case("images", "cmyk_jpeg", cmyk_jpeg),
    Case("images", "exif_rotated", exif_rotated),
    Case("images", "size_differs_from_json", size_mismatch),
    Case("images", "huge_64mp", huge_image),
    Case("images", "decompression_bomb", decompression_bomb),
    Case("images", "tiny_8x8", tiny_image),
]


def zero_side_after_resize(workdir):
    """A 3000x1 image: the resize gives a zero side. Training skips it, evaluation says which."""
    import numpy as np
    from detectron2.data import transforms as T
    from PIL import Image

    from diffusiondet.data import DiffusionDetDatasetMapper
    from diffusiondet.data.dataset_mapper import ImageLoadError

    path = os.path.join(workdir, "line.png")
    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(path)
    sample = {"file_name": path, "height": 1, "width": 3000, "image_id": 1, "annotations": []}
    resize = [T.ResizeShortestEdge(800, 1333)]
    with capture_logs("diffusiondet") as logs:
        check(DiffusionDetDatasetMapper(True, augmentations=resize)(sample) is None, "training kept it")
    line = expect_logged(logs, ["line.png", "3000x1"])
    error = expect_error(lambda: DiffusionDetDatasetMapper(False, augmentations=resize)(sample),
                         names=["line.png"], exc=(ImageLoadError,))
    return f"{line}; evaluation: {error}"


CASES.append(Case("images", "zero_side_after_resize_3000x1", zero_side_after_resize))
