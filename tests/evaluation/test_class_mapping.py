"""Zero-shot class mapping (TEST.CLASS_MAPPING): detections relabelled before evaluation."""
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from diffusiondet.engine import Trainer
from diffusiondet.evaluation import ClassMappingEvaluator, CrowdHumanEvaluator, parse_class_mapping
from tests.utils import tiny_cfg

SOURCE = ["cat", "person", "dog"]
TARGET = ["rider", "person"]


class Recording:
    def reset(self):
        self.seen = []

    def process(self, inputs, outputs):
        self.seen += [out["instances"] for out in outputs]

    def evaluate(self):
        return {"n": sum(len(i) for i in self.seen)}


def _instances(classes, scores):
    inst = Instances((30, 40))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 10.0 + k, 12.0] for k in range(len(classes))]))
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.tensor(classes)
    return inst


def test_parse_maps_names_to_ids_and_rejects_bad_entries():
    assert parse_class_mapping(["person:person", " dog : rider "], SOURCE, TARGET) == {1: 1, 2: 0}
    for pairs, message in ((["person"], "source:target"), (["horse:person"], "'horse' is not a training"),
                           (["person:car"], "'car' is not a class of the evaluated"),
                           (["person:person", "person:rider"], "twice")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_class_mapping(pairs, SOURCE, TARGET)


def test_detections_are_relabelled_and_unmapped_ones_dropped():
    inner = Recording()
    evaluator = ClassMappingEvaluator(inner, {1: 1, 2: 0})
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": _instances([0, 1, 2, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5])}])
    (seen,) = inner.seen
    assert seen.pred_classes.tolist() == [1, 0, 1]  # person -> 1, dog -> 0, cats dropped
    assert seen.scores.tolist() == pytest.approx([0.8, 0.7, 0.6])
    assert seen.pred_boxes.tensor[:, 2].tolist() == [11.0, 12.0, 13.0]  # rows stay aligned
    assert evaluator.evaluate() == {"n": 3}


def test_zero_shot_config_wraps_the_crowdhuman_evaluator(tmp_path):
    name = "class_mapping_crowd_val"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=["person"], evaluator_type="crowdhuman")
    train = "class_mapping_coco_like_train"
    if train not in DatasetCatalog.list():
        DatasetCatalog.register(train, lambda: [])
        MetadataCatalog.get(train).set(thing_classes=SOURCE)
    cfg = tiny_cfg("DATASETS.TRAIN", (train,), "TEST.CLASS_MAPPING", ("person:person",))
    evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path))
    assert isinstance(evaluator, ClassMappingEvaluator) and evaluator.mapping == {1: 0}
    assert isinstance(evaluator.evaluator, CrowdHumanEvaluator) and evaluator.evaluator.person_class == 0
    with pytest.raises(ValueError, match="'people' is not a training class"):
        Trainer.build_evaluator(tiny_cfg("DATASETS.TRAIN", (train,), "TEST.CLASS_MAPPING", ("people:person",)),
                                name, str(tmp_path))  # fmt: skip
    unmapped = Trainer.build_evaluator(tiny_cfg("DATASETS.TRAIN", (train,)), name, str(tmp_path))
    assert isinstance(unmapped, CrowdHumanEvaluator) and unmapped.person_class == 1
