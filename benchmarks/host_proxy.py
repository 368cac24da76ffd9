"""Host time and torch ops per lookup group of one layer's block memory, measured on the CPU: the engine's CUDA path
(the `qllm_kernels` wrappers and their `Launcher`) with every compiled launch a no-op.

    python -m benchmarks.host_proxy               # µs of host time a lookup group (best and median of the chunks)
    python -m benchmarks.host_proxy --ops         # and the torch ops a group dispatches (views too), by source line

On CUDA the prefill of the block memory is bound by the host (BENCHMARKS.md §1): each lookup group of each layer
launches its kernels from Python. This runs one `LayerMemory` (small heads, fp8 blocks, ordered far positions, the §1
windows) on CPU tensors through the kernel wrappers the engine uses on CUDA, with Triton's compiled launch replaced
by a no-op, so what it times is the host's share alone: Python, torch's dispatch, and the launcher's key. The GPU
box's host is slower than a dev machine's and a real launch adds the driver's time, so compare runs on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

HEADS, KV_HEADS, HEAD_DIM, CHUNK = 4, 2, 32, 8192
_INHERITED = object()  # an attribute a class takes from its bases (restored by deleting the patch)


class _NoLaunch:
    """A compiled kernel whose launch does nothing (what `Launcher` calls after the first launch of a key)."""

    function = packed_metadata = None

    def run(self, *args: object) -> None:
        return None


@contextmanager
def no_op_kernels() -> Iterator[None]:
    """While open: the engine's CPU tensors go through the CUDA path's kernel wrappers, every launch a no-op."""
    import qllm_kernels
    from qllm_kernels import _common
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import qllm_runtime.ops as ops
    import qllm_runtime.policies.base as policy_base

    kernel = _NoLaunch()
    patches = [(JITFunction, "__getitem__", lambda self, grid: (lambda *a, **k: kernel)),
               (InterpretedFunction, "__getitem__", lambda self, grid: (lambda *a, **k: kernel)),
               (_common, "_FAST_LAUNCH", True), (_common, "_one_gpu", lambda: True),
               (_common, "_stream_getter", lambda: (lambda device: 0)),
               (qllm_kernels, "triton_available", lambda device: True),
               (ops, "kernels", lambda device: qllm_kernels), (policy_base, "kernels", lambda device: qllm_kernels)]
    saved = [(owner, name, owner.__dict__.get(name, _INHERITED)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            if value is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def layer_memory():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from benchmarks.gpu_speed import QLLM_WINDOWS
    from qllm_runtime.config import QLLMConfig
    from qllm_runtime.memory import LayerMemory
    from qllm_runtime.ops import attention_op
    from qllm_runtime.placement import Placement
    from qllm_runtime.policies import make_policy
    from qllm_runtime.rope import RotaryTables

    model = torch.nn.Module()
    model.rotary_emb = LlamaRotaryEmbedding(LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                                        num_key_value_heads=KV_HEADS))
    config = QLLMConfig(**QLLM_WINDOWS, kv_dtype="float8_e4m3", far_positions="ordered")
    cpu = torch.device("cpu")
    memory = LayerMemory(config, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, cpu, Placement(10**9, 2048),
                         RotaryTables(model, cpu), attention_op(cpu, HEAD_DIM), make_policy(config, cpu))
    memory.set_question(torch.randn(HEADS, HEAD_DIM))
    return memory, config.lookup_chunk


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every torch op (views too) by the runtime or kernel-wrapper line that dispatched it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frames = [f for f in traceback.extract_stack()
                  if ("qllm_runtime" in f.filename or "kernels" in f.filename) and "site-packages" not in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.ops[f"{where} {func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=16, help="8K-token chunks timed, after two untimed ones")
    parser.add_argument("--ops", action="store_true", help="count the torch ops a group dispatches, by line")
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    chunks = [tuple(torch.randn(h, CHUNK, HEAD_DIM, generator=gen).bfloat16() for h in (HEADS, KV_HEADS, KV_HEADS))
              for _ in range(2)]
    with no_op_kernels(), torch.inference_mode():
        memory, group = layer_memory()
        groups = CHUNK // group
        for chunk in chunks:
            memory.append_and_attend(*chunk, 0.1)
        times = []
        for i in range(args.chunks):
            t0 = time.perf_counter()
            memory.append_and_attend(*chunks[i % 2], 0.1)
            times.append((time.perf_counter() - t0) / groups * 1e6)
        counter = _OpCounter() if args.ops else None
        with counter or nullcontext():
            if counter:
                memory.append_and_attend(*chunks[0], 0.1)
    print(f"host time a lookup group: {min(times):.0f} µs best, {statistics.median(times):.0f} µs median "
          f"({args.chunks} chunks of {groups} groups)")
    if counter:
        print(f"torch ops a lookup group: {sum(counter.ops.values()) / groups:.1f}")
        for site, n in counter.ops.most_common():
            print(f"{n / groups:6.2f}  {site}")


if __name__ == "__main__":
    main()
