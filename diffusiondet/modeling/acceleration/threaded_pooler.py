"""Multi-level RoIAlign whose CPU work is split over threads (the maths of detectron2's ROIPooler).

Shape legend: B images, M RoIs of the batch (image-major), D channels, R pooled side,
L feature levels. Boxes are abs xyxy in the un-padded input image frame.

Why: torchvision's CPU ``roi_align`` kernel is single-threaded and, at inference, is the largest
single cost of the head (25-50 % of a head call at 1000 boxes on a 2-core CPU). The kernel
releases the GIL and every RoI is computed independently, so pooling disjoint RoI subsets in
parallel threads gives bit-identical outputs. detectron2's ``ROIPooler`` also zero-fills the
(M, D, R, R) output before scattering each level into it; here every row is written exactly once,
so the buffer is left uninitialised. In training, the RoIAlign backward (about 6x its forward,
also single-threaded) is split by image, which keeps it bit-identical (see _ThreadedRoIAlign).
"""
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.modeling.poolers import (
    ROIPooler,
    assign_boxes_to_levels,
    convert_boxes_to_pooler_format,
)
from detectron2.structures import Boxes

__all__ = ["ThreadedROIPooler", "shared_executor"]

_executor_lock = threading.Lock()
_executor: Tuple[int, Optional[ThreadPoolExecutor]] = (0, None)


def shared_executor(num_workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``num_workers`` threads, reused across calls."""
    global _executor
    with _executor_lock:
        if _executor[0] < num_workers:
            if _executor[1] is not None:
                _executor[1].shutdown(wait=False)
            _executor = (num_workers, ThreadPoolExecutor(num_workers, "diffdet-roi-pool"))
        return _executor[1]


def _run_parts(fn, parts) -> list:
    """``fn(part)`` for every part, the first on the calling thread, the rest on the pool."""
    futures = [shared_executor(len(parts) - 1).submit(fn, p) for p in parts[1:]]
    return [fn(parts[0])] + [future.result() for future in futures]


class _ThreadedRoIAlign(torch.autograd.Function):
    """torchvision's ``roi_align`` of one level with the work split over threads, forward and
    backward; the forward is bit-identical to the serial kernel.

    Backward: the RoIs of image b only touch image b's map, so with B > 1 each thread scatters
    whole images, each into that image's own gradient, in the serial kernel's RoI order: the
    same additions in the same order, bit-identical, and no buffer beyond the serial one. With
    one image the RoIs are split instead and the per-thread gradients summed (float rounding)."""

    @staticmethod
    def forward(ctx, feature, rois, spatial_scale, output_size, sampling_ratio, aligned, parts):
        row_parts = [rows for rows in torch.arange(len(rois)).tensor_split(parts) if rows.numel()]
        ctx.save_for_backward(rois)
        ctx.config = (spatial_scale, output_size, sampling_ratio, aligned, parts, feature.shape)
        ctx.row_parts = row_parts  # the one-image backward splits the same way

        def pool(rows):
            with torch.no_grad():  # grad mode is per thread; this Function is the graph node
                return torch.ops.torchvision.roi_align(
                    feature, rois[rows], spatial_scale, *output_size, sampling_ratio, aligned
                )

        if not row_parts:  # an empty level still gets a (zero) gradient, as in ROIPooler
            return feature.new_empty((0, feature.shape[1]) + tuple(output_size))
        return torch.cat(_run_parts(pool, row_parts))

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        spatial_scale, output_size, sampling_ratio, aligned, parts, shape = ctx.config
        grad_output = grad_output.contiguous()
        row_parts = ctx.row_parts

        def scatter(rows):
            return torch.ops.torchvision._roi_align_backward(
                grad_output[rows], rois[rows], spatial_scale, *output_size, *shape,
                sampling_ratio, aligned,
            )  # fmt: skip

        none = (None,) * 6
        if shape[0] > 1:
            image = rois[:, 0].long()
            rows_of = [torch.nonzero(image == b).squeeze(1) for b in range(shape[0])]

            def scatter_images(images):
                grads = []
                for b in images.tolist():
                    local = rois[rows_of[b]].clone()
                    local[:, 0] = 0  # image b's rows against image b's map alone
                    grads.append(torch.ops.torchvision._roi_align_backward(
                        grad_output[rows_of[b]], local, spatial_scale, *output_size, 1, *shape[1:],
                        sampling_ratio, aligned,
                    ))  # fmt: skip
                return grads

            groups = torch.arange(shape[0]).tensor_split(min(parts, shape[0]))
            per_image = [g for grads in _run_parts(scatter_images, groups) for g in grads]
            return (torch.cat(per_image),) + none
        if not row_parts:
            return (grad_output.new_zeros(shape),) + none
        partial = _run_parts(scatter, row_parts)
        return (sum(partial[1:], partial[0]),) + none


class ThreadedROIPooler(ROIPooler):
    """detectron2 :class:`ROIPooler` (same arguments, no state) with a threaded CPU inference path.

    The threaded path is taken for CPU features when no gradient is needed; otherwise (GPU,
    training, tracing/compiling, ``num_threads == 1``) the call is exactly ``ROIPooler.forward``.
    """

    def __init__(self, *args, num_threads: int = 0, threaded_backward: bool = True, **kwargs):
        """
        Args:
            *args, **kwargs: :class:`ROIPooler` arguments (output_size, scales, sampling_ratio,
                pooler_type, ...).
            num_threads: threads pooling RoIs in parallel; 0 = ``torch.get_num_threads()`` at
                call time, 1 = detectron2's serial pooler.
            threaded_backward: also split training's RoIAlign (forward and backward) over the
                threads; False = detectron2's pooler whenever gradients are needed.
        """
        super().__init__(*args, **kwargs)
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0 = automatic), got {num_threads}")
        self.num_threads = num_threads
        # Training on CPU: RoIAlign's forward and backward split over the same threads (the
        # gradient is bit-identical with 2+ images, equal up to float rounding with one).
        self.threaded_backward = threaded_backward

    def resolved_num_threads(self) -> int:
        """Threads used by the next CPU call."""
        return self.num_threads or torch.get_num_threads()

    def _threaded_path(self, x: Sequence[torch.Tensor], num_rois: int) -> str:
        """"inference" (threads, no autograd), "training" (threaded autograd Function) or
        "serial" (detectron2's ROIPooler: GPU, tracing / compiling, one thread or one RoI)."""
        if self.resolved_num_threads() <= 1 or num_rois < 2 or x[0].device.type != "cpu":
            return "serial"
        if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return "serial"
        if not (torch.is_grad_enabled() and any(level.requires_grad for level in x)):
            return "inference"
        aligns = self.level_poolers[0].__class__.__name__ == "ROIAlign"
        return "training" if self.threaded_backward and aligns else "serial"

    def _pooler_boxes_and_levels(self, box_lists: List[Boxes]):
        """(M, 5) image index + xyxy rows and (M,) level offsets, as ``ROIPooler.forward``."""
        pooler_boxes = convert_boxes_to_pooler_format(box_lists)
        if len(self.level_poolers) == 1:
            return pooler_boxes, torch.zeros(len(pooler_boxes), dtype=torch.long)
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        return pooler_boxes, levels

    def forward(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """
        Args:
            x: L feature maps (B, D, H_l, W_l), finest first.
            box_lists: B :class:`Boxes` of abs xyxy boxes.

        Returns:
            (M, D, R, R) pooled features, image-major, identical to ``ROIPooler.forward``.
        """
        num_rois = sum(len(boxes) for boxes in box_lists)
        path = self._threaded_path(x, num_rois)
        if path == "training":
            return self._forward_with_grad(x, box_lists)
        if path == "serial":
            return super().forward(x, box_lists)
        pooler_boxes, levels = self._pooler_boxes_and_levels(box_lists)
        # Every row is written below, so unlike ROIPooler no zero fill; torchvision returns the
        # features' dtype even under autocast.
        output = x[0].new_empty((num_rois, x[0].shape[1]) + tuple(self.output_size))

        num_parts = min(self.resolved_num_threads(), num_rois)
        # Part p pools a contiguous slice of every level's RoIs: balanced, disjoint rows.
        parts = [[] for _ in range(num_parts)]
        for level in range(len(self.level_poolers)):
            level_rois = torch.nonzero(levels == level).squeeze(1)
            for part, rows in zip(parts, level_rois.tensor_split(num_parts)):
                if rows.numel():
                    part.append((level, rows))

        # A box with NaN or negative area gets no level; ROIPooler leaves its row zero.
        unassigned = (levels < 0) | (levels >= len(self.level_poolers))
        if bool(unassigned.any()):
            output[unassigned] = 0

        autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

        def pool_part(part) -> None:
            # Grad and autocast modes are thread-local: re-enter the caller's.
            with torch.no_grad(), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                for level, rows in part:
                    pooled = self.level_poolers[level](x[level], pooler_boxes[rows])
                    output.index_put_((rows,), pooled)

        _run_parts(pool_part, parts)  # the calling thread takes a share instead of idling
        return output

    def _forward_with_grad(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """Training: ``ROIPooler.forward``'s computation, each level's RoIAlign (and, above all,
        its backward, ~6x the forward and single-threaded in torchvision) split over threads."""
        pooler_boxes, levels = self._pooler_boxes_and_levels(box_lists)
        output = x[0].new_zeros((len(pooler_boxes), x[0].shape[1]) + tuple(self.output_size))
        for level, pooler in enumerate(self.level_poolers):
            rows = torch.nonzero(levels == level).squeeze(1)
            pooled = _ThreadedRoIAlign.apply(
                x[level], pooler_boxes[rows].to(x[level].dtype), pooler.spatial_scale,
                tuple(self.output_size), pooler.sampling_ratio, pooler.aligned,
                max(1, min(self.resolved_num_threads(), rows.numel())),
            )  # fmt: skip
            output = output.index_put((rows,), pooled)
        return output
