"""Checkpoint retention (SOLVER.CHECKPOINT_MAX_KEEP; docs/training_extras.md, "Checkpoint
retention"): detectron2's periodic checkpointer with ``max_to_keep``, minus the duplicate final.

detectron2 writes ``model_<iter>.pth`` every CHECKPOINT_PERIOD iterations and ``model_final.pth``
after the last one; when MAX_ITER is a multiple of the period, both are written for the last
iteration: two identical files (159 MB each for DiffusionDet R50). Here the last iteration writes
``model_final.pth`` only, and with CHECKPOINT_MAX_KEEP = n > 0 only the n newest periodic files
are kept (fvcore's ``max_to_keep``); ``model_final.pth`` is never deleted.
"""
import os
import re
from typing import List

from detectron2.engine import hooks

__all__ = ["RetainingPeriodicCheckpointer", "periodic_checkpointer"]


class RetainingPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """``hooks.PeriodicCheckpointer`` that writes only ``model_final`` at the last iteration and,
    with ``max_to_keep`` > 0, deletes the older periodic files.

    Only the process that writes checkpoints deletes (the other ranks keep the hook for the
    collectives of the save, see Trainer.build_hooks). The files counted are ``model_<iter>.pth``
    written by this hook and, in a resumed run, those of the interrupted run (including the
    StopOnSignal checkpoint that it was resumed from, which has the same name pattern) up to the
    resumed iteration: a run resumed many times keeps ``max_to_keep`` files, not one per part.
    Files are deleted only after a newer checkpoint has been written.
    """

    def __init__(self, checkpointer, period: int, max_to_keep: int = 0):
        writes = getattr(checkpointer, "save_to_disk", True)
        super().__init__(checkpointer, period, max_to_keep=max_to_keep if max_to_keep > 0 and writes else None)

    def before_train(self):
        super().before_train()
        if self.max_to_keep and self.trainer.start_iter > 0:
            self.recent_checkpoints = self.earlier_checkpoints(self.trainer.start_iter)

    def earlier_checkpoints(self, before_iter: int) -> List[str]:
        """Paths of the ``<prefix>_<iter>.pth`` files in the output folder with iter < before_iter,
        oldest first."""
        folder = self.checkpointer.save_dir
        pattern = re.compile(re.escape(self.file_prefix) + r"_(\d{7})\.pth")
        found = []
        for name in self.path_manager.ls(folder):
            match = pattern.fullmatch(name)
            if match and int(match.group(1)) < before_iter:
                found.append((int(match.group(1)), os.path.join(folder, name)))
        return [path for _, path in sorted(found)]

    def step(self, iteration: int, **kwargs) -> None:
        iteration = int(iteration)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            # fvcore would also write <prefix>_<iter>.pth here when the period divides MAX_ITER.
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=iteration, **kwargs)
            return
        super().step(iteration, **kwargs)  # periodic save; drops at most one old file
        while self.max_to_keep and len(self.recent_checkpoints) > self.max_to_keep:
            old = self.recent_checkpoints.pop(0)  # several after a resume with a smaller max_to_keep
            if self.path_manager.exists(old):
                self.path_manager.rm(old)


def periodic_checkpointer(checkpointer, cfg) -> RetainingPeriodicCheckpointer:
    """The periodic checkpoint hook of ``cfg`` (SOLVER.CHECKPOINT_PERIOD, SOLVER.CHECKPOINT_MAX_KEEP)."""
    return RetainingPeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.CHECKPOINT_MAX_KEEP)
