"""Random blocks: the floor every lookup must beat (a control for benchmarks, not for use)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LookupPolicy, register_policy


@register_policy("random")
class RandomPolicy(LookupPolicy):
    """Each lookup group attends k blocks drawn uniformly without replacement, and an answer as many random
    evidence blocks as `qllm` would choose (seeded: same draws per run)."""

    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        self._generator = torch.Generator(device=device).manual_seed(0)

    def weighting(self) -> None:
        return None  # random draws: no fused lookup

    def scores(self, group_queries: Tensor, repr_keys: Tensor, block_terms: Tensor | None) -> Tensor:
        draws = torch.rand(group_queries.shape[0], repr_keys.shape[0], generator=self._generator, device=self.device)
        return draws.to(repr_keys.device)  # a layer may sit on another GPU than the generator

    def evidence_scores(self, question_queries, header_queries, init_keys: Tensor, store) -> Tensor | None:
        if self.config.evidence_tokens is None:
            return None
        return torch.rand(store.n_blocks, generator=self._generator, device=self.device)
