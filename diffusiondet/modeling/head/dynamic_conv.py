"""Instance interaction: each proposal generates a two-layer 1×1 conv over its RoI (Sparse
R-CNN's dynamic instance interaction, which the DiffusionDet decoder reuses: DiffusionDet paper,
arXiv 2211.09788, Sec. 3.2).

Shape legend: M = B·N proposals (all images flattened, image-major), P = pooler_resolution² RoI
bins, D = hidden_dim, DD = dim_dynamic.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..acceleration import DEFAULT_MEMORY_BUDGET_BYTES, proposals_per_chunk

__all__ = ["DynamicConv"]


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
        """Proposals per chunk: ``chunk_size`` if set, else sized by the accelerations'
        :func:`~diffusiondet.modeling.acceleration.proposals_per_chunk` (results do not depend on
        it beyond float rounding)."""
        bytes_per_proposal = 2 * self.num_params * torch.finfo(dtype).bits // 8
        return proposals_per_chunk(
            num_props,
            bytes_per_proposal,
            chunk_size=self.chunk_size,
            memory_budget_bytes=self.memory_budget_bytes,
            needs_grad=needs_grad,
            on_cpu=on_cpu,
        )

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
