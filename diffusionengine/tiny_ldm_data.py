"""Training data of the tiny LDM (:mod:`diffusionengine.tiny_ldm`): images of a COCO json in
memory, with the names of the classes each one shows, and the prompts made of them.

Shape shorthand: N images, H W pixels.
"""
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch

from .prompts import MAX_CLASS_NAMES, class_prompt

__all__ = ["ImageSet", "PromptEmbeddings", "draw_prompt", "load_coco_images", "synthetic_train_set"]


@dataclasses.dataclass
class ImageSet:
    """Training images and the names of the classes each one shows.

    Attributes:
        images: (N, 3, H, W) uint8 RGB.
        class_names: N lists of distinct class names present in each image (may be empty).
    """

    images: torch.Tensor
    class_names: List[List[str]]


def load_coco_images(json_file: str, image_root: str, size: int) -> ImageSet:
    """Every image of a COCO json, resized to (size, size), with its present class names in
    category order."""
    with open(json_file) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    present: Dict[int, set] = {im["id"]: set() for im in coco["images"]}
    for ann in coco["annotations"]:
        present[ann["image_id"]].add(ann["category_id"])
    images, class_names = [], []
    for im in coco["images"]:
        path = os.path.join(image_root, im["file_name"])
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read image {path} (listed in {json_file})")
        if bgr.shape[:2] != (size, size):
            bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1))
        class_names.append([names[c] for c in sorted(present[im["id"]])])
    return ImageSet(torch.stack(images), class_names)  # (N, 3, size, size)


def synthetic_train_set(size: int, root: Optional[str] = None) -> ImageSet:
    """The TRAIN split of the embedded synthetic set (generated if needed); never the val split,
    on which the demo measures AP."""
    from diffusiondet.data.datasets import ensure_synthetic_crowd

    paths = ensure_synthetic_crowd(root)["synthetic_crowd_train"]
    return load_coco_images(paths["json_file"], paths["image_root"], size)


class PromptEmbeddings:
    """Frozen text encoder outputs per prompt, (L, D) each, computed once."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.cache = tokenizer, text_encoder, {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        for p in set(prompts) - set(self.cache):
            ids = self.tokenizer([p], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.cache[p] = self.text_encoder(ids)[0][0]
        return torch.stack([self.cache[p] for p in prompts])  # (B, L, D)


def draw_prompt(names: List[str], uncond_prob: float, gen: torch.Generator) -> str:
    """The training prompt of an image showing ``names``: "" with probability ``uncond_prob``
    (or without names), else :func:`class_prompt` of up to 4 of them in a random order."""
    drop = float(torch.rand((), generator=gen)) < uncond_prob
    order = torch.randperm(max(1, len(names)), generator=gen).tolist()
    if drop or not names:
        return ""
    return class_prompt([names[i] for i in order[:MAX_CLASS_NAMES]])
