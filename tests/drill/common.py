"""The fault-drill harness: a case provokes one fault for real and proves it was handled.

A case is *handled* when the project either raises a clear error that names the culprit (file,
key or value) or logs a skip naming it, and nothing else is lost (the other images, the other
annotations, the previous checkpoint...). A case function returns a one-line description of what
happened; it raises :class:`Silent` when the fault went unnoticed or lost something. Any other
exception escaping a case counts as silent too (a crash with an unclear message is not handling).
"""
import contextlib
import io
import logging
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type


class Silent(AssertionError):
    """The fault was not handled: no clear error or logged skip, or something else was lost."""


@dataclass
class Case:
    """One fault. ``run(workdir)`` gets an empty folder and returns how the fault was handled."""

    category: str
    name: str
    run: Callable[[str], str]
    slow: bool = False  # skipped by ``--fast`` (CI); the full drill runs every case

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


@dataclass
class Result:
    case: Case
    handled: bool
    detail: str
    seconds: float


def run_case(case: Case) -> Result:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"drill-{case.name}-") as workdir:
        try:
            # pycocotools and detectron2 print their own tables; keep one line per case.
            with contextlib.redirect_stdout(io.StringIO()):
                detail, handled = case.run(workdir), True
        except Silent as e:
            detail, handled = f"SILENT: {e}", False
        except Exception as e:  # noqa: BLE001 - an unexpected crash is an unhandled fault
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            detail, handled = f"SILENT (unexpected crash): {tb}", False
    return Result(case, handled, _one_line(detail), time.perf_counter() - start)


def summary_line(results: Sequence[Result]) -> str:
    handled = sum(r.handled for r in results)
    return f"tried {len(results)}, handled {handled}, silent {len(results) - handled}"


def _one_line(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names_all(message: str, names: Iterable[str]) -> List[str]:
    return [str(n) for n in names if str(n) not in message]


def expect_error(
    fn: Callable[[], object],
    *,
    names: Sequence[str] = (),
    exc: Tuple[Type[BaseException], ...] = (Exception,),
) -> str:
    """Run ``fn``; it must raise one of ``exc`` whose message contains every string of ``names``."""
    try:
        fn()
    except exc as e:
        message = f"{type(e).__name__}: {e}"
        missing = _names_all(message, names)
        if missing:
            raise Silent(f"error does not name {missing}: {_one_line(message)}") from e
        return "error " + _one_line(message, 180)
    raise Silent("no error raised")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_logs(logger_name: str = "", level: int = logging.INFO):
    """Collect the messages of ``logger_name`` (and its children) at ``level`` and above."""
    handler = _Capture()
    handler.setLevel(level)
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def expect_logged(messages: Sequence[str], names: Sequence[str]) -> str:
    """One of ``messages`` must contain every string of ``names``; returns it."""
    for message in messages:
        if not _names_all(message, names):
            return "logged " + _one_line(message, 180)
    raise Silent(f"no log line names {list(names)}; got {[_one_line(m, 80) for m in messages[-3:]]}")


def check(condition: bool, message: str) -> None:
    """Raise :class:`Silent` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise Silent(message)


def select(cases: Sequence[Case], fast: bool, only: Optional[str] = None) -> List[Case]:
    chosen = [c for c in cases if not (fast and c.slow)]
    if only:
        chosen = [c for c in chosen if only in c.id]
    return chosen
