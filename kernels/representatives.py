"""Representative keys: for each new block and query head, the mean key of the repr_topk tokens of the block that the
head's queries attended most, in one launch.

The spec is `qllm_runtime.blocks.representatives_reference`. Query head h reads KV head h // (heads // kv_heads).
Grid (count, heads): each program loads its head's scores over the block (block_size of any size, masked), picks the
repr_topk largest one at a time (the lowest index among equal scores), adds the chosen keys in float32 and writes
their mean in out's dtype (rounded to nearest even; Triton's interpreter would truncate to bfloat16). `representative`
is one program's work, which `store_blocks` also runs, in the launch that stores the blocks (the engine's way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, Launcher, check_device, next_power_of_2, on_device, round_to_bf16

__all__ = ["representative_keys"]


@triton.jit
def representative(Keys, stride_kt, Scores, Out, block_size, head_dim, repr_topk,
                    ROUND_BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """One block's representative key for one query head: Keys points at the block's first key of the head's KV head
    (tokens stride_kt apart), Scores at the head's score of that token (tokens contiguous), Out at the head's row."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    free = offs_s < block_size  # tokens of the block not yet chosen
    scores = tl.load(Scores + offs_s, mask=free, other=0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for _ in range(repr_topk):
        best = tl.max(tl.where(free, scores, -float("inf")))
        pick = tl.min(tl.where(free & (scores == best), offs_s, BLOCK_S))
        acc += tl.load(Keys + pick * stride_kt + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        free = free & (offs_s != pick)
    mean = tl.math.div_rn(acc, tl.zeros_like(acc) + repr_topk)
    if ROUND_BF16:
        mean = round_to_bf16(mean)
    tl.store(Out + offs_d, mean.to(Out.dtype.element_ty), mask=d_ok)


@Launcher
@triton.jit
def _representatives_kernel(
    Keys, Scores, Out,
    stride_kh, stride_kt, stride_sh, stride_ob, stride_oh,
    block_size, head_dim, group, repr_topk,
    ROUND_BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    first = block * block_size  # the block's first token
    representative(Keys + (head // group) * stride_kh + first * stride_kt, stride_kt, Scores + head * stride_sh + first,
                    Out + block * stride_ob + head * stride_oh, block_size, head_dim, repr_topk, ROUND_BF16, BLOCK_S,
                    BLOCK_D)


def representative_keys(keys: Tensor, scores: Tensor, repr_topk: int, out: Tensor, *, check: bool = True) -> None:
    """Write each block's representative key per query head into `out`.

    keys: (kv_heads, count * block_size, head_dim) float16/bfloat16/float32; scores: (heads, count * block_size)
    float32, the attention each token received per query head; out: (count, heads, head_dim) in a float dtype;
    each with a contiguous last dim, other strides free (slices of bigger buffers). heads must be a multiple of
    kv_heads; 1 <= repr_topk <= block_size. check=False skips validating the inputs (the engine's calls).
    """
    if check:
        check_inputs(keys, scores, repr_topk, out)
    count, heads, head_dim = out.shape
    kv_heads, n_tokens = keys.shape[:2]
    if count == 0 or head_dim == 0:
        return
    block_size = n_tokens // count
    with on_device(keys.device):
        _representatives_kernel[(count, heads)](
            keys, scores, out,
            keys.stride(0), keys.stride(1), scores.stride(0), out.stride(0), out.stride(1),
            block_size, head_dim, heads // kv_heads, repr_topk,
            ROUND_BF16=out.dtype == torch.bfloat16,
            BLOCK_S=next_power_of_2(block_size), BLOCK_D=next_power_of_2(head_dim),
        )  # fmt: skip


def check_inputs(keys: Tensor, scores: Tensor, repr_topk: int, out: Tensor) -> None:
    """ValueError unless the inputs are as `representative_keys` documents them."""
    if keys.dim() != 3 or scores.dim() != 2 or out.dim() != 3:
        raise ValueError(f"keys must be (kv_heads, tokens, head_dim), scores (heads, tokens) and out (count, heads, "
                         f"head_dim), got {tuple(keys.shape)}, {tuple(scores.shape)} and {tuple(out.shape)}")
    count, heads, head_dim = out.shape
    kv_heads, n_tokens = keys.shape[:2]
    if keys.dtype not in FLOAT_DTYPES or out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"keys and out must be float16, bfloat16 or float32, got {keys.dtype} and {out.dtype}")
    if scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32, got {scores.dtype}")
    if kv_heads == 0 or heads % kv_heads or keys.shape[2] != head_dim:
        raise ValueError(f"keys {tuple(keys.shape)} do not match out {tuple(out.shape)}: need the same head_dim and "
                         "heads a multiple of kv_heads")
    if scores.shape != (heads, n_tokens) or (n_tokens % count if count else n_tokens):
        raise ValueError(f"scores must be ({heads}, {n_tokens}) and the tokens count * block_size, got "
                         f"{tuple(scores.shape)} for {count} blocks")
    block_size = n_tokens // count if count else 0
    if isinstance(repr_topk, bool) or not isinstance(repr_topk, int) or not 1 <= repr_topk <= max(block_size, 1):
        raise ValueError(f"repr_topk must be an int in [1, block_size = {block_size}], got {repr_topk!r}")
    if head_dim > 1 and (keys.stride(2) != 1 or out.stride(2) != 1):
        raise ValueError("keys and out need a contiguous last dim (head_dim)")
    if n_tokens > 1 and scores.stride(1) != 1:
        raise ValueError("scores need a contiguous last dim (tokens)")
    check_device([keys, scores, out])
