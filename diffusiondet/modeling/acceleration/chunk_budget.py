"""How many proposals :class:`~diffusiondet.modeling.head.DynamicConv` handles per chunk.

The dynamic layer generates 2·D·DD parameter values per proposal (128 KB at D=256, DD=64;
62.5 MB for 500 boxes). Processing the proposals in chunks changes neither the maths nor, beyond
float rounding, the results; it only decides how much of that stays in cache (CPU) or in memory
(GPU) at once.
"""
import functools
import glob
import os

import torch

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "auto_chunk_bytes",
    "last_level_cache_bytes",
    "proposals_per_chunk",
]

# Most bytes of generated parameters one chunk holds at CPU inference. Smaller chunks re-read the
# 32 MB generator weight once per chunk with skinnier GEMMs; bigger ones spill the generated
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


# Where Linux describes the caches that CPU 0 sees, one index*/size file per cache.
SYSFS_CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"


# A constant to torch.compile: the step of the graph sampler is traced with fullgraph=True, and
# reading sysfs is not traceable.
@functools.lru_cache(maxsize=1)
@torch.compiler.assume_constant_result
def last_level_cache_bytes(cache_dir: str = SYSFS_CACHE_DIR) -> int:
    """Size of the CPU's largest cache (Linux sysfs ``cache_dir``), or 0 when it cannot be read."""
    sizes = []
    for size_file in glob.glob(os.path.join(glob.escape(cache_dir), "index*", "size")):
        try:
            with open(size_file) as f:
                size = parse_cache_size(f.read())
        except OSError:
            continue
        if size:
            sizes.append(size)
    return max(sizes, default=0)


def parse_cache_size(text: str) -> int:
    """Bytes of a sysfs cache ``size`` text ("32K", "32768K", "2M"); 0 if it is not one."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    return int(digits) * scale if digits.isdigit() else 0


def auto_chunk_bytes() -> int:
    """Generated-parameter bytes per chunk: half the last-level cache, within [4, 16] MB.

    Half, so that a chunk's parameters and the RoI features they multiply stay cached together
    on CPUs with small caches (an 8 MB L3 gets 4 MB chunks); 16 MB at most, as measured above.
    """
    cache = last_level_cache_bytes()
    if cache <= 0:
        return _MAX_CHUNK_BYTES
    return max(_MIN_CHUNK_BYTES, min(_MAX_CHUNK_BYTES, cache // 2))


def proposals_per_chunk(
    num_props: int,
    bytes_per_proposal: int,
    *,
    chunk_size: int,
    memory_budget_bytes: int,
    needs_grad: bool,
    on_cpu: bool,
) -> int:
    """Proposals per chunk of a DynamicConv call on ``num_props`` proposals.

    ``chunk_size`` if set (> 0). Otherwise all proposals at once when autograd will keep every
    chunk's parameters anyway (chunking would only make the GEMMs skinnier). On CPU, as many as
    fit :func:`auto_chunk_bytes` of generated parameters (sized from the CPU's caches). Off-CPU, as
    many as fit ``memory_budget_bytes`` (a GPU wants big batched GEMMs, not cache-sized ones, but
    not 2 GB of parameters), at most ``num_props``; all at once if the budget is 0.

    Args:
        bytes_per_proposal: the generated parameters of one proposal, 2·D·DD values of the
            compute dtype. A chunk's (c, P, DD) and (c, P, D) intermediates add about
            P·(D + DD) / (2·D·DD) of that (48 % at R-50 sizes), which the budgets leave out.
    """
    if chunk_size > 0:
        return chunk_size
    if needs_grad or (not on_cpu and memory_budget_bytes == 0):
        return max(1, num_props)
    if on_cpu:
        return max(1, auto_chunk_bytes() // bytes_per_proposal)
    return max(1, min(num_props, memory_budget_bytes // bytes_per_proposal))
