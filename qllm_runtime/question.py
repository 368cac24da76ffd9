"""The question vector: per layer and head, the mean far-rotated query of the question's tokens (or of
the `topk` of them that received the most attention, as Q-LLM's code pools).

Computed from one short forward of the question on its own (chat header + question) with ordinary
causal attention; the queries are rotated to the far position n_local, the same rotation lookups use,
so <u, r_B> is on the scale of the lookup scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import apply_rope
from .rope import RotaryTables


class QuestionProbe:
    """Attention state that runs plain causal attention and pools the queries of tokens [start, end)."""

    def __init__(self, rope: RotaryTables, start: int, end: int, n_local: int, topk: int | None = None) -> None:
        self.rope, self.start, self.end, self.n_local, self.topk = rope, start, end, n_local, topk
        self.vectors: dict[int, Tensor] = {}

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        heads, n, _ = query.shape
        cos, sin = self.rope.get(max(n, self.n_local + 1))
        q = apply_rope(query.float(), cos[:n], sin[:n])
        k = apply_rope(key.float(), cos[:n], sin[:n]).repeat_interleave(heads // key.shape[0], dim=0)
        v = value.float().repeat_interleave(heads // key.shape[0], dim=0)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        probs = (q @ k.transpose(1, 2) * scaling).masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (h, n, n)
        span = query[:, self.start : self.end].float()  # (heads, m, head_dim), unrotated
        if self.topk is not None and self.topk < span.shape[1]:
            # attention each question token received, per query that could see it (early tokens have more)
            viewers = torch.arange(n, 0, -1, device=q.device, dtype=torch.float32)
            received = (probs.sum(dim=1) / viewers)[:, self.start : self.end]  # (heads, m)
            top = received.topk(self.topk, dim=-1).indices  # (heads, topk)
            span = span.gather(1, top[..., None].expand(-1, -1, span.shape[-1]))
        self.vectors[layer_idx] = apply_rope(span.mean(dim=1), cos[self.n_local], sin[self.n_local])  # (heads, d)
        return (probs @ v).transpose(0, 1).to(query.dtype)
