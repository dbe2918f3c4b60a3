"""Progress bars with an ETA for the long steps of the main job (data generation, training,
evaluation, the (steps, boxes) sweep): tqdm, on stderr.

When the bars show: on a terminal only, by default (tqdm's ``disable=None``: off when the
stream is not a TTY). A log file or CI pipe would otherwise get a carriage-return rewrite of
the bar several times a second, and the long steps already log their progress there
(detectron2's periodic lines with an ETA every 20 iterations, "Inference done i/N" during an
evaluation, the dataset generator's start line). ``DIFFUSIONDET_PROGRESS=1`` forces the bars
(e.g. under ``| tee``), ``DIFFUSIONDET_PROGRESS=0`` hides them on a terminal too; an explicit
``enabled`` argument wins over both. Redraws are at most one per second (``mininterval``), so a
forced bar in a log file adds about one line fragment per second, not one per item.
"""
import os
import sys
from typing import Iterable, Optional

from tqdm import tqdm

__all__ = ["PROGRESS_ENV", "progress_bar", "progress_enabled"]

PROGRESS_ENV = "DIFFUSIONDET_PROGRESS"
_MIN_INTERVAL_S = 1.0


def progress_enabled(enabled: Optional[bool] = None) -> Optional[bool]:
    """True / False to force the bars, None to let tqdm decide by the stream (TTY or not):
    ``enabled`` if given, else ``$DIFFUSIONDET_PROGRESS`` ("1" / "0"), else None."""
    if enabled is not None:
        return bool(enabled)
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def progress_bar(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    leave: bool = True,
    enabled: Optional[bool] = None,
    file=None,
) -> tqdm:
    """A tqdm bar (iterable wrapper or, without ``iterable``, a bar to ``update``) on ``file``
    (default stderr) that shows elapsed time, rate and ETA. ``enabled``: see
    :func:`progress_enabled`; a disabled bar writes nothing (and, as in tqdm, does not count)."""
    flag = progress_enabled(enabled)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        leave=leave,
        disable=None if flag is None else not flag,
        file=sys.stderr if file is None else file,
        mininterval=_MIN_INTERVAL_S,
        dynamic_ncols=True,
    )
