"""Count the operations that make the host wait for the device, on any device (CPU included).

On a GPU, a kernel whose output size or value the host needs (``nonzero``, ``.item()``,
``.tolist()``, ``unique``, boolean-mask indexing, NMS) blocks until all queued work is done.
``torch.cuda.set_sync_debug_mode`` only exists on CUDA; this counter sees the same operations
at the dispatcher, so a CPU test can check that a code path is free of them.

    with HostSyncCounter() as syncs:
        model.inference(batch)
    print(syncs.total, syncs.by_op)
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "SYNCING_OPS"]

# Operations whose result's size or value is data-dependent, so the host must read the device.
SYNCING_OPS = (
    "aten::_local_scalar_dense",  # .item(), .tolist(), bool(tensor), int(tensor)
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::is_nonzero",
    "torchvision::nms",
)


class HostSyncCounter(TorchDispatchMode):
    """Dispatch mode counting ``SYNCING_OPS`` calls, plus indexing with a boolean mask and
    ``repeat_interleave`` with tensor repeats (both size their output from the data).

    Attributes:
        by_op: op name -> count.
    """

    def __init__(self):
        super().__init__()
        self.by_op = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING_OPS:
            self.by_op[name] += 1
        elif name in ("aten::index", "aten::index_put_", "aten::index_put") and _has_bool_index(args):
            self.by_op[f"{name} (bool mask)"] += 1
        elif name == "aten::repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor"):
            self.by_op[f"{name} (tensor repeats)"] += 1
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices or ())
