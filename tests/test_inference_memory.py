"""--boxes beyond a memory budget is a start-up error with the estimate (issue #21)."""
import pytest

from diffusiondet.config import inference_memory_mb
from tests.utils import tiny_cfg


def test_estimate_counts_attention_and_nms_quadratically():
    # 1 image, 1 head, 1 step: attention 2 * 1024^2 * 4 B = 8 MiB, NMS 1024^2 * 4 B = 4 MiB.
    assert inference_memory_mb(1024, heads=1, images=1, steps=1, ensemble=False) == 12
    # Attention grows with heads and images, NMS with the steps' candidates (ensemble only).
    assert inference_memory_mb(1024, heads=8, images=2, steps=4, ensemble=True) == 2 * 2 * 8 * 4 + 16 * 4
    assert inference_memory_mb(1024, heads=1, images=1, steps=4, ensemble=False) == 12
    assert inference_memory_mb(2048, heads=1, images=1, steps=1, ensemble=False) == 48


def _cfg(boxes, budget, steps=1):
    return tiny_cfg("MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", boxes, "MODEL.DiffusionDet.NHEADS", 8, "TEST.IMS_PER_BATCH", 1,
                    "MODEL.DiffusionDet.SAMPLE_STEP", steps, "MODEL.DiffusionDet.MAX_INFERENCE_MEMORY_MB", budget)


def test_boxes_above_the_budget_are_an_error_with_the_estimate():
    # 8 heads, 1 image, 1 step: 1024 boxes = 2*8*4 + 4 = 68 MiB.
    _cfg(1024, 68)
    with pytest.raises(ValueError, match=r"--boxes\) 1024 needs an estimated 68 MiB .*MAX_INFERENCE_MEMORY_MB = 67"):
        _cfg(1024, 67)
    _cfg(100_000, 0)  # 0: no check


def test_the_papers_largest_settings_pass_the_default_budget():
    from detectron2.config import get_cfg

    from diffusiondet.config import add_diffusiondet_config

    cfg = get_cfg()
    add_diffusiondet_config(cfg)
    d = cfg.MODEL.DiffusionDet
    for boxes in (2000, 5000):
        assert inference_memory_mb(boxes, heads=d.NHEADS, images=1, steps=4, ensemble=True) < d.MAX_INFERENCE_MEMORY_MB
