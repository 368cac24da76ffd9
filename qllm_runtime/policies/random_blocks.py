"""Random blocks: the floor every lookup must beat (a control for benchmarks, not for use)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LookupPolicy, register_policy


@register_policy("random")
class RandomPolicy(LookupPolicy):
    """Each lookup group attends k blocks drawn uniformly without replacement (seeded: same draws per run)."""

    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        self._generator = torch.Generator(device=device).manual_seed(0)

    def scores(self, group_queries: Tensor, repr_keys: Tensor, block_terms: Tensor | None) -> Tensor:
        return torch.rand(group_queries.shape[0], repr_keys.shape[0], generator=self._generator, device=self.device)
