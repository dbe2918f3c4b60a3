"""Image grids for humans: rows of equally sized RGB images with a caption per row, and labelled
boxes drawn on an image. Numpy + OpenCV only.

Shape shorthand: H, W pixels of one tile; M boxes of one image, abs xyxy pixels.
"""
import os
from typing import Optional, Sequence

import cv2
import numpy as np

__all__ = ["draw_boxes", "grid", "write_rgb"]

_CAPTION_PX = 14
# One colour per class id (cycled); bright on the synthetic set's grey backgrounds.
_PALETTE = ((255, 255, 255), (0, 0, 0), (255, 128, 0), (0, 255, 255), (128, 255, 128), (255, 0, 128))


def grid(rows: Sequence[Sequence[np.ndarray]], captions: Optional[Sequence[str]] = None,
         pad: int = 2) -> np.ndarray:
    """Tile rows of (H, W, 3) uint8 RGB images (every tile the same size; a row may be shorter)
    into one (R * (H + caption + pad), C * (W + pad), 3) uint8 image, a caption above each row."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    cap = _CAPTION_PX if captions else 0
    out = np.full((len(rows) * (h + cap + pad), cols * (w + pad), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = r * (h + cap + pad)
        if captions:
            cv2.putText(out, captions[r], (2, y + cap - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1,
                        cv2.LINE_AA)
        for c, tile in enumerate(row):
            if tile.shape[:2] != (h, w):
                raise ValueError(f"tile ({r}, {c}) is {tile.shape[:2]}, the grid's tiles are {(h, w)}")
            out[y + cap : y + cap + h, c * (w + pad) : c * (w + pad) + w] = tile
    return out


def draw_boxes(image: np.ndarray, boxes: np.ndarray, classes: Sequence[int],
               names: Optional[Sequence[str]] = None) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 RGB image with (M, 4) abs xyxy boxes drawn, one colour per
    class, and the class name (or id) in the box's corner."""
    out = np.ascontiguousarray(image).copy()
    for (x0, y0, x1, y1), k in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), classes):
        colour = _PALETTE[int(k) % len(_PALETTE)]
        cv2.rectangle(out, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), colour, 1)
        label = names[int(k)] if names is not None else str(int(k))
        cv2.putText(out, label[:3], (int(x0) + 1, int(y0) + 8), cv2.FONT_HERSHEY_SIMPLEX, 0.28, colour, 1,
                    cv2.LINE_AA)
    return out


def write_rgb(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image (PNG by extension); an error names the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(image[:, :, ::-1])):
        raise OSError(f"could not write the image {path}")
