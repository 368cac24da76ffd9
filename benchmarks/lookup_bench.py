"""One lookup of the block memory on CUDA, two ways: PyTorch ops around the block scorer (standardisation, top-k,
document order: nine launches) against the fused `qllm_kernels.top_blocks` (two), at the LLaMA-3-8B shape.

    python -m benchmarks.lookup_bench

Per call: host time (500 calls queued without a sync), wall time (the same, synchronised at the end), and GPU time
(50 calls recorded in one CUDA graph, replayed 10 times: no launch cost). The two give the same blocks (tested in
tests/test_kernels.py); this times them. Blocks: 780 at 100K tokens (blocks of 128), 7,800 at 1M, 16,000 at 1M with
blocks of 64 and top-32 (the library defaults).
"""

from __future__ import annotations

import time

import torch

from qllm_runtime.config import QLLMConfig
from qllm_runtime.policies import POLICIES

CASES = ((780, 8), (7800, 8), (16000, 32))  # blocks, top-k


def time_pick(fused: bool, n_blocks: int, k: int, device: torch.device) -> tuple[float, float, float]:
    """(host, wall, GPU) seconds per lookup of one group against n_blocks blocks, the question term standardised."""
    gen = torch.Generator(device=device).manual_seed(0)
    queries = torch.randn(1, 32, 128, device=device, generator=gen)
    repr_keys = torch.randn(n_blocks, 32, 128, device=device, generator=gen).bfloat16()
    terms = torch.randn(n_blocks, device=device, generator=gen)
    policy = POLICIES["qllm"](QLLMConfig(), device)
    if not fused:
        policy._top = None  # the PyTorch path around the scorer kernel

    def pick() -> torch.Tensor:
        return policy.pick(queries, repr_keys, terms, k)

    for _ in range(20):
        pick()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(500):
        pick()
    host = (time.perf_counter() - start) / 500
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 500
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(50):
            pick()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    return host, wall, (time.perf_counter() - start) / 500


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("lookup_bench times CUDA launches: run it on a GPU")
    device = torch.device("cuda")
    print("| blocks | top-k | PyTorch: host / wall / GPU µs | fused: host / wall / GPU µs |\n|---:|---:|---|---|")
    for n_blocks, k in CASES:
        cells = [" / ".join(f"{t * 1e6:.1f}" for t in time_pick(fused, n_blocks, k, device)) for fused in (False, True)]
        print(f"| {n_blocks} | {k} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
