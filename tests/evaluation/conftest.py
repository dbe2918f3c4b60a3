import pytest


@pytest.fixture
def evaluations_run(monkeypatch):
    """Names of the evaluation implementations whose ``evaluate`` ran, in order: "pycocotools",
    "lvis" or "faster". Equal numbers alone cannot tell which backend computed them."""
    from faster_coco_eval.core.faster_eval_api import COCOeval_faster
    from lvis.eval import LVISEval
    from pycocotools.cocoeval import COCOeval

    calls = []

    def spy(cls, name):
        original = cls.evaluate

        def evaluate(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "evaluate", evaluate)

    spy(COCOeval, "pycocotools")
    spy(LVISEval, "lvis")
    spy(COCOeval_faster, "faster")  # faster_coco_eval.cocoeval.COCOeval inherits this evaluate
    return calls
