"""Kernel launches per lookup group of one layer's block memory, counted on the CPU.

    python -m benchmarks.launch_count                          # the §1 windows (gpu_speed), fp8 blocks
    python -m benchmarks.launch_count --kv-dtype auto --sites  # bf16 blocks, launches by source line

On CUDA the block memory's prefill is bound by the host: each lookup group of each layer launches its small
kernels from Python. This reads chunks into one `LayerMemory` with tiny heads on the CPU and counts the ops that
write memory (a new tensor, or an in-place op): each is one launch on CUDA. The ops that are one Triton kernel on
CUDA (block gather, far set, block scorer, block store with the representative keys) count as one launch here too,
the fused lookup (`qllm_kernels.top_blocks`) as its one, two or three; the attention is a stand-in counted as the
kernels `qllm_kernels.attention` launches for its shapes (forward; the keys rotated ahead for a prefill group; the
merge of split key runs for decode; the received scores unless answering from evidence). Also reported: the same for
one decode step answering from evidence.
"""

from __future__ import annotations

import argparse
import importlib
import traceback
from collections import Counter
from collections.abc import Callable
from types import ModuleType

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.gpu_speed import QLLM_WINDOWS
from qllm_runtime.config import QLLMConfig
from qllm_runtime.lookup import block_scores_reference, select_blocks
from qllm_runtime.memory import LayerMemory
from qllm_runtime.placement import Placement
from qllm_runtime.policies import make_policy
from qllm_runtime.rope import RotaryTables

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


class LaunchCounter(TorchDispatchMode):
    """Counts writing ops by the runtime source line that issued them; `as_kernels` ops count as their kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter[str] = Counter()
        self._inside = 0

    def as_kernels(self, fn: Callable, name: str, kernels: int | Callable[..., int] = 1) -> Callable:
        """`fn`, counted as `kernels` launches (or as many as `kernels(*args, **kwargs)` says) whatever ops it runs
        here (a Triton op's reference or stand-in)."""

        def counted(*args, **kwargs):
            n = kernels(*args, **kwargs) if callable(kernels) else kernels
            self.launches[f"{name} ({'one kernel' if n == 1 else f'{n} kernels'} on CUDA)"] += n
            self._inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside -= 1

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._inside:
            return out
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        if name.endswith("_") or any(t.numel() and t.untyped_storage().data_ptr() not in inputs for t in outputs):
            frames = [f for f in traceback.extract_stack() if "qllm_runtime" in f.filename]
            self.launches[f"{frames[-1].name}:{frames[-1].lineno} {name}" if frames else name] += 1
        return out


def attention_stand_in(query, q_start, local_k, local_v, local_start, far_k, far_v, far_pos, cos, sin, n_local,
                       scaling, far_origin=None, received=None, out=None):
    """The attention's shape contract: out (n_q, heads, head_dim), zeros (into `out` when given)."""
    return query.new_zeros(query.shape[1], *query.shape[::2]) if out is None else out.zero_()


def attention_kernels(query, q_start, local_k, local_v, local_start, far_k, *args, received=None, **kwargs) -> int:
    """Kernels `qllm_kernels.attention` launches on these inputs at the LLaMA-3-8B shape's heads (32 / 8, bf16)."""
    rows = 4 * query.shape[1]  # 4 query heads a KV head
    attention = kernel_module("attention")
    split = attention.key_runs(rows, local_k.shape[1], far_k.shape[1], 2) > 1
    return 1 + split + attention.rotates_ahead(rows, 2) + (received is not None)


def top_blocks_stand_in(group_queries, repr_keys, block_terms, beta, topk, standardized=False, term_row=False
                        ) -> torch.Tensor:
    """`qllm_kernels.top_blocks` by its spec."""
    if term_row:
        block_terms = block_scores_reference(group_queries[-1:], repr_keys, None, 0.0)[0]
        group_queries = group_queries[:-1]
    scores = block_scores_reference(group_queries, repr_keys, block_terms, beta, standardized)
    return select_blocks(scores, topk).sort(dim=-1).values


def kernel_module(name: str) -> ModuleType:
    """The `qllm_kernels` module `name`, whose launch shapes the counts follow."""
    try:
        return importlib.import_module(f"qllm_kernels.{name}")
    except ImportError as e:
        raise SystemExit(f"launch_count counts the kernels' launches: pip install 'quickllama[kernels]' ({e})") from e


def top_blocks_kernels(group_queries, repr_keys, *args, **kwargs) -> int:
    """Kernels `qllm_kernels.top_blocks` launches: one for a few rows and one chunk of blocks (scored and ranked);
    else the scorer, the ranking, and a merge beyond one chunk."""
    module = kernel_module("block_score")
    if module.ranks_in_one_launch(group_queries.shape[0], repr_keys.shape[0]):
        return 1
    return 2 + (repr_keys.shape[0] > module.TOP_CHUNK)


def new_layer(config: QLLMConfig, counter: LaunchCounter) -> LayerMemory:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = torch.nn.Module()  # a model with a real rotary module of this head size (the tables' values do not matter)
    model.rotary_emb = LlamaRotaryEmbedding(LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                                        num_key_value_heads=KV_HEADS))
    device = torch.device("cpu")
    policy = make_policy(config, device)
    layer = LayerMemory(config, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device, Placement(10**9, 1024),
                        RotaryTables(model, device),
                        counter.as_kernels(attention_stand_in, "attention", kernels=attention_kernels), policy)
    layer.store._gather = counter.as_kernels(layer.store._gather, "block gather")
    layer.store._far_set = counter.as_kernels(layer.store._far_set, "far set: blocks, remainder, positions")
    layer.store._store = counter.as_kernels(layer.store._store, "block store and representative keys")
    policy._kernel = counter.as_kernels(lambda q, r, t, beta, _: (block_scores_reference(q, r, t, beta),),
                                        "block scorer")
    policy._top = counter.as_kernels(top_blocks_stand_in, "lookup", kernels=top_blocks_kernels)
    policy._top_max_k = kernel_module("block_score").TOP_MAX_K
    return layer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-dtype", choices=["auto", "float8_e4m3"], default="float8_e4m3")
    parser.add_argument("--chunks", type=int, default=4, help="prefill chunks read before counting one")
    parser.add_argument("--sites", action="store_true", help="list the launches by source line")
    args = parser.parse_args(argv)
    config = QLLMConfig(**QLLM_WINDOWS, kv_dtype=args.kv_dtype)
    counter = LaunchCounter()
    layer = new_layer(config, counter)
    layer.set_question(torch.randn(HEADS, HEAD_DIM))
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(h, n, HEAD_DIM, generator=gen).bfloat16() for h in (HEADS, KV_HEADS, KV_HEADS))

    chunk, groups = config.prefill_chunk, config.prefill_chunk // config.lookup_chunk

    def launches(batches: list[tuple[torch.Tensor, ...]], n: int) -> Counter[str]:
        """Launches of reading `batches`, per unit of n."""
        counter.launches.clear()
        with counter:
            for batch in batches:
                layer.append_and_attend(*batch, 0.1)
        return Counter({site: count / n for site, count in counter.launches.items()})

    with torch.inference_mode():
        for _ in range(args.chunks):
            layer.append_and_attend(*tokens(chunk), 0.1)
        rows = [("prefill, per lookup group", launches([tokens(chunk)], groups))]
        layer.set_evidence(torch.arange(0, layer.n_blocks, 4))
        n_steps = 4 * config.block_size
        rows.append(("decode from evidence, per token", launches([tokens(1) for _ in range(n_steps)], n_steps)))
    print(f"one layer, {config.kv_dtype} blocks, n_local {config.n_local}, blocks of {config.block_size}, "
          f"top-{config.topk}, lookup groups of {config.lookup_chunk}, chunks of {chunk}")
    print("| step | launches on CUDA |\n|---|---:|")
    for what, counted in rows:
        print(f"| {what} | {sum(counted.values()):.1f} |")
    if args.sites:
        for what, counted in rows:
            print(f"\n{what}:")
            for site, count in sorted(counted.items(), key=lambda kv: -kv[1]):
                print(f"  {count:6.2f}  {site}")


if __name__ == "__main__":
    main()
