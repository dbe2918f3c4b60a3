"""How fast DynamicConv runs at each chunk size, to check the automatic choice on this CPU.

    python tools/benchmark.py --chunk-sweep                 # this CPU as it is
    python tools/benchmark.py --chunk-sweep --emulate-avx2  # the same, as an AVX2-only machine
    python -m diffusiondet.tooling.chunk_sweep --boxes 500,1000 --repeats 5 [--emulate-avx2]

Times the dynamic layer alone (R-50 sizes: D = 256, DD = 64, 7x7 RoIs; random inputs), fp32,
inference, for N proposals at several chunk sizes, interleaved round-robin so that a load on the
machine hits every size alike; reports the best of ``repeats`` measurements (each one call after
the timer's warm-up) and each size's time relative to the fastest. ``auto`` is what
``DYNAMIC_CHUNK_SIZE 0`` picks.
"""
import os
import subprocess
import sys

import torch

from diffusiondet.modeling.acceleration.chunk_budget import last_level_cache_bytes
from diffusiondet.modeling.head import DynamicConv
from diffusiondet.tooling.bench_timing import measure
from diffusiondet.utils.cpu_info import AVX2_EMULATION_ENV, describe_cpu

CHUNKS = (16, 32, 64, 128, 256, 512, 1024, 0)  # 0: one chunk (the official unchunked layer)


def sweep(num_props: int, repeats: int, chunks=CHUNKS):
    """{chunk size: best seconds}; chunk 0 = all proposals at once."""
    conv = DynamicConv(hidden_dim=256, dim_dynamic=64, pooler_resolution=7).eval()
    g = torch.Generator().manual_seed(0)
    pro = torch.randn(num_props, 256, generator=g)
    roi = torch.randn(num_props, 49, 256, generator=g)
    chunks = [c for c in chunks if c < num_props]  # larger ones are the same single chunk as 0
    best = {c: float("inf") for c in chunks}
    cpu = torch.device("cpu")
    with torch.no_grad():
        auto = dynamic_auto(num_props)
        for _ in range(repeats):
            for c in chunks:
                conv.chunk_size = c if c > 0 else num_props
                best[c] = min(best[c], measure(lambda: conv(pro, roi), cpu, 1).mean)
    return best, auto


def dynamic_auto(num_props: int) -> int:
    conv = DynamicConv(hidden_dim=256, dim_dynamic=64, pooler_resolution=7)
    return conv.resolved_chunk_size(num_props, torch.float32, needs_grad=False)


def run(boxes=(500, 1000), repeats: int = 5, emulate_avx2: bool = False) -> int:
    if emulate_avx2:  # the settings act at start-up only: re-run this in a fresh process
        cmd = [sys.executable, "-m", "diffusiondet.tooling.chunk_sweep", "--repeats", str(repeats),
               "--boxes", ",".join(map(str, boxes))]  # fmt: skip
        return subprocess.run(cmd, env={**os.environ, **AVX2_EMULATION_ENV}).returncode
    print(f"DynamicConv chunk sweep on {describe_cpu()}; last-level cache "
          f"{last_level_cache_bytes() >> 20} MB; best of {repeats}, fp32, inference")
    print("| boxes | chunk | generated MB/chunk | ms | vs best |")
    print("|---:|---:|---:|---:|---:|")
    for n in boxes:
        best, auto = sweep(n, repeats, sorted(set(CHUNKS) | {dynamic_auto(n)}))
        fastest = min(best.values())
        for c, sec in sorted(best.items(), key=lambda kv: kv[0] or 1 << 30):
            size = c if c > 0 else n
            label = f"{size}" + (" (auto)" if size == auto else "") + (" (one chunk)" if c == 0 else "")
            mb = size * 2 * 256 * 64 * 4 / 2**20
            print(f"| {n} | {label} | {mb:.1f} | {sec * 1e3:.0f} | {sec / fastest:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--boxes", default="500,1000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--emulate-avx2", action="store_true")
    a = parser.parse_args()
    sys.exit(run(tuple(int(b) for b in a.boxes.split(",")), a.repeats, a.emulate_avx2))
