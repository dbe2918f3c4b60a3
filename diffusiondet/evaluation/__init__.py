"""Evaluation beyond detectron2's COCO / LVIS evaluators."""
from .crowdhuman import CrowdHumanImage, evaluate_crowdhuman, match_image
from .crowdhuman_evaluator import CrowdHumanEvaluator

__all__ = ["CrowdHumanEvaluator", "CrowdHumanImage", "evaluate_crowdhuman", "match_image"]
