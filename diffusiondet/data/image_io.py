"""Reading dataset images with explicit conventions for EXIF orientation, bit depth and size.

* EXIF orientation is applied (as detectron2's ``read_image`` and every image viewer do), so a
  json's ``width`` / ``height`` and boxes must describe the image *as displayed*; a size mismatch
  that an unapplied EXIF rotation would explain says so.
* 16-bit grayscale (PIL modes ``I;16*``) is reduced to 8 bits by keeping the high byte
  (``v >> 8``: 0 -> 0, 65535 -> 255), the rule Pillow itself uses for 16-bit RGB PNGs; other
  wide modes (32-bit ``I``, float ``F``) have no agreed scale and are rejected.
* Pillow's decompression-bomb guard is kept: images up to ``2 * PIL.Image.MAX_IMAGE_PIXELS``
  (~179 MP by default; Pillow only warns above 1x) decode, larger ones raise
  ``DecompressionBombError`` with a hint on how to accept them.
"""
import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import ExifTags, Image, ImageOps

__all__ = ["UnsupportedImageModeError", "check_image_size", "exif_orientation", "read_image"]

_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# EXIF orientations 5-8 swap width and height (transpose / 90-degree rotations).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class UnsupportedImageModeError(ValueError):
    """The image's pixel mode has no defined conversion to 8-bit RGB."""


def read_image(file_name: str, format: str = "RGB") -> np.ndarray:
    """Read an image as displayed (EXIF orientation applied), in 8 bits.

    Args:
        file_name: image path (anything ``PathManager`` opens).
        format: a PIL mode or "BGR", as in ``detectron2.data.detection_utils.read_image``.

    Returns:
        (H, W, C) uint8 array (C = 3 for RGB/BGR, 1 for "L"); H, W after EXIF orientation.

    Raises:
        OSError: missing, unidentified or truncated file.
        PIL.Image.DecompressionBombError: more than ``2 * Image.MAX_IMAGE_PIXELS`` pixels.
        UnsupportedImageModeError: a 32-bit integer or float image.
    """
    with PathManager.open(file_name, "rb") as f:
        try:
            image = Image.open(f)
        except Image.DecompressionBombError as e:
            raise Image.DecompressionBombError(
                f"{e} To accept such images, raise PIL.Image.MAX_IMAGE_PIXELS (the limit is "
                "twice its value) before building the data loader."
            ) from e
        image.load()  # decoding errors (truncation) surface here, not in the conversions
        if _orientation(image) != 1:
            ImageOps.exif_transpose(image, in_place=True)
        if image.mode in _16BIT_MODES:
            high_byte = np.asarray(image).astype(np.uint16) >> 8
            image = Image.fromarray(high_byte.astype(np.uint8), mode="L")
        elif image.mode in ("I", "F"):
            raise UnsupportedImageModeError(
                f"pixel mode '{image.mode}' (32-bit integer or float) has no defined 8-bit "
                "scale; convert the image to 8 or 16 bits per channel"
            )
        return utils.convert_PIL_to_numpy(image, format)


def exif_orientation(file_name: str) -> int:
    """The file's EXIF orientation tag (1 = as stored, 6 / 8 = rotated 90 degrees), 1 if none."""
    with PathManager.open(file_name, "rb") as f:
        return _orientation(Image.open(f))


def check_image_size(dataset_dict: dict, image: np.ndarray) -> None:
    """Raise ``SizeMismatchError`` if ``image`` (H, W, C) differs from the dict's height/width.

    The message names the file and, when the file's EXIF rotation explains the mismatch, says
    that sizes and boxes must refer to the image after that rotation.
    """
    try:
        utils.check_image_size(dataset_dict, image)
    except utils.SizeMismatchError as e:
        file_name = dataset_dict.get("file_name", "?")
        expected_wh = (dataset_dict.get("width"), dataset_dict.get("height"))
        actual_wh = (image.shape[1], image.shape[0])
        message = (
            f"'{file_name}' is {actual_wh[0]}x{actual_wh[1]} (WxH) but its dataset entry says "
            f"{expected_wh[0]}x{expected_wh[1]}"
        )
        orientation = exif_orientation(file_name) if file_name != "?" else 1
        if orientation in _SWAPPING_ORIENTATIONS and expected_wh == actual_wh[::-1]:
            message += (
                f"; the file has EXIF orientation {orientation}, which is applied when reading: "
                "width, height and boxes must describe the image after that rotation"
            )
        raise utils.SizeMismatchError(message) from e


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block means "as stored", like detectron2
        return 1
