"""Checkpoints that survive a kill or a full disk, and weights that must fit the model.

detectron2 writes checkpoints and ``last_checkpoint`` in place, so a kill or a full disk while
writing leaves a truncated file under the real name (or an empty ``last_checkpoint``, which breaks
``--resume``). It also loads a checkpoint of another architecture "successfully": mismatched
tensors are skipped with a log line and the model trains or evaluates from random weights.
And it unpickles model-zoo ``.pkl`` files with plain ``pickle.load``, so a downloaded file can run
any code. Here loading is safe by default (see :func:`load_pickle_weights` and ``docs/untrusted_inputs.md``).
"""
import contextlib
import glob
import logging
import os
import pickle
import re
import tempfile
from typing import Callable, List, Sequence, Tuple
from urllib.parse import urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

# The only layers whose shape may legitimately differ from a checkpoint's: their width is the
# number of classes, so fine-tuning on a dataset with another NUM_CLASSES re-initialises them.
# The criterion's federated-loss weights (LVIS) are per class too.
CLASS_DEPENDENT_LAYERS = ("class_logits.", "fed_loss_cls_weights")
# How many keys an error message lists (the full list goes to the log).
_LISTED = 12

_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


# What detectron2 and Detectron (Caffe2) model-zoo pickles hold: dicts of numpy arrays, strings
# and numbers. numpy pickles an array as ``_reconstruct(ndarray, ...)`` + ``dtype`` (its module
# moved to ``numpy._core`` in numpy 2), a scalar as ``scalar``; Python 3 pickles bytes as
# ``_codecs.encode(str, "latin1")`` (protocol 2). Everything else (os.system, eval, any class) is
# code that a weights file has no reason to run.
_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
}


class _WeightsUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals of ``_PICKLE_ALLOWED`` (and numpy's dtype
    classes such as ``numpy.dtypes.Float32DType``, which numpy 2 pickles a dtype with)."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_pickle_weights(path: str, trust_code: bool = False):
    """Unpickle a model-zoo ``.pkl`` file; only data (no code) unless ``trust_code``.

    Raises CheckpointError naming the file and the refused global."""
    with open(path, "rb") as f:
        if trust_code:
            return pickle.load(f, encoding="latin1")  # Detectron1 files are Python 2 pickles
        try:
            return _WeightsUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            if str(e).startswith("refused global"):
                raise CheckpointError(
                    f"{path} is not a plain weights file (contains code): {e}. Model-zoo pickles"
                    " hold only dicts, numbers, strings and numpy arrays; if you trust this file,"
                    " set MODEL.TRUST_WEIGHTS True to load it with full pickle"
                ) from e
            raise


def check_finite_state(state: dict, what: str) -> None:
    """Raise CheckpointError when a floating tensor of ``state`` holds a NaN or an infinity,
    naming ``what`` (the file) and the first tensors with their count of non-finite values."""
    bad = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad.append((key, count))
    if bad:
        total = sum(c for _, c in bad)
        listed = ", ".join(f"{k} ({c})" for k, c in bad[:_LISTED])
        more = f", ... ({len(bad)} tensors in all)" if len(bad) > _LISTED else ""
        raise CheckpointError(
            f"{what} has {total} non-finite (NaN/inf) weights in {len(bad)} tensors: {listed}{more};"
            " the file is corrupt or the model diverged"
        )


def atomic_write(path: str, write: Callable) -> None:
    """Write ``path`` through ``write(binary_file)`` so that readers see the old or the new file.

    The data goes to a temporary file in the same folder (same file system, so ``os.replace`` is
    atomic), is fsync'ed, then renamed over ``path``; on any failure the temporary file is removed
    and ``path`` is untouched. A hard kill can leave a ``.<name>.*.tmp`` file, never a torn ``path``.
    """
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide checkpoints from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk, or a power cut could bring the old name back.
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _is_remote(path: str) -> bool:
    return "://" in path


def _shapes(items: Sequence[Tuple[str, tuple, tuple]]) -> str:
    listed = ", ".join(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in items[:_LISTED])
    return listed + (f", ... ({len(items) - _LISTED} more in the log)" if len(items) > _LISTED else "")


def _keys(state: dict, names: List[str]) -> str:
    listed = ", ".join(f"{k} {tuple(getattr(state.get(k), 'shape', ()))}" for k in names[:_LISTED])
    return listed + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


class DiffusionDetCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, errors naming the file, and a weights-fit policy.

    Weights policy (``load``): a checkpoint may cover only part of the model (an ImageNet or
    detector backbone: missing keys are logged, as in detectron2), and may differ in the
    class-dependent layers (fine-tuning with another NUM_CLASSES: a warning lists them). It is an
    error, listing keys and shapes, when any other tensor has a different shape (another
    HIDDEN_DIM, depth, ...: those layers would silently stay random) or when not a single model
    tensor could be loaded (another model family, e.g. a torchvision classifier's state dict).
    The error comes after detectron2 has loaded the matching tensors: do not use the model then.
    """

    _loading = None  # the path being loaded, for messages
    # Load .pkl files with full pickle and .pth files with torch.load(weights_only=False): code in
    # them runs. Only for files one trusts (MODEL.TRUST_WEIGHTS); see load_pickle_weights.
    trust_code = False
    # ``collect_state() -> dict``, called on every rank at every save (it may run collectives);
    # its result is stored at the checkpoint's top level. The trainer sets it to gather the RNG
    # states of all ranks and the data position (``docs/reproducibility.md``).
    collect_state = None

    def save(self, name: str, **kwargs) -> None:
        if self.collect_state is not None:
            kwargs = {**self.collect_state(), **kwargs}
        if not self.save_dir or not self.save_to_disk or _is_remote(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        # A NaN model saved under a checkpoint name is a "success" that resumes or evaluates as
        # garbage: refuse before writing, so last_checkpoint keeps naming the last good one.
        check_finite_state(data["model"], f"the model to be saved as {os.path.join(self.save_dir, name)}.pth")
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        _remove_stale_temporaries(self.save_dir, basename)
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
        except Exception as e:
            raise self._save_error(save_file, e) from e
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if _is_remote(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _remove_stale_temporaries(self.save_dir, "last_checkpoint")
        try:
            atomic_write(path, lambda f: f.write(last_filename_basename.encode()))
        except Exception as e:
            raise self._save_error(path, e) from e

    def _save_error(self, path: str, error: Exception) -> Exception:
        previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        reason = getattr(error, "strerror", None) or f"{type(error).__name__}: {error}"
        message = f"could not write checkpoint {path}: {reason}; {kept}"
        if isinstance(error, OSError):
            return OSError(error.errno, message)
        return CheckpointError(message)

    def load(self, path, *args, **kwargs):
        if path and not _is_remote(path):
            local = urlparse(path)._replace(query="").geturl()  # "file.pth?matching_heuristics=True"
            if not os.path.isfile(local):
                raise FileNotFoundError(f"checkpoint file not found: {local}")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def __init__(self, model, save_dir: str = "", *, trust_code: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.trust_code = trust_code

    def _load_file(self, filename):
        try:
            if filename.endswith(".pkl"):
                return self._load_pickle(filename)
            return super()._load_file(filename)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"cannot read checkpoint {filename}: it is truncated, corrupt or not a PyTorch/"
                f"detectron2 checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e

    def _torch_load(self, f):
        # weights_only explicitly (torch's default changed in 2.6 and may change again); a refused
        # global means the file holds code, which is not the "truncated or corrupt" of any other
        # error.
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=not self.trust_code)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise  # a truncated or corrupt file: _load_file says so
            # torch words it "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y whose
            # module x is blocked" depending on the global.
            refused = re.search(r"(?i)unsupported (?:global: )?GLOBAL (\S+)", str(e))
            what = f"the global {refused.group(1)}" if refused else "an object that is not data"
            raise CheckpointError(
                f"{f} is not a plain checkpoint (contains code): torch.load(weights_only=True)"
                f" refused {what}. If you trust this file, set MODEL.TRUST_WEIGHTS True to load it"
                " with full pickle"
            ) from e

    def _load_pickle(self, filename):
        """detectron2's .pkl branch with the restricted unpickler: the same two formats."""
        data = load_pickle_weights(filename, self.trust_code)
        if not isinstance(data, dict):
            raise CheckpointError(f"{filename} is not a model-zoo file: it holds a {type(data).__name__}")
        if "model" in data and "__author__" in data:  # detectron2 model zoo
            self.logger.info("Reading a file from '%s'", data["__author__"])
            return data
        data = data.get("blobs", data)  # Caffe2 / Detectron1: detection models have "blobs"
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _load_model(self, checkpoint):
        state = dict(checkpoint.get("model") or {})  # super() pops the mismatched keys from it
        incompatible = super()._load_model(checkpoint)
        self._check_fit(incompatible, state)
        return incompatible

    def _check_fit(self, incompatible, checkpoint_state: dict) -> None:
        path = self._loading or "checkpoint"
        model_state = self.model.state_dict()
        missing = set(incompatible.missing_keys)
        loaded = [k for k in model_state if k not in missing]
        # A flipped byte or a diverged run gives NaN/inf weights that load "successfully" and only
        # fail at inference (detectron2's "Box tensor contains infinite or NaN" assertion).
        check_finite_state({k: model_state[k] for k in loaded}, path)
        wrong_shape = [s for s in incompatible.incorrect_shapes if not _is_class_layer(s[0])]
        if wrong_shape or not loaded:
            self._log_incompatible_keys(incompatible)
        if wrong_shape:
            raise CheckpointError(
                f"{path} is from another architecture: {len(wrong_shape)} tensors have other shapes"
                f" (checkpoint vs model): {_shapes(wrong_shape)}. Set the MODEL.* keys (HIDDEN_DIM,"
                " DIM_FEEDFORWARD, RESNETS.DEPTH, ...) the checkpoint was trained with; only the"
                f" class layers ({', '.join(CLASS_DEPENDENT_LAYERS)}) may differ."
            )
        if not loaded:
            raise CheckpointError(
                f"{path} fits none of the model's {len(model_state)} tensors; checkpoint keys:"
                f" {_keys(checkpoint_state, list(checkpoint_state))}; model parameters:"
                f" {_keys(model_state, [k for k, _ in self.model.named_parameters()])}. Convert"
                " the names first (torchvision backbones: detectron2's convert-torchvision-to-d2.py)"
            )
        reinitialised = [s for s in incompatible.incorrect_shapes if s not in wrong_shape]
        if reinitialised:
            logger.warning(
                "%s: class layers re-initialised for fine-tuning (another NUM_CLASSES): %s",
                path, _shapes(reinitialised),
            )


def _remove_stale_temporaries(folder: str, basename: str) -> None:
    """Delete ``.<basename>.*.tmp`` files that a process killed while saving left behind.

    Only the main process saves, and it is the one calling this before its own write, so such a
    file can only belong to a dead writer."""
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(basename)}.*.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(stale)
            logger.info("Removed %s, left by a save that was interrupted", stale)


def _is_class_layer(key: str) -> bool:
    return any(layer in key for layer in CLASS_DEPENDENT_LAYERS)


def load_model_weights(model, cfg, path=None, ema=None) -> None:
    """Load ``path`` (default ``cfg.MODEL.WEIGHTS``) into ``model`` for inference, with the checks
    of training (safe unpickling unless MODEL.TRUST_WEIGHTS, architecture, shapes, finite values).
    ``ema`` (default ``cfg.MODEL_EMA.ENABLED``): load the file's EMA weights (``ema_state``; an
    error naming the file when it has none) instead of its raw ``model`` weights (ema.py).

    The tools that evaluate or run a model (train_net.py --eval-only, demo.py, sweep.py,
    run_main_job.py) load through here: without weights, a randomly initialised model would
    produce detections and an AP as if nothing were wrong, so an empty path is an error."""
    path = cfg.MODEL.WEIGHTS if path is None else path
    if not path:
        raise CheckpointError(
            "MODEL.WEIGHTS is empty: inference needs trained weights (MODEL.WEIGHTS path/to/model.pth);"
            " a randomly initialised model would be evaluated"
        )
    use_ema = cfg.MODEL_EMA.ENABLED if ema is None else ema
    if use_ema:
        from .ema import load_ema_weights  # ema.py imports this module at its top

        return load_ema_weights(model, path, trust_code=cfg.MODEL.TRUST_WEIGHTS)
    DiffusionDetCheckpointer(model, trust_code=cfg.MODEL.TRUST_WEIGHTS).load(path)
    logger.info("Loaded the raw weights (model) of %s", path)
