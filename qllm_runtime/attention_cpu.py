"""The CPU fast path of `attention.attend_reference`: the same attention, computed in query tiles.

A lookup group's local part is a band (each query sees the `n_local` keys before it), so the reference's
(queries × window) rectangle is about half masked. Here the queries go in tiles of `tile` rows; a tile's local
logits cover only the keys its band reaches, its far logits follow, and one softmax over both is taken in place
(shared maximum, exp, one sum) without concatenating them. Masks are written only where they hide something: the
band's two edges and the far keys some query still sees in its window. Same inputs, outputs and masks as the
reference, which tests compare it against on random inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import rotate, written

TILE = 128  # queries per tile: the band of a 128-query tile spans n_local + 127 keys


def attend_tiled(
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
    tile: int = TILE,
) -> Tensor:
    """`attend_reference`, tiled over queries (see there for the arguments and shapes)."""
    heads, n_q, head_dim = query.shape
    kv_heads, n_loc, _ = local_k.shape
    group = heads // kv_heads
    device = query.device
    q = query.float().view(kv_heads, group, n_q, head_dim) * scaling  # GQA: a KV head's query heads side by side
    q_local, q_far, k_local, k_far, q_rel = rotate(q, q_start, local_k, local_start, far_k, cos, sin, n_local,
                                                   far_origin)
    v_local = local_v.float()
    n_far = far_k.shape[1]
    k_far_t, v_far = k_far.transpose(1, 2), far_v.float()
    far_hidden = (torch.arange(q_start, q_start + n_q, device=device)[:, None] - far_pos[None, :].to(device)) < n_local

    result = torch.empty((kv_heads, group, n_q, head_dim), dtype=torch.float32, device=device)
    into = None if received is None else received.view(kv_heads, group, n_loc)
    for t0 in range(0, n_q, tile):
        t1 = min(n_q, t0 + tile)
        rows = group * (t1 - t0)  # a KV head's query heads' rows, one batched matmul per KV head
        first = int(q_rel[t0])  # the tile's first query, relative to local_start (its queries are consecutive)
        lo, hi = max(0, first - n_local + 1), first + t1 - t0  # local keys the tile's band reaches
        local = torch.bmm(q_local[:, :, t0:t1].reshape(kv_heads, rows, head_dim), k_local[:, lo:hi].transpose(1, 2))
        band = local.view(kv_heads, group, t1 - t0, hi - lo)
        # only the band's edges hide keys from some of the tile's queries: the keys before the last query's window,
        # and the keys after the first query; every query sees the keys between them
        for j0, j1 in ((lo, hi - n_local), (first + 1, hi)):
            if j1 > j0:
                dist = q_rel[t0:t1, None] - torch.arange(j0, j1, device=device)[None, :]
                band[..., j0 - lo : j1 - lo].masked_fill_((dist < 0) | (dist >= n_local), float("-inf"))
        parts = [local]
        if n_far:
            far = torch.bmm(q_far[:, :, t0:t1].reshape(kv_heads, rows, head_dim), k_far_t)  # (kv_heads, rows, n_far)
            hidden = far_hidden[t0:t1]  # mostly none: mask only the columns some query of the tile sees as local
            if len(cols := hidden.any(dim=0).nonzero()):
                c0, c1 = int(cols[0]), int(cols[-1]) + 1
                far.view(kv_heads, group, t1 - t0, n_far)[..., c0:c1].masked_fill_(hidden[:, c0:c1], float("-inf"))
            parts.append(far)
        peak = torch.stack([p.amax(dim=-1, keepdim=True) for p in parts]).amax(dim=0)  # finite: q sees itself
        inv_total = sum(p.sub_(peak).exp_().sum(dim=-1, keepdim=True) for p in parts).reciprocal_()  # (kv, rows, 1)
        # normalise the (rows × head_dim) output and the (heads × keys) received sums, not the probabilities
        tile_out = torch.bmm(local, v_local[:, lo:hi])
        if n_far:
            tile_out.baddbmm_(far, v_far)
        result[:, :, t0:t1] = tile_out.mul_(inv_total).view(kv_heads, group, t1 - t0, head_dim)
        if into is None:
            continue
        per_head = (kv_heads * group, t1 - t0)
        into[..., lo:hi] += torch.bmm(inv_total.view(*per_head, 1).transpose(1, 2),
                                      local.view(*per_head, hi - lo)).view(kv_heads, group, hi - lo)
    return written(result.view(heads, n_q, head_dim).transpose(0, 1), query.dtype, out)
