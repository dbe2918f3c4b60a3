"""Make the ``lvis`` 0.5.3 API (the only release, used by detectron2's LVISEvaluator) run on numpy 2.

``LVISEval.accumulate`` calls ``.astype(dtype=np.float)``; the ``np.float`` alias of the builtin
``float`` was removed in numpy 1.24. Restoring the alias is the smallest fix that leaves the
installed package untouched, and the alias meant exactly ``float``.
"""
import numpy as np

__all__ = ["ensure_lvis_numpy_compat"]


def ensure_lvis_numpy_compat() -> None:
    """Define ``np.float = float`` if this numpy lacks it (idempotent)."""
    if "float" not in np.__dict__:
        np.float = float
