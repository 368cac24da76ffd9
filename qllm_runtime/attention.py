"""Reference attention over [local window | init | selected blocks | remainder] with one softmax.

This is the specification of the fused Triton kernel (`qllm_kernels.attention`) and the CPU path.
Keys arrive un-rotated. Local keys are attended with relative RoPE. Non-local ("far") keys get one of two
position schemes:
- shared (`far_origin=None`): every far key sits exactly `n_local` positions before the query: the query
  is rotated once to position `n_local` and far keys stay raw;
- ordered (`far_origin` an int): far key j, passed in document order (or as the evidence is laid out), sits at
  virtual position `far_origin + j` and the query at its real position; by RoPE's relativity both are rotated
  relative to `far_origin`, far keys per slot.
Masks always use real positions: a key at k is seen by a query at q locally iff 0 <= q - k < n_local and
through the far part iff q - k >= n_local, so every key is attended exactly once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (..., n, head_dim) by per-position tables `cos`/`sin` (n, head_dim)."""
    return x * cos + rotate_half(x) * sin


def rope_matrix(cos: Tensor, sin: Tensor) -> Tensor:
    """R (head_dim, head_dim) with x @ R == apply_rope(x, cos, sin) for the one position of `cos`, `sin` (head_dim,):
    a rotation of any number of vectors in one launch."""
    half = cos.shape[0] // 2
    matrix = torch.diag(cos)
    # rotate_half(x) = (-x2, x1): output j < half takes -x[j + half] * sin[j], output j >= half takes x[j - half]
    idx = torch.arange(half, device=cos.device)
    matrix[idx + half, idx] = -sin[:half]
    matrix[idx, idx + half] = sin[half:]
    return matrix


def rotate(
    q: Tensor, q_start: int, local_k: Tensor, local_start: int, far_k: Tensor, cos: Tensor, sin: Tensor,
    n_local: int, far_origin: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """RoPE for one lookup group, as `attend_reference` specifies it.

    q: (kv_heads, group, n_q, head_dim) float, raw (the query heads of each KV head side by side); local_k,
    far_k: (kv_heads, n, head_dim), raw. Returns q_local, q_far (like q), k_local, k_far (float) and q_rel
    (n_q,), the queries' positions relative to local_start.
    """
    n_q = q.shape[2]
    q_rel = torch.arange(q_start - local_start, q_start - local_start + n_q, device=q.device)
    q_local = apply_rope(q, cos[q_rel], sin[q_rel])
    k_local = apply_rope(local_k.float(), cos[: local_k.shape[1]], sin[: local_k.shape[1]])
    n_far = far_k.shape[1]
    if far_origin is None:
        return q_local, apply_rope(q, cos[n_local], sin[n_local]), k_local, far_k.float(), q_rel
    # <rope(q, q_pos), rope(k_j, far_origin + j)> = <rope(q, q_pos - far_origin + s), rope(k_j, j + s)>;
    # the shift s keeps both table rows non-negative
    shift = max(far_origin - q_start, 0)
    q_far_pos = torch.arange(n_q, device=q.device) + (q_start - far_origin + shift)
    q_far = apply_rope(q, cos[q_far_pos], sin[q_far_pos])
    k_far = apply_rope(far_k.float(), cos[shift : shift + n_far], sin[shift : shift + n_far])
    return q_local, q_far, k_local, k_far, q_rel


def attend_reference(
    query: Tensor,
    q_start: int,
    local_k: Tensor,
    local_v: Tensor,
    local_start: int,
    far_k: Tensor,
    far_v: Tensor,
    far_pos: Tensor,
    cos: Tensor,
    sin: Tensor,
    n_local: int,
    scaling: float,
    *,
    far_origin: int | None = None,
    received: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """One lookup group's attention.

    query: (heads, n_q, head_dim), raw; absolute positions q_start .. q_start + n_q - 1.
    local_k, local_v: (kv_heads, n_loc, head_dim), raw; positions local_start .. local_start + n_loc - 1,
        with local_start <= q_start and local_start + n_loc == q_start + n_q.
    far_k, far_v: (kv_heads, n_far, head_dim), raw: init tokens, selected blocks, remainder.
    far_pos: (n_far,) int64 absolute positions of the far keys.
    cos, sin: (n_pos, head_dim) RoPE tables for positions 0 .. n_pos - 1 (n_pos > max(n_local,
        q_start + n_q - 1 - local_start); ordered: also > q_start + n_q - 1 - far_origin + s and n_far - 1 + s,
        s = max(far_origin - q_start, 0)), without any attention scaling folded in.
    far_origin: None for shared far positions; else ordered: far key j, in the order passed (document order, or
        the evidence as laid out), at virtual position far_origin + j.

    received: None, or (heads, n_loc) float32: the softmax probability each local key received, summed over the
        group's queries, is added to it (while answering from evidence no lookup reads the scores they feed: None).
    out: None, or (n_q, heads, head_dim) in the query dtype to write the output into.

    Returns the output: (n_q, heads, head_dim) in the query dtype (`out` when given).
    """
    heads, n_q, head_dim = query.shape
    kv_heads, n_loc, _ = local_k.shape
    group = heads // kv_heads
    device = query.device
    # GQA without repeating K/V: query heads of one kv head become extra rows, (kv_heads, group * n_q, d)
    q = query.float().view(kv_heads, group, n_q, head_dim)
    q_local, q_far, k_local, k_far, q_rel = rotate(q, q_start, local_k, local_start, far_k, cos, sin, n_local,
                                                   far_origin)
    q_local, q_far = q_local.flatten(1, 2), q_far.flatten(1, 2)
    dist = q_rel[:, None] - torch.arange(n_loc, device=device)[None, :]  # (n_q, n_loc)
    local_logits = (q_local @ k_local.transpose(1, 2)).view(kv_heads, group, n_q, n_loc)
    local_logits.masked_fill_(~((dist >= 0) & (dist < n_local)), float("-inf"))

    n_far = far_k.shape[1]
    q_pos = torch.arange(q_start, q_start + n_q, device=device)
    far_hidden = (q_pos[:, None] - far_pos[None, :].to(device)) < n_local  # (n_q, n_far)
    far_logits = (q_far @ k_far.transpose(1, 2)).view(kv_heads, group, n_q, n_far)
    far_logits.masked_fill_(far_hidden, float("-inf"))

    probs = torch.softmax(torch.cat([local_logits, far_logits], dim=-1) * scaling, dim=-1)
    p_local = probs[..., :n_loc].reshape(kv_heads, group * n_q, n_loc)
    p_far = probs[..., n_loc:].reshape(kv_heads, group * n_q, -1)
    result = p_local @ local_v.float() + p_far @ far_v.float()  # (kv_heads, group * n_q, d)
    if received is not None:
        received += p_local.view(kv_heads, group, n_q, n_loc).sum(dim=2).view(heads, n_loc)
    return written(result.view(heads, n_q, head_dim).transpose(0, 1), query.dtype, out)


def written(result: Tensor, dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """`result` in `dtype`, copied into `out` when one is given (the attentions' `out=`)."""
    return result.to(dtype) if out is None else out.copy_(result)
