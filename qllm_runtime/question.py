"""The question vector: per layer, the mean far-rotated query of the question's tokens.

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

    def __init__(self, rope: RotaryTables, start: int, end: int, n_local: int) -> None:
        self.rope, self.start, self.end, self.n_local = rope, start, end, n_local
        self.vectors: dict[int, Tensor] = {}

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        heads, n, _ = query.shape
        cos, sin = self.rope.get(max(n, self.n_local + 1))
        far = apply_rope(query[:, self.start : self.end].float().mean(dim=1), cos[self.n_local], sin[self.n_local])
        self.vectors[layer_idx] = far  # (heads, head_dim), float32
        q = apply_rope(query.float(), cos[:n], sin[:n])
        k = apply_rope(key.float(), cos[:n], sin[:n]).repeat_interleave(heads // key.shape[0], dim=0)
        v = value.float().repeat_interleave(heads // key.shape[0], dim=0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        return out.transpose(0, 1).to(query.dtype)
