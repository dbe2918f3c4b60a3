"""Off-CPU (GPU) chunking of the dynamic layer by a memory budget (issue #12).

A GPU gets all proposals at once unless their generated parameters (2·D·DD values each) exceed
``memory_budget_bytes``; training (autograd keeps every chunk anyway) stays unchunked. The off-CPU
rule is forced here by calling ``resolved_chunk_size(..., on_cpu=False)``, so no GPU is needed.
"""
import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.modeling.acceleration import chunk_budget, set_head_speed_options
from diffusiondet.modeling.acceleration.chunk_budget import DEFAULT_MEMORY_BUDGET_BYTES
from diffusiondet.modeling.head import DynamicConv
from tests.utils import tiny_cfg

MiB = 1 << 20


def r50_conv(**kwargs):
    """R-50 sizes D=256, DD=64 (128 KiB of fp32 parameters per proposal), 1×1 RoIs (small)."""
    return DynamicConv(hidden_dim=256, dim_dynamic=64, pooler_resolution=1, **kwargs)


def test_default_budget_is_512_mib():
    assert DEFAULT_MEMORY_BUDGET_BYTES == 512 * MiB
    assert r50_conv().memory_budget_bytes == 512 * MiB


@pytest.mark.parametrize(
    "dtype, budget, want",
    [
        (torch.float32, 512 * MiB, 4096),  # 128 KiB per proposal
        (torch.float16, 512 * MiB, 8192),  # 64 KiB per proposal
        (torch.bfloat16, 512 * MiB, 8192),
        (torch.float32, 1 * MiB, 8),
        (torch.float32, 128 * 1024 * 3 - 1, 2),  # floor
        (torch.float32, 1, 1),  # never below one proposal
        (torch.float32, 0, 10000),  # budget 0: unchunked, as before
    ],
)
def test_off_cpu_inference_chunk_follows_the_budget(dtype, budget, want):
    conv = r50_conv(memory_budget_bytes=budget)
    assert conv.resolved_chunk_size(10000, dtype, needs_grad=False, on_cpu=False) == want


def test_off_cpu_chunk_is_at_most_the_proposals():
    conv = r50_conv()
    assert conv.resolved_chunk_size(500, torch.float32, needs_grad=False, on_cpu=False) == 500
    assert conv.resolved_chunk_size(0, torch.float32, needs_grad=False, on_cpu=False) == 1


def test_budget_does_not_change_training_explicit_chunks_or_cpu():
    conv = r50_conv(memory_budget_bytes=1 * MiB)
    # autograd keeps every chunk's parameters: one chunk, whatever the budget
    assert conv.resolved_chunk_size(10000, torch.float32, needs_grad=True, on_cpu=False) == 10000
    assert conv.resolved_chunk_size(0, torch.float32, needs_grad=True, on_cpu=False) == 1
    # CPU: sized from the caches, not from the budget
    cpu = chunk_budget.auto_chunk_bytes() // (128 * 1024)
    assert conv.resolved_chunk_size(10000, torch.float32, needs_grad=False, on_cpu=True) == cpu
    conv.memory_budget_bytes = 0
    assert conv.resolved_chunk_size(10000, torch.float32, needs_grad=False, on_cpu=True) == cpu
    # an explicit chunk_size wins
    conv.chunk_size = 7
    assert conv.resolved_chunk_size(10000, torch.float32, needs_grad=False, on_cpu=False) == 7


def test_negative_budget_rejected():
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        r50_conv(memory_budget_bytes=-1)


def run_off_cpu(conv, pro, roi):
    """Forward with the off-CPU rule forced; returns (output, chunk sizes used)."""
    rule, chunks = conv.resolved_chunk_size, []

    def off_cpu(num_props, dtype, needs_grad, on_cpu=True):
        chunks.append(rule(num_props, dtype, needs_grad, on_cpu=False))
        return chunks[-1]

    conv.resolved_chunk_size = off_cpu
    norm1_calls = []
    hook = conv.norm1.register_forward_hook(lambda *a: norm1_calls.append(1))
    try:
        with torch.no_grad():
            out = conv(pro, roi)
    finally:
        hook.remove()
        del conv.resolved_chunk_size
    return out, chunks, len(norm1_calls)


def test_budget_chunked_forward_equals_unchunked():
    torch.manual_seed(0)
    d, dd, res, m = 16, 4, 3, 37
    conv = DynamicConv(hidden_dim=d, dim_dynamic=dd, pooler_resolution=res).eval()
    g = torch.Generator().manual_seed(1)
    pro = torch.randn(m, d, generator=g)
    roi = torch.randn(m, res * res, d, generator=g)
    per_proposal = 2 * d * dd * 4  # fp32 bytes of generated parameters
    conv.memory_budget_bytes = 0
    ref, ref_chunks, ref_calls = run_off_cpu(conv, pro, roi)
    assert ref_chunks == [m] and ref_calls == 1
    conv.memory_budget_bytes = 5 * per_proposal + per_proposal // 2
    out, chunks, calls = run_off_cpu(conv, pro, roi)
    assert chunks == [5] and calls == 8  # ceil(37 / 5)
    assert out.shape == (m, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def budgets(model):
    return {s.inst_interact.memory_budget_bytes for s in model.head.head_series}


@pytest.mark.parametrize("mb", [512, 3, 0])
def test_config_key_reaches_every_stage(mb):
    cfg = tiny_cfg("MODEL.DiffusionDet.DYNAMIC_MEMORY_BUDGET_MB", mb)
    model = build_model(cfg)
    assert len(model.head.head_series) == 2
    assert budgets(model) == {mb * MiB}


def test_config_default_and_validation():
    assert tiny_cfg().MODEL.DiffusionDet.DYNAMIC_MEMORY_BUDGET_MB == 512
    with pytest.raises(ValueError, match="DYNAMIC_MEMORY_BUDGET_MB must be >= 0, got -1"):
        tiny_cfg("MODEL.DiffusionDet.DYNAMIC_MEMORY_BUDGET_MB", -1)


def test_set_speed_options_budget_keyword():
    model = build_model(tiny_cfg("MODEL.DiffusionDet.DYNAMIC_MEMORY_BUDGET_MB", 3))
    head = model.head
    set_head_speed_options(head, dynamic_chunk_size=0, pooler_threads=1)  # old signature: unchanged
    assert budgets(model) == {3 * MiB}
    set_head_speed_options(head, dynamic_chunk_size=0, pooler_threads=1, dynamic_memory_budget_mb=64)
    assert budgets(model) == {64 * MiB}
    set_head_speed_options(head, dynamic_chunk_size=0, pooler_threads=1, dynamic_memory_budget_mb=0)
    assert budgets(model) == {0}
    with pytest.raises(ValueError, match="dynamic_memory_budget_mb must be >= 0, got -2"):
        set_head_speed_options(head, dynamic_chunk_size=0, pooler_threads=1, dynamic_memory_budget_mb=-2)
    assert budgets(model) == {0}
