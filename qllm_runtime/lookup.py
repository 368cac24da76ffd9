"""Block lookup: score memory blocks against the current queries (plus the question term) and pick top-k.

score(group, B) = sum_h < mean far-rotated query of the group (head h), r_B,h >  +  beta * qs_B
where r_B is the block's representative key and qs_B = sum_h < u_h, r_B,h > is the question term
(u = this layer's question vector), scored as one more query row beside the groups'.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

EvidenceOrder = Literal["document", "relevance"]


def block_scores_reference(
    group_queries: Tensor, repr_keys: Tensor, question_scores: Tensor | None, beta: float, standardized: bool = False
) -> Tensor:
    """Scores of lookup groups against blocks.

    group_queries: (n_groups, heads, head_dim), mean far-rotated query of each group, any float dtype.
    repr_keys: (n_blocks, heads, head_dim), representative keys, any float dtype.
    question_scores: (n_blocks,) float32, the cached question term, or None (beta is then ignored).
    standardized: each term divided by its deviation over the blocks first (`QLLMConfig.question_scale`).
    Returns (n_groups, n_blocks) float32.
    """
    n_groups, heads, head_dim = group_queries.shape
    scores = group_queries.reshape(n_groups, heads * head_dim).float() @ repr_keys.reshape(
        -1, heads * head_dim
    ).float().T
    if question_scores is None or beta == 0.0:
        return scores
    return add_question_scores(scores, question_scores, beta, standardized)


def add_question_scores(scores: Tensor, question_scores: Tensor, beta: float, standardized: bool) -> Tensor:
    """scores (n_groups, n_blocks) float32 + beta * question_scores (n_blocks,); standardized: z(scores, per row) +
    beta * z(question_scores), each deviation at least 1e-6, less each row's constant sum of the two means (which no
    ranking sees)."""
    if standardized:
        return torch.addcdiv(scores / scores.std(dim=-1, keepdim=True).clamp_min(1e-6), question_scores.float()[None],
                             question_scores.float().std().clamp_min(1e-6), value=beta)
    return scores + beta * question_scores.float()[None, :]


def select_blocks(scores: Tensor, topk: int) -> Tensor:
    """Indices (n_groups, min(topk, n_blocks)) of the best blocks per group, best first."""
    k = min(topk, scores.shape[-1])
    return scores.topk(k, dim=-1).indices


def block_attention(question_queries: Tensor, init_keys: Tensor, block_keys: Iterable[Tensor]) -> Tensor:
    """The attention each question token pays each block when it attends the init tokens and every block's tokens,
    all at the far distance: per question token and head one softmax over those keys, summed per block.

    question_queries: (heads, m, head_dim), far-rotated and scaled; init_keys: (kv_heads, n_init, head_dim);
    block_keys: chunks (c, kv_heads, block_size, head_dim) of every block's keys, in block order, un-rotated.
    Returns (heads, m, n_blocks) float32.
    """
    heads, m, head_dim = question_queries.shape
    kv_heads = init_keys.shape[0]
    q = question_queries.float().reshape(kv_heads, heads // kv_heads * m, head_dim)  # query heads of a KV head
    per_block = [torch.einsum("grd,cgjd->grcj", q, keys.float()).logsumexp(dim=-1) for keys in block_keys]
    sinks = (q @ init_keys.float().transpose(1, 2)).logsumexp(dim=-1, keepdim=True)  # -inf without init tokens
    probs = torch.cat([sinks, *per_block], dim=-1).softmax(dim=-1)[..., 1:]  # (kv_heads, group * m, n_blocks)
    return probs.reshape(heads, m, -1)


def question_attention(
    question_queries: Tensor, header_queries: Tensor, init_keys: Tensor, block_keys: Iterable[Tensor]
) -> Tensor:
    """The attention the question adds to each block: per head, the most any question token pays it
    (`block_attention`), less what the chat header's tokens, a query with no question in it, pay it on average;
    summed over heads. (Heads that mostly attend the sinks count little; blocks that draw every query's attention
    gain nothing.) question_queries: (heads, m, head_dim); header_queries: (heads, n_header, head_dim), may be
    empty. Returns (n_blocks,) float32.
    """
    queries = torch.cat([header_queries, question_queries], dim=1)
    return attention_added(block_attention(queries, init_keys, block_keys), header_queries.shape[1])


def attention_added(attention: Tensor, n_header: int) -> Tensor:
    """`question_attention` from `block_attention`'s output: attention (..., heads, n_header + m, n_blocks), the
    header's tokens first. Returns (..., n_blocks)."""
    added = attention[..., n_header:, :].amax(dim=-2)  # (..., heads, n_blocks)
    if n_header:
        added = added - attention[..., :n_header, :].mean(dim=-2)
    return added.sum(dim=-2)


def choose_evidence(scores: Tensor, count: int, neighbors: int, order: EvidenceOrder = "document") -> Tensor:
    """The `count` blocks (of scores' n_blocks) an answer attends, in the order they are laid out. A block ranks by
    the best score within `neighbors` blocks of it, then by its own: each strong block comes with the blocks around
    it, so a passage cut by a block boundary is read whole. order `document`: ascending; `relevance`: runs of
    adjacent blocks, each in document order, from the run with the lowest best score to the highest, so the most
    relevant passage sits nearest the question (ties keep document order)."""
    count = min(count, scores.shape[0])
    ranked = scores.argsort(descending=True, stable=True)
    if neighbors:
        reach = torch.nn.functional.max_pool1d(scores[None, None], 2 * neighbors + 1, stride=1, padding=neighbors)[0, 0]
        ranked = ranked[reach[ranked].argsort(descending=True, stable=True)]
    blocks = ranked[:count].sort().values
    if order == "document" or blocks.numel() < 2:
        return blocks
    run = torch.cat([blocks.new_zeros(1), (blocks.diff() != 1).long().cumsum(0)])  # run index of each block
    best = torch.full((int(run[-1]) + 1,), -torch.inf, device=scores.device).scatter_reduce(
        0, run, scores[blocks].float(), "amax")
    return blocks[best[run].argsort(stable=True)]
