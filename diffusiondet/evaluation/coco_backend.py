"""COCO and LVIS evaluation through faster-coco-eval, with pycocotools / ``lvis`` as the fallback.

faster-coco-eval (C++ evaluate / accumulate, pycocotools' API) computes the same numbers as
pycocotools' ``COCOeval`` and the ``lvis`` API's ``LVISEval`` (tests/evaluation/
test_coco_backend.py checks every stat to 1e-4), several times faster (docs/evaluation.md).

How detectron2's evaluators are made to use it. ``COCOEvaluator._eval_predictions`` takes its
evaluation class from the module names ``COCOeval_opt`` (``use_fast_impl``; the class compiled
into detectron2's ``_C``, which this detectron2 build cannot load, so it is pycocotools' class)
and ``COCOevalMaxDets`` (pycocotools' class, for a per-image cap other than 100), and
``LVISEvaluator._eval_predictions`` calls the module function ``_evaluate_predictions_on_lvis``.
Neither takes a class or function as an argument, so the subclasses below rebind those names
for the duration of their own ``_eval_predictions`` (under a lock, restored afterwards) and leave
the rest (gathering, id unmapping, the saved json, result tables, box proposals) to detectron2.
``faster_coco_eval.init_as_pycocotools()`` is not used: it replaces ``pycocotools`` in
``sys.modules`` for the whole process, and detectron2 has already bound its names by then.

Backends (``TEST.COCO_EVAL_BACKEND``): "auto" (faster-coco-eval when it imports, else
pycocotools / ``lvis``, logged once), "faster" (an error without it), "pycocotools".
"""
import contextlib
import logging
import threading
from collections import defaultdict

from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco
from detectron2.evaluation import lvis_evaluation as d2_lvis
from detectron2.utils.logger import create_small_table

from ..training_extras_config import COCO_EVAL_BACKENDS

__all__ = [
    "COCO_EVAL_BACKENDS",
    "FasterCOCOEvaluator",
    "FasterLVISEvaluator",
    "build_coco_evaluator",
    "build_lvis_evaluator",
    "evaluate_lvis_faster",
    "faster_classes_in_detectron2",
    "resolve_coco_eval_backend",
]

logger = logging.getLogger(__name__)
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# faster-coco-eval's ``stats_as_dict`` names of LVIS_METRICS, in order.
_FASTER_LVIS_NAMES = ("AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf")
_SWAP_LOCK = threading.RLock()  # one rebinding at a time, even from threads
_fallback_logged = False  # "auto" without faster-coco-eval says so once per process


def _faster_import_error():
    """None when faster_coco_eval imports, else the ImportError (imported on demand: optional)."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError as error:
        return error
    return None


def resolve_coco_eval_backend(requested: str) -> str:
    """The backend that runs for ``TEST.COCO_EVAL_BACKEND = requested``: "faster" or "pycocotools"."""
    global _fallback_logged
    if requested not in COCO_EVAL_BACKENDS:
        raise ValueError(f"TEST.COCO_EVAL_BACKEND must be one of {COCO_EVAL_BACKENDS}, got {requested!r}")
    if requested == "pycocotools":
        return "pycocotools"
    error = _faster_import_error()
    if error is None:
        return "faster"
    if requested == "faster":
        raise ImportError(
            f"TEST.COCO_EVAL_BACKEND is 'faster' but faster_coco_eval does not import ({error}); "
            "pip install faster-coco-eval==1.8.0, or set it to 'auto' or 'pycocotools'"
        ) from error
    if not _fallback_logged:
        _fallback_logged = True
        logger.warning(f"faster_coco_eval does not import ({error}): COCO / LVIS evaluation uses pycocotools / lvis")
    return "pycocotools"


@contextlib.contextmanager
def _rebound(module, **names):
    """Rebind ``module.<name>`` for the block. A name detectron2 no longer has raises (a renamed
    internal must fail loudly, not fall back to pycocotools unnoticed)."""
    with _SWAP_LOCK:
        saved = {name: getattr(module, name) for name in names}
        for name, value in names.items():
            setattr(module, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)


def faster_classes_in_detectron2():
    """Context in which detectron2's COCO evaluation runs faster-coco-eval's pycocotools-
    compatible ``COCOeval`` (which also summarizes a custom maxDets the way COCOevalMaxDets does:
    AP and AR at the cap, AR at maxDets[0] and [1])."""
    from faster_coco_eval import cocoeval

    return _rebound(d2_coco, COCOeval_opt=cocoeval.COCOeval, COCOevalMaxDets=cocoeval.COCOeval)


def faster_coco(dataset):
    """faster-coco-eval's ``COCO`` index over a json path, or an already loaded json dict (the
    dict is shared, not copied nor read again)."""
    from faster_coco_eval import COCO

    return COCO(dataset)


class FasterCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator``, evaluating with faster-coco-eval; same arguments."""

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, **kwargs):
        # use_fast_impl=False: detectron2 would only log that its own C++ class is not built.
        super().__init__(dataset_name, tasks, distributed, output_dir, **{**kwargs, "use_fast_impl": False})
        self._use_fast_impl = True  # detectron2 then takes the class bound to COCOeval_opt
        # loadRes and the evaluation need faster-coco-eval's COCO; the json is not read twice.
        self._coco_api = faster_coco(self._coco_api.dataset)

    def _eval_predictions(self, predictions, img_ids=None):
        with faster_classes_in_detectron2():
            super()._eval_predictions(predictions, img_ids=img_ids)


def limit_dets_per_image(results, max_dets):
    """The ``lvis`` API's cap: the ``max_dets`` best-scoring results of each image over all
    categories (faster-coco-eval's maxDets caps each image *and category*). Same order as
    ``LVISResults`` (images by first appearance; a capped image sorted by score, ties stable)."""
    per_image = defaultdict(list)
    for result in results:
        per_image[result["image_id"]].append(result)
    kept = []
    for anns in per_image.values():
        kept += anns if len(anns) <= max_dets else sorted(anns, key=lambda a: a["score"], reverse=True)[:max_dets]
    return kept


def evaluate_lvis_faster(coco_gt, lvis_results, iou_type, max_dets_per_image=None, class_names=None):
    """detectron2's ``_evaluate_predictions_on_lvis`` with faster-coco-eval's LVIS mode
    (``lvis_style``: federated negatives, not-exhaustive categories, APr / APc / APf) in place
    of ``LVISEval``; ``coco_gt``: a faster-coco-eval ``COCO``. Returns the metrics in percent.
    ``class_names`` is accepted and unused, as by detectron2 (LVIS reports no per-class AP)."""
    from faster_coco_eval import COCOeval_faster

    if not lvis_results:
        logger.warning("No predictions from the model!")
        return {metric: float("nan") for metric in LVIS_METRICS}
    # Shallow copies: loadRes adds fields (id, area) and the caller's dicts stay as they were. A
    # mask result drops its box, so mask areas, not box areas, decide small / medium / large.
    drop = {"bbox"} if iou_type == "segm" else set()
    lvis_results = [{k: v for k, v in result.items() if k not in drop} for result in lvis_results]
    max_dets = 300 if max_dets_per_image is None else max_dets_per_image  # LVIS's default
    coco_dt = coco_gt.loadRes(limit_dets_per_image(lvis_results, max_dets))
    lvis_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=True, print_function=logger.info)
    lvis_eval.params.maxDets = [max_dets]
    lvis_eval.run()
    stats = lvis_eval.stats_as_dict
    results = {metric: float(stats[name] * 100) for metric, name in zip(LVIS_METRICS, _FASTER_LVIS_NAMES)}
    logger.info(f"Evaluation results for {iou_type}: \n" + create_small_table(results))
    return results


class FasterLVISEvaluator(LVISEvaluator):
    """detectron2's ``LVISEvaluator``, evaluating with faster-coco-eval; same arguments. The json
    is still read by the ``lvis`` API (whether there are annotations, box proposals)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._faster_gt = None  # built on first use, over the lvis API's loaded dict

    def _evaluate_on_lvis(self, lvis_gt, lvis_results, iou_type, **kwargs):
        if self._faster_gt is None:
            self._faster_gt = faster_coco(lvis_gt.dataset)
        return evaluate_lvis_faster(self._faster_gt, lvis_results, iou_type, **kwargs)

    def _eval_predictions(self, predictions):
        with _rebound(d2_lvis, _evaluate_predictions_on_lvis=self._evaluate_on_lvis):
            super()._eval_predictions(predictions)


def build_coco_evaluator(dataset_name, backend, **kwargs):
    """``COCOEvaluator(dataset_name, **kwargs)`` for ``backend`` in COCO_EVAL_BACKENDS."""
    if resolve_coco_eval_backend(backend) == "faster":
        return FasterCOCOEvaluator(dataset_name, **kwargs)
    return COCOEvaluator(dataset_name, **kwargs)


def build_lvis_evaluator(dataset_name, backend, *args, **kwargs):
    """``LVISEvaluator(dataset_name, *args, **kwargs)`` for ``backend`` in COCO_EVAL_BACKENDS."""
    cls = FasterLVISEvaluator if resolve_coco_eval_backend(backend) == "faster" else LVISEvaluator
    return cls(dataset_name, *args, **kwargs)
