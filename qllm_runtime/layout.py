"""BlockLayout: which absolute token positions each memory block holds."""

from __future__ import annotations

from dataclasses import dataclass

from .config import QLLMConfig


@dataclass(frozen=True)
class BlockLayout:
    """Positions [0, n_init) are init tokens; block b holds the `block_size` positions from
    n_init + b * block_size on."""

    n_init: int
    block_size: int

    @classmethod
    def of(cls, config: QLLMConfig) -> BlockLayout:
        return cls(config.n_init, config.block_size)

    def start(self, block: int) -> int:
        """First position of `block`."""
        return self.n_init + block * self.block_size

    def span(self, block: int) -> range:
        """Every position of `block`."""
        start = self.start(block)
        return range(start, start + self.block_size)

    def count(self, n_tokens: int) -> int:
        """Full blocks among the first `n_tokens` positions."""
        return max(0, n_tokens - self.n_init) // self.block_size
