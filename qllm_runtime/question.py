"""The question as lookups see it, per layer: the question vector (per head, the mean far-rotated query of the
question's tokens, or of the `topk` of them that received the most attention, as Q-LLM's code pools) biases
lookups; the far-rotated queries of every question token, against those of the chat header before it (a query
with no question in it), choose the answer's evidence blocks.

Computed from one short forward of the question on its own (chat header + question) with ordinary
causal attention; the queries are rotated to the far position n_local, the same rotation lookups use,
so <u, r_B> is on the scale of the lookup scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import apply_rope
from .rope import RotaryTables


@dataclass
class Question:
    """Per layer index: `vectors` (heads, head_dim), the pooled far-rotated query; `queries` (heads, m, head_dim)
    and `header_queries` (heads, n_header, head_dim) float32, the far-rotated queries of the question's tokens and
    of the chat header's, times the layer's attention scaling."""

    vectors: dict[int, Tensor] = field(default_factory=dict)
    queries: dict[int, Tensor] = field(default_factory=dict)
    header_queries: dict[int, Tensor] = field(default_factory=dict)


class QuestionProbe:
    """Attention state that runs plain causal attention and pools the queries of tokens [start, end) (the tokens
    before `start` are the chat header)."""

    def __init__(self, rope: RotaryTables, start: int, end: int, n_local: int, topk: int | None = None) -> None:
        self.rope, self.start, self.end, self.n_local, self.topk = rope, start, end, n_local, topk
        self.question = Question()

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        heads, n, _ = query.shape
        cos, sin = self.rope.get(max(n, self.n_local + 1), query.device)
        q = apply_rope(query.float(), cos[:n], sin[:n])
        k = apply_rope(key.float(), cos[:n], sin[:n]).repeat_interleave(heads // key.shape[0], dim=0)
        v = value.float().repeat_interleave(heads // key.shape[0], dim=0)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        probs = (q @ k.transpose(1, 2) * scaling).masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (h, n, n)
        span = query[:, self.start : self.end].float()  # (heads, m, head_dim), unrotated
        far_cos, far_sin = cos[self.n_local], sin[self.n_local]
        self.question.queries[layer_idx] = apply_rope(span, far_cos, far_sin) * scaling
        self.question.header_queries[layer_idx] = apply_rope(query[:, : self.start].float(), far_cos, far_sin) * scaling
        if self.topk is not None and self.topk < span.shape[1]:
            # attention each question token received, per query that could see it (early tokens have more)
            viewers = torch.arange(n, 0, -1, device=q.device, dtype=torch.float32)
            received = (probs.sum(dim=1) / viewers)[:, self.start : self.end]  # (heads, m)
            top = received.topk(self.topk, dim=-1).indices  # (heads, topk)
            span = span.gather(1, top[..., None].expand(-1, -1, span.shape[-1]))
        self.question.vectors[layer_idx] = apply_rope(span.mean(dim=1), far_cos, far_sin)  # (heads, head_dim)
        return (probs @ v).transpose(0, 1).to(query.dtype)
