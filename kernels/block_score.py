"""Block scorer: lookup groups against all representative keys, plus the cached question term, and top-k.

scores[g, b] = sum_h < group_queries[g, h], repr_keys[b, h] >  +  beta * question_scores[b]

One tiled matrix product over the flattened (heads * head_dim) axis with fp32 accumulation; the top-k
stays on the device (`torch.topk`), so a decode step needs no host synchronisation. The spec is
`qllm_runtime.lookup.block_scores_reference` followed by `select_blocks`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, check_device, dot_dtype, on_device

__all__ = ["block_score"]


@triton.jit
def _block_score_kernel(
    Query, Repr, Question, Scores,
    stride_qg, stride_rb, stride_sg,
    n_groups, n_blocks, n_features, beta,
    HAS_QUESTION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    g_ok = offs_g < n_groups
    b_ok = offs_b < n_blocks

    acc = tl.zeros([BLOCK_G, BLOCK_B], dtype=tl.float32)
    for start_k in range(0, n_features, BLOCK_K):
        k_ok = start_k + offs_k < n_features
        q = tl.load(
            Query + offs_g[:, None] * stride_qg + (start_k + offs_k)[None, :],
            mask=g_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        r_t = tl.load(
            Repr + offs_b[None, :] * stride_rb + (start_k + offs_k)[:, None],
            mask=b_ok[None, :] & k_ok[:, None], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        acc += tl.dot(q, r_t, input_precision="ieee")

    if HAS_QUESTION:
        question = tl.load(Question + offs_b, mask=b_ok, other=0.0).to(tl.float32)
        acc += beta * question[None, :]
    tl.store(Scores + offs_g[:, None] * stride_sg + offs_b[None, :], acc, mask=g_ok[:, None] & b_ok[None, :])


# Few groups (the engine's lookups: one): each program takes one group and ROW_BLOCKS blocks and reduces over the
# features in fp32 without tl.dot, so the programs cover the blocks many times over (tiles of the matrix product
# left a few programs running 64 steps each: ~150 µs for 256 blocks on an H200, now a few µs).
ROW_GROUPS, ROW_BLOCKS, ROW_FEATURES = 4, 4, 512


@triton.jit
def _block_score_rows_kernel(
    Query, Repr, Question, Scores,
    stride_qg, stride_rb, stride_sg,
    n_blocks, n_features, beta,
    HAS_QUESTION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    group = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    b_ok = offs_b < n_blocks
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for start_k in range(0, n_features, BLOCK_K):
        k_ok = start_k + offs_k < n_features
        q = tl.load(Query + group * stride_qg + start_k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        r = tl.load(
            Repr + offs_b[:, None] * stride_rb + (start_k + offs_k)[None, :],
            mask=b_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        acc += r * q[None, :]
    scores = tl.sum(acc, 1)
    if HAS_QUESTION:
        scores += beta * tl.load(Question + offs_b, mask=b_ok, other=0.0).to(tl.float32)
    tl.store(Scores + group * stride_sg + offs_b, scores, mask=b_ok)


def block_score(
    group_queries: Tensor, repr_keys: Tensor, question_scores: Tensor | None, beta: float, topk: int | None,
    *, check: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Score every lookup group against every block and pick each group's top-k blocks.

    group_queries: (n_groups, heads, head_dim), mean far-rotated query of each group; fp16/bf16/fp32.
    repr_keys: (n_blocks, heads, head_dim), representative keys; fp16/bf16/fp32; each row contiguous.
    question_scores: (n_blocks,) float, the cached question term, or None (beta is then ignored).
    Returns scores: (n_groups, n_blocks) float32 and indices: (n_groups, min(topk, n_blocks)) int64,
    best first, both on the inputs' device (topk None: the scores alone, indices None). check=False skips validating
    the inputs (the engine's lookups, valid by construction).
    """
    if check:
        _check(group_queries, repr_keys, question_scores, topk)
    n_groups, heads, head_dim = group_queries.shape
    n_blocks = repr_keys.shape[0]
    device = group_queries.device
    scores = torch.empty(n_groups, n_blocks, dtype=torch.float32, device=device)
    has_question = question_scores is not None and beta != 0.0
    args = (group_queries, repr_keys, question_scores if has_question else scores, scores,
            group_queries.stride(0), repr_keys.stride(0), scores.stride(0))
    if n_groups and n_blocks and n_groups <= ROW_GROUPS:
        with on_device(device):
            _block_score_rows_kernel[(triton.cdiv(n_blocks, ROW_BLOCKS), n_groups)](
                *args, n_blocks, heads * head_dim, float(beta),
                HAS_QUESTION=has_question, BLOCK_B=ROW_BLOCKS, BLOCK_K=ROW_FEATURES,
            )  # fmt: skip
    elif n_groups and n_blocks:
        mixed = group_queries.dtype != repr_keys.dtype  # then multiply in fp32
        block_g = min(64, max(16, triton.next_power_of_2(n_groups)))
        block_b = 32 if n_groups <= 16 else 64  # few groups: more programs over the blocks
        grid = (triton.cdiv(n_blocks, block_b), triton.cdiv(n_groups, block_g))
        with on_device(device):
            _block_score_kernel[grid](
                *args, n_groups, n_blocks, heads * head_dim, float(beta),
                HAS_QUESTION=has_question, DOT_DTYPE=tl.float32 if mixed else dot_dtype(repr_keys.dtype),
                BLOCK_G=block_g, BLOCK_B=block_b, BLOCK_K=64,
            )  # fmt: skip
    if topk is None:
        return scores, None
    return scores, scores.topk(min(topk, n_blocks), dim=-1).indices


def _check(group_queries: Tensor, repr_keys: Tensor, question_scores: Tensor | None, topk: int | None) -> None:
    """ValueError unless the inputs are as `block_score` documents them."""
    for name, t in (("group_queries", group_queries), ("repr_keys", repr_keys)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (n, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} needs contiguous (heads, head_dim) rows; call .contiguous() first")
    _, heads, head_dim = group_queries.shape
    n_blocks = repr_keys.shape[0]
    if repr_keys.shape[1:] != (heads, head_dim):
        raise ValueError(
            f"repr_keys {tuple(repr_keys.shape)} does not match group_queries {tuple(group_queries.shape)}"
        )
    if question_scores is not None and (
        question_scores.shape != (n_blocks,) or not question_scores.is_floating_point()
    ):
        raise ValueError(f"question_scores must be a float tensor of shape ({n_blocks},)")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    check_device([group_queries, repr_keys] + ([] if question_scores is None else [question_scores]))
