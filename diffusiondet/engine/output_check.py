"""Fail before the work, not after it: probe that a results folder takes a file (issue #21).

An evaluation writes its results only once the inference is over (minutes to hours); a full disk
or a read-only folder would then lose them. Writing a small temporary file first turns that into
an error at start-up that names the folder.
"""
import os
import tempfile

# Big enough that a disk with almost no room left fails the probe, small enough to cost nothing.
PROBE_BYTES = 64 * 1024


class OutputNotWritableError(OSError):
    """A folder that results will be written to takes no file (full disk, read-only, not a folder)."""


def check_writable_dir(folder: str, what: str) -> None:
    """Create ``folder`` and write (then delete) a temporary file in it; raise
    :class:`OutputNotWritableError` naming ``folder`` and ``what`` would be lost if that fails."""
    try:
        os.makedirs(folder, exist_ok=True)
        # The probe is a real file of the folder: a full disk fails at write/flush/fsync, a
        # read-only folder at creation; the temporary name cannot collide with a results file.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-") as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        raise OutputNotWritableError(
            e.errno, f"cannot write {what} to {folder}: {e.strerror or e} (checked before any work was done)"
        ) from e
