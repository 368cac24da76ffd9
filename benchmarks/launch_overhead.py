"""Host time of the block memory's kernel launches on CUDA, through Triton's JIT and through `qllm_kernels`'
`Launcher` (the compiled kernel called directly), in one run.

    python -m benchmarks.launch_overhead                    # µs a call of each kernel wrapper, both ways
    python -m benchmarks.launch_overhead --reading 100000   # and a 100K-token reading (§1 windows, fp8), both ways

Per call of a wrapper at the LLaMA-3-8B shape (a prefill lookup group of 512 queries): host time (300 calls queued
without a sync) and wall time (the same, synchronised at the end); the outputs of the two ways are compared. With
`--reading`, the reading alternates the two ways twice (the host's speed drifts over a run).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import qllm_kernels as qk
import torch
import triton
from qllm_kernels import _common

HEADS, KV_HEADS, HEAD_DIM, N_Q, N_LOCAL, N_FAR, BLOCKS = 32, 8, 128, 512, 1024, 1200, 780


def wrappers(device: torch.device) -> dict[str, Callable[[], object]]:
    """One call of each wrapper a prefill lookup group makes, on random inputs of the 8B shape."""
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16

    def randn(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    q_start = 200_000
    query = randn(HEADS, N_Q, HEAD_DIM)
    local_k, local_v = randn(KV_HEADS, N_LOCAL + N_Q - 1, HEAD_DIM), randn(KV_HEADS, N_LOCAL + N_Q - 1, HEAD_DIM)
    far_k, far_v = randn(KV_HEADS, N_FAR, HEAD_DIM), randn(KV_HEADS, N_FAR, HEAD_DIM)
    far_pos = torch.arange(N_FAR, device=device) + 1000
    received = torch.zeros(HEADS, local_k.shape[1], device=device)
    angles = torch.arange(8192, device=device)[:, None] / 10000 ** (torch.arange(64, device=device) / 64)
    cos, sin = (torch.cat([f(angles), f(angles)], dim=1) for f in (torch.cos, torch.sin))
    repr_keys, group_query, terms = randn(BLOCKS, HEADS, HEAD_DIM), randn(1, HEADS, HEAD_DIM, dtype=torch.float32), \
        randn(BLOCKS, dtype=torch.float32)
    pool = [torch.randint(0, 120, (BLOCKS, KV_HEADS, 128, HEAD_DIM), device=device, dtype=torch.uint8, generator=gen)
            for _ in "kv"] + [torch.rand(BLOCKS, KV_HEADS, device=device, generator=gen) for _ in "kv"]
    host = [t[:0] for t in pool]
    picked = torch.tensor([[3, 70, 100, 200, 300, 400, 500, 700]], device=device)
    out_k, out_v = randn(KV_HEADS, 2048, HEAD_DIM), randn(KV_HEADS, 2048, HEAD_DIM)
    out_pos = torch.zeros(2048, dtype=torch.int64, device=device)
    n_set = 8 * 128 + 100

    def far_set() -> tuple[torch.Tensor, ...]:
        new = slice(128, 128 + n_set)
        qk.gather_far_set(pool, host, picked, BLOCKS, out_k[:, new], out_v[:, new], out_pos[new], local_k[:, :100],
                          local_v[:, :100], 128, 5000, check=False)
        return out_k, out_v, out_pos

    return {
        "attention (forward + received)": lambda: qk.attention(
            query, q_start, local_k, local_v, q_start - N_LOCAL + 1, far_k, far_v, far_pos, cos, sin, N_LOCAL, 0.088,
            far_origin=q_start - N_LOCAL + 1 - N_FAR, received=received, check=False),
        "top_blocks (scorer + ranking)": lambda: qk.top_blocks(group_query, repr_keys, terms, 4.0, 8,
                                                               standardized=True, check=False),
        "gather_far_set (8 fp8 blocks + 100)": far_set,
    }


def per_call(fn: Callable[[], object], calls: int = 300) -> tuple[float, float, object]:
    """(host µs, wall µs) a call of `fn`, and its last output."""
    for _ in range(20):
        out = fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    queued = time.perf_counter()
    torch.cuda.synchronize()
    return (queued - start) / calls * 1e6, (time.perf_counter() - start) / calls * 1e6, out


def same(a: object, b: object) -> bool:
    a, b = (x if isinstance(x, tuple) else (x,) for x in (a, b))
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reading", type=int, default=0, help="also time a reading of this many tokens both ways")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_overhead times CUDA launches: run it on a GPU")
    if not _common._FAST_LAUNCH:
        raise SystemExit("Launcher is off here (QUICKLLAMA_FAST_LAUNCH=0, or a Triton it was not checked against)")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}; µs a call")
    print("| wrapper | JIT host | Launcher host | JIT wall | Launcher wall | same outputs |")
    print("|---|---:|---:|---:|---:|---|")
    try:
        for name, fn in wrappers(device).items():
            _common._FAST_LAUNCH = False
            jit_host, jit_wall, jit_out = per_call(fn, args.calls)
            jit_out = tuple(t.clone() for t in jit_out) if isinstance(jit_out, tuple) else jit_out
            _common._FAST_LAUNCH = True
            fast_host, fast_wall, fast_out = per_call(fn, args.calls)
            print(f"| {name} | {jit_host:.1f} | {fast_host:.1f} | {jit_wall:.1f} | {fast_wall:.1f} "
                  f"| {same(jit_out, fast_out)} |")
        if args.reading:
            reading(args.reading)
    finally:
        _common._FAST_LAUNCH = True


def reading(length: int) -> None:
    """A reading of `length` tokens of the 8B shape (§1 windows, fp8 blocks), JIT and Launcher alternately, twice."""
    from benchmarks.gpu_speed import QLLM_WINDOWS, llama3_8b, run_qllm, word_tokenizer
    from qllm_runtime import QLLMConfig, QLLMEngine

    engine = QLLMEngine(llama3_8b(32), word_tokenizer(),
                        QLLMConfig(offload="device", kv_dtype="float8_e4m3", **QLLM_WINDOWS))
    rng = torch.Generator().manual_seed(0)
    run_qllm(engine, torch.randint(0, 128000, (4096,), generator=rng).tolist(), 2)
    ids = torch.randint(0, 128000, (length,), generator=rng).tolist()
    print(f"\n| {length:,}-token reading | prefill s | decode ms/token (graph) |\n|---|---:|---:|")
    for fast in (True, False, True, False):
        _common._FAST_LAUNCH = fast
        result = run_qllm(engine, ids, 8)
        print(f"| {'Launcher' if fast else 'JIT'} | {result['prefill_s']:.2f} | {result['decode_ms']:.1f} |")


if __name__ == "__main__":
    main()
