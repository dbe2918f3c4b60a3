"""Evaluation beyond detectron2's COCO / LVIS evaluators."""
from .crowdhuman import CrowdHumanImage, evaluate_crowdhuman, match_image

__all__ = ["CrowdHumanImage", "evaluate_crowdhuman", "match_image"]
