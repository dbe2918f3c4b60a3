"""Zero-shot transfer: evaluate a model trained on one dataset's classes on another dataset.

A mapping "source class name -> target class name" (``TEST.CLASS_MAPPING``) relabels the
detections before the dataset's own evaluator sees them; detections of unmapped source classes
are dropped. Example (paper Table 1): a COCO model on CrowdHuman with ``("person:person",)``.
"""
from typing import Dict, List, Sequence

import torch
from detectron2.evaluation import DatasetEvaluator

__all__ = ["ClassMappingEvaluator", "parse_class_mapping"]


def parse_class_mapping(
    pairs: Sequence[str], source_classes: List[str], target_classes: List[str]
) -> Dict[int, int]:
    """``["src:tgt", ...]`` -> {source class id: target class id}, checked against both lists.

    Raises:
        ValueError: a pair without exactly one ":", a name that is not a class of its dataset,
            or a source class mapped twice.
    """
    mapping = {}
    for pair in pairs:
        parts = str(pair).split(":")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"TEST.CLASS_MAPPING entries are 'source:target' class names, got {pair!r}")
        source, target = (p.strip() for p in parts)
        if source not in source_classes:
            raise ValueError(f"TEST.CLASS_MAPPING: {source!r} is not a training class ({source_classes})")
        if target not in target_classes:
            raise ValueError(f"TEST.CLASS_MAPPING: {target!r} is not a class of the evaluated dataset ({target_classes})")
        if source_classes.index(source) in mapping:
            raise ValueError(f"TEST.CLASS_MAPPING maps {source!r} twice")
        mapping[source_classes.index(source)] = target_classes.index(target)
    return mapping


class ClassMappingEvaluator(DatasetEvaluator):
    """Wraps an evaluator: detections are relabelled source -> target (others dropped) first."""

    def __init__(self, evaluator: DatasetEvaluator, mapping: Dict[int, int]):
        """
        Args:
            evaluator: the evaluated dataset's evaluator.
            mapping: {model (source) class id: evaluated-dataset (target) class id}.
        """
        if not mapping:
            raise ValueError("ClassMappingEvaluator needs a non-empty mapping")
        self.evaluator = evaluator
        self.mapping = dict(mapping)
        size = max(self.mapping) + 1
        self._lookup = torch.full((size,), -1, dtype=torch.long)  # source id -> target id or -1
        for source, target in self.mapping.items():
            self._lookup[source] = target

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        mapped = []
        for out in outputs:
            inst = out["instances"]
            classes = inst.pred_classes.cpu()
            target = torch.full_like(classes, -1)
            known = classes < len(self._lookup)
            target[known] = self._lookup[classes[known]]
            keep = target >= 0
            inst = inst[keep.to(inst.pred_classes.device)]
            inst.pred_classes = target[keep].to(inst.pred_classes.device)
            mapped.append({**out, "instances": inst})
        self.evaluator.process(inputs, mapped)

    def evaluate(self):
        return self.evaluator.evaluate()
