"""Evaluation beyond detectron2's COCO / LVIS evaluators."""
from .class_mapping import ClassMappingEvaluator, parse_class_mapping
from .crowdhuman import CrowdHumanImage, evaluate_crowdhuman, match_image
from .crowdhuman_evaluator import CrowdHumanEvaluator

__all__ = ["ClassMappingEvaluator", "parse_class_mapping", "CrowdHumanEvaluator", "CrowdHumanImage", "evaluate_crowdhuman", "match_image"]
