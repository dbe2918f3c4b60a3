"""Instance interaction: each proposal generates a two-layer 1×1 conv over its RoI (Sparse
R-CNN's dynamic instance interaction, which the DiffusionDet decoder reuses: DiffusionDet paper,
arXiv 2211.09788, Sec. 3.2).

Shape legend: M = B·N proposals (all images flattened, image-major), P = pooler_resolution² RoI
bins, D = hidden_dim, DD = dim_dynamic.
"""
import functools
import glob

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES", "DynamicConv", "auto_chunk_bytes", "last_level_cache_bytes"
]

# Most bytes of generated parameters one chunk holds at inference. Per proposal the dynamic layer
# produces 2·D·DD values (128 KB at D=256, DD=64; 62.5 MB for 500 boxes). Smaller chunks re-read
# the 32 MB generator weight once per chunk with skinnier GEMMs; bigger ones spill the generated
# parameters out of cache before the bmm reads them. `tools/benchmark.py --chunk-sweep` on a
# 2-core Xeon (L2 2 MB/core, L3 300 MB), natively (AVX-512, 2 threads) and as an AVX2 machine
# (1 thread), 500 and 1000 boxes, two runs: 16 MB chunks were the fastest or within 6 % of it in
# all four settings (8 MB: 1-13 % slower; one chunk: 4-38 % slower; run-to-run noise ~5 %).
_MAX_CHUNK_BYTES = 16 << 20
# Never below this, whatever the cache: tiny chunks re-read the generator weight too often.
_MIN_CHUNK_BYTES = 4 << 20
# Off-CPU (GPU) inference: most bytes of generated parameters per chunk. Unchunked, batch 8 ×
# 2000 boxes generate 2.1 GB per stage; 512 MiB chunks are still 4096 proposals (fp32, R-50 sizes),
# big enough GEMMs for a GPU.
DEFAULT_MEMORY_BUDGET_BYTES = 512 << 20


# A constant to torch.compile: the step of the graph sampler is traced with fullgraph=True, and
# reading sysfs is not traceable.
@functools.lru_cache(maxsize=1)
@torch.compiler.assume_constant_result
def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (Linux sysfs), or 0 when it cannot be read."""
    sizes = []
    for size_file in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(size_file) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def auto_chunk_bytes() -> int:
    """Generated-parameter bytes per chunk: half the last-level cache, within [4, 16] MB.

    Half, so that a chunk's parameters and the RoI features they multiply stay cached together
    on CPUs with small caches (an 8 MB L3 gets 4 MB chunks); 16 MB at most, as measured above.
    """
    cache = last_level_cache_bytes()
    if cache <= 0:
        return _MAX_CHUNK_BYTES
    return max(_MIN_CHUNK_BYTES, min(_MAX_CHUNK_BYTES, cache // 2))


class DynamicConv(nn.Module):
    """Proposal-conditioned two-layer 1×1 conv over RoI features, then a flatten + linear.

    For one proposal with feature ``f`` (D,) and RoI features ``R`` (P, D):
    ``P1, P2 = split(dynamic_layer(f))`` reshaped to (D, DD) and (DD, D);
    ``x = relu(norm2(relu(norm1(R·P1))·P2))``; ``out = relu(norm3(out_layer(flatten(x))))``.
    Parameter names (``dynamic_layer``, ``norm1..3``, ``out_layer``) match official checkpoints.
    """

    def __init__(
        self,
        *,
        hidden_dim: int,
        dim_dynamic: int,
        pooler_resolution: int,
        num_dynamic: int = 2,
        chunk_size: int = 0,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ):
        """
        Args:
            hidden_dim: D, width of proposal and RoI features.
            dim_dynamic: DD, width between the two generated layers.
            pooler_resolution: RoI side length; P = pooler_resolution².
            num_dynamic: number of generated layers; only 2 exists in the official model.
            chunk_size: proposals processed together; 0 = automatic (see
                :meth:`resolved_chunk_size`). Results do not depend on it (up to float rounding).
            memory_budget_bytes: off-CPU inference with ``chunk_size`` 0: most bytes of generated
                parameters per chunk; 0 = unchunked.
        """
        super().__init__()
        if num_dynamic != 2:
            raise ValueError(f"DynamicConv supports num_dynamic=2 only, got {num_dynamic}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.chunk_size = chunk_size
        self.memory_budget_bytes = memory_budget_bytes
        self.num_params = hidden_dim * dim_dynamic  # values per generated layer
        self.dynamic_layer = nn.Linear(hidden_dim, num_dynamic * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def resolved_chunk_size(
        self, num_props: int, dtype: torch.dtype, needs_grad: bool, on_cpu: bool = True
    ) -> int:
        """Proposals per chunk.

        ``chunk_size`` if set. Otherwise all proposals at once when autograd will keep every
        chunk's parameters anyway (chunking would only make the GEMMs skinnier). On CPU, as many
        as fit :func:`auto_chunk_bytes` of generated parameters (sized from the CPU's caches).
        Off-CPU, as many as fit ``memory_budget_bytes`` (a GPU wants big batched GEMMs, not
        cache-sized ones, but not 2 GB of parameters), at most ``num_props``; all at once if the
        budget is 0. The budget counts the generated parameters, 2·D·DD values of ``dtype`` per
        proposal; a chunk's (c, P, DD) and (c, P, D) intermediates add about P·(D + DD) / (2·D·DD)
        of that (48 % at R-50 sizes).
        """
        if self.chunk_size > 0:
            return self.chunk_size
        if needs_grad or (not on_cpu and self.memory_budget_bytes == 0):
            return max(1, num_props)
        bytes_per_proposal = 2 * self.num_params * torch.finfo(dtype).bits // 8
        if on_cpu:
            return max(1, auto_chunk_bytes() // bytes_per_proposal)
        return max(1, min(num_props, self.memory_budget_bytes // bytes_per_proposal))

    def forward(self, pro_features: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pro_features: (M, D) proposal features.
            roi_features: (M, P, D) pooled RoI features, bins in row-major order.

        Returns:
            (M, D) interacted features.
        """
        num_props, num_bins, _ = roi_features.shape
        weight, bias = self.dynamic_layer.weight, self.dynamic_layer.bias
        device_type = roi_features.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast once here: autocast would re-cast the weight slices and RoI chunks below for
            # every chunk (its cache only keeps leaf tensors). Same values, 32 MB less per chunk.
            amp_dtype = torch.get_autocast_dtype(device_type)
            weight, bias, roi_features = (v.to(amp_dtype) for v in (weight, bias, roi_features))
        # Slices of the generator's weight are views, so each chunk generates only its own
        # parameters (one layer at a time) without copying the 2·D·DD × D matrix.
        w1, w2 = weight[: self.num_params], weight[self.num_params :]
        b1, b2 = bias[: self.num_params], bias[self.num_params :]
        needs_grad = torch.is_grad_enabled() and (
            weight.requires_grad or pro_features.requires_grad or roi_features.requires_grad
        )
        on_cpu = roi_features.device.type == "cpu"
        chunk = self.resolved_chunk_size(num_props, roi_features.dtype, needs_grad, on_cpu)
        # (M, P·D); allocated by the first chunk in its dtype, which autocast may change.
        mixed = roi_features.new_empty(0, num_bins * self.hidden_dim)
        for start in range(0, num_props, chunk):
            stop = min(start + chunk, num_props)
            feats = pro_features[start:stop]  # (c, D)
            param1 = F.linear(feats, w1, b1).view(-1, self.hidden_dim, self.dim_dynamic)
            x = self.norm1(torch.bmm(roi_features[start:stop], param1))  # (c, P, DD)
            x = F.relu(x, inplace=not needs_grad)
            param2 = F.linear(feats, w2, b2).view(-1, self.dim_dynamic, self.hidden_dim)
            x = self.norm2(torch.bmm(x, param2))  # (c, P, D)
            if start == 0:
                mixed = x.new_empty(num_props, num_bins * self.hidden_dim)
            if needs_grad:
                mixed[start:stop] = F.relu(x).flatten(1)
            else:
                # clamp_min(·, 0) is how ATen implements relu; writing straight into the
                # output buffer saves allocating and copying a (c, P·D) tensor per chunk.
                torch.clamp_min(x, 0, out=mixed[start:stop].view_as(x))
        # One GEMM for the 12544→256 projection: per-chunk calls would re-stream its 12.8 MB
        # weight once per chunk.
        return F.relu(self.norm3(self.out_layer(mixed)))  # (M, D)
