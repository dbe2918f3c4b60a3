"""DynamicConv: chunked computation equals the plain per-proposal formula (Sparse R-CNN's dynamic
instance interaction).

Shape legend: M proposals, P RoI bins, D hidden_dim, DD dim_dynamic.
"""

import pytest
import torch
import torch.nn.functional as F

from diffusiondet.modeling.acceleration import chunk_budget
from diffusiondet.modeling.head import DynamicConv
from diffusiondet.modeling.head import dynamic_conv as dynamic_conv_module


# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


def _reference(conv: DynamicConv, pro: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    # Independent formulation: generate every proposal's parameters at once, then einsum.
    d, dd = conv.hidden_dim, conv.dim_dynamic
    params = conv.dynamic_layer(pro)  # (M, 2·D·DD)
    p1 = params[:, : d * dd].reshape(-1, d, dd)
    p2 = params[:, d * dd :].reshape(-1, dd, d)
    x = F.relu(conv.norm1(torch.einsum("mpd,mde->mpe", roi, p1)))
    x = F.relu(conv.norm2(torch.einsum("mpe,med->mpd", x, p2)))
    return F.relu(conv.norm3(conv.out_layer(x.reshape(x.shape[0], -1))))


def _inputs(num_props=23, hidden=32, bins=9):
    return torch.randn(num_props, hidden), torch.randn(num_props, bins, hidden)


@pytest.mark.parametrize("chunk_size", [0, 1, 5, 23, 100])
def test_chunked_matches_reference(chunk_size):
    conv = DynamicConv(hidden_dim=32, dim_dynamic=8, pooler_resolution=3, chunk_size=chunk_size)
    pro, roi = _inputs()
    with torch.no_grad():
        out = conv(pro, roi)
        ref = _reference(conv, pro, roi)
    assert out.shape == (23, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_chunked_gradients_match_unchunked():
    conv = DynamicConv(hidden_dim=32, dim_dynamic=8, pooler_resolution=3)
    pro, roi = _inputs()
    grads = []
    for chunk_size in (4, 0):  # 0 with grad = one chunk
        conv.chunk_size = chunk_size
        conv.zero_grad()
        p, r = pro.clone().requires_grad_(), roi.clone().requires_grad_()
        (conv(p, r) ** 2).sum().backward()
        grads.append([p.grad, r.grad, conv.dynamic_layer.weight.grad.clone()])
    for chunked, whole in zip(*grads):
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_only_one_chunk_of_parameters_is_generated_at_a_time(monkeypatch):
    conv = DynamicConv(hidden_dim=32, dim_dynamic=8, pooler_resolution=3, chunk_size=6)
    pro, roi = _inputs()
    generated_shapes = []

    class RecordingF:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def linear(x, weight, bias=None):
            out = F.linear(x, weight, bias)
            generated_shapes.append(tuple(out.shape))
            return out

    monkeypatch.setattr(dynamic_conv_module, "F", RecordingF())
    with torch.no_grad():
        conv(pro, roi)
    generator = [s for s in generated_shapes if s[1] == 32 * 8]
    # 23 proposals in chunks of 6 -> 4 chunks × 2 generated layers, each (≤6, D·DD).
    assert len(generator) == 8
    assert max(s[0] for s in generator) == 6


@pytest.mark.parametrize(
    "cache_mb, chunk", [(300, 128), (32, 128), (16, 64), (8, 32), (2, 32), (0, 128)]
)
def test_auto_chunk_size_follows_the_last_level_cache(monkeypatch, cache_mb, chunk):
    # Half the last-level cache within [4, 16] MB; 0 = unknown cache -> 16 MB.
    monkeypatch.setattr(chunk_budget, "last_level_cache_bytes", lambda: cache_mb << 20)
    conv = DynamicConv(hidden_dim=256, dim_dynamic=64, pooler_resolution=7)
    # 128 KiB of float32 parameters per proposal.
    assert conv.resolved_chunk_size(500, torch.float32, needs_grad=False) == chunk
    assert conv.resolved_chunk_size(500, torch.float64, needs_grad=False) == chunk // 2


# sysfs cache sizes (index0..3: L1d, L1i, L2, L3) of CPUs this project runs on: the AMD EPYC
# Zen 4 (recorded), an Intel Xeon (L2 2 MB, L3 105 MB) and an AVX2-only EPYC (L2 512 KB, L3 32 MB).
RECORDED_CACHES = {
    "amd-epyc-zen4": (["32K", "32K", "1024K", "32768K"], 32 << 20),
    "intel-xeon": (["48K", "32K", "2048K", "107520K"], 105 << 20),
    "amd-epyc-avx2": (["32K", "32K", "512K", "32768K"], 32 << 20),
    "no-l3-unreadable-entry": (["64K", "oops", "2M"], 2 << 20),
}


@pytest.mark.parametrize("cpu", sorted(RECORDED_CACHES))
def test_last_level_cache_is_the_largest_sysfs_cache(tmp_path, cpu):
    sizes, expected = RECORDED_CACHES[cpu]
    for index, size in enumerate(sizes):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert chunk_budget.last_level_cache_bytes(str(tmp_path)) == expected


def test_unreadable_caches_give_zero(tmp_path):
    assert chunk_budget.last_level_cache_bytes(str(tmp_path / "missing")) == 0
    assert chunk_budget.parse_cache_size("") == 0 and chunk_budget.parse_cache_size("1G") == 1 << 30


def test_one_chunk_with_autograd_or_off_cpu_and_explicit_sizes():
    conv = DynamicConv(hidden_dim=256, dim_dynamic=64, pooler_resolution=7)
    # Autograd keeps every chunk's parameters anyway: one chunk is fastest.
    assert conv.resolved_chunk_size(500, torch.float32, needs_grad=True) == 500
    assert conv.resolved_chunk_size(500, torch.float32, needs_grad=False, on_cpu=False) == 500
    conv.chunk_size = 7
    assert conv.resolved_chunk_size(500, torch.float32, needs_grad=True) == 7


def test_empty_input_and_validation():
    conv = DynamicConv(hidden_dim=16, dim_dynamic=4, pooler_resolution=2)
    out = conv(torch.randn(0, 16), torch.randn(0, 4, 16))
    assert out.shape == (0, 16)
    with pytest.raises(ValueError, match="num_dynamic"):
        DynamicConv(hidden_dim=16, dim_dynamic=4, pooler_resolution=2, num_dynamic=3)
    with pytest.raises(ValueError, match="chunk_size"):
        DynamicConv(hidden_dim=16, dim_dynamic=4, pooler_resolution=2, chunk_size=-1)


# --- chunk-size bounds and autograd modes -------------------------------------------------


@pytest.mark.parametrize("cache, expected", [(0, 16 << 20), (1, 4 << 20), (8 << 20, 4 << 20),
                                             (20_000_001, 10_000_000), (1 << 30, 16 << 20)])
def test_chunk_budget_is_half_the_cache_within_bounds(monkeypatch, cache, expected):
    monkeypatch.setattr(chunk_budget, "last_level_cache_bytes", lambda: cache)
    budget = chunk_budget.auto_chunk_bytes()
    assert budget == expected and isinstance(budget, int)


def test_chunk_size_is_at_least_one_proposal(monkeypatch):
    conv = DynamicConv(hidden_dim=8, dim_dynamic=4, pooler_resolution=2)
    assert conv.resolved_chunk_size(1, torch.float32, needs_grad=True) == 1
    assert conv.resolved_chunk_size(1, torch.float32, needs_grad=False, on_cpu=False) == 1
    monkeypatch.setattr(chunk_budget, "auto_chunk_bytes", lambda: 100)  # < one proposal (256 B)
    assert conv.resolved_chunk_size(50, torch.float32, needs_grad=False) == 1


@pytest.mark.parametrize("trainable", ["weights", "proposals", "rois"])
def test_dynamic_conv_backpropagates_to_whatever_requires_grad(trainable):
    conv = DynamicConv(hidden_dim=8, dim_dynamic=4, pooler_resolution=2)
    conv.requires_grad_(trainable == "weights")
    pro = torch.randn(3, 8, requires_grad=trainable == "proposals")
    roi = torch.randn(3, 4, 8, requires_grad=trainable == "rois")
    out = conv(pro, roi)
    out.sum().backward()
    grad = {"weights": conv.dynamic_layer.weight.grad, "proposals": pro.grad, "rois": roi.grad}
    assert grad[trainable] is not None and grad[trainable].abs().sum() > 0
