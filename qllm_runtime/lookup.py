"""Block lookup: score memory blocks against the current queries (plus the question term) and pick top-k.

score(group, B) = sum_h < mean far-rotated query of the group (head h), r_B,h >  +  beta * qs_B
where r_B is the block's representative key and qs_B = sum_h < u_h, r_B,h > is the question term,
cached per block when the block is made (u = this layer's question vector).
"""

from __future__ import annotations

from torch import Tensor


def block_scores_reference(
    group_queries: Tensor, repr_keys: Tensor, question_scores: Tensor | None, beta: float
) -> Tensor:
    """Scores of lookup groups against blocks.

    group_queries: (n_groups, heads, head_dim), mean far-rotated query of each group, any float dtype.
    repr_keys: (n_blocks, heads, head_dim), representative keys, any float dtype.
    question_scores: (n_blocks,) float32, the cached question term, or None (beta is then ignored).
    Returns (n_groups, n_blocks) float32.
    """
    n_groups, heads, head_dim = group_queries.shape
    scores = group_queries.reshape(n_groups, heads * head_dim).float() @ repr_keys.reshape(
        -1, heads * head_dim
    ).float().T
    if question_scores is not None and beta != 0.0:
        scores = scores + beta * question_scores.float()[None, :]
    return scores


def question_scores_reference(question_vector: Tensor, repr_keys: Tensor) -> Tensor:
    """qs_B = sum_h < u_h, r_B,h >.  question_vector: (heads, head_dim); repr_keys: (n_blocks, heads, head_dim)."""
    return repr_keys.flatten(1).float() @ question_vector.flatten().float()


def select_blocks(scores: Tensor, topk: int) -> Tensor:
    """Indices (n_groups, min(topk, n_blocks)) of the best blocks per group, best first."""
    k = min(topk, scores.shape[-1])
    return scores.topk(k, dim=-1).indices
