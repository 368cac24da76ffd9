"""Sessions: one reading of a token stream by one model, as block memory or as ordinary full attention.

Both kinds offer the same small interface to the engine: feed tokens (chunked), snapshot/restore
(read once, ask many), the question (its lookup bias and evidence) and lookup-hit counts (no-ops for full
attention).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .decode_graph import DecodeGraph
from .hook import run_model
from .memory import LayerSnapshot, ModelMemory
from .question import Question

Progress = Callable[[int, int], None]


def _chunks(ids: list[int], size: int, device: torch.device, progress: Progress | None) -> Iterator[Tensor]:
    """`ids` on `device` in chunks (1, <= size), moved over in one copy: a copy from the host waits for the device's
    queued work, so one a chunk would stop the host from launching the next chunk's kernels while the device works."""
    on_device = torch.tensor([ids], device=device)
    for start in range(0, len(ids), size):
        yield on_device[:, start : start + size]
        if progress is not None:
            progress(min(start + size, len(ids)), len(ids))


class MemorySession:
    """Block-memory reading (modes qllm, infllm, streaming). Memory tensors are inference tensors, so
    every method that touches them runs in inference mode."""

    def __init__(self, model: nn.Module, memory: ModelMemory, device: torch.device) -> None:
        self.model, self.memory, self.device = model, memory, device
        self.prefill_chunk = memory.config.prefill_chunk
        use_graph = device.type == "cuda" and memory.config.decode_graphs
        self.decode_graph = DecodeGraph(model, memory, device) if use_graph else None

    @property
    def seen(self) -> int:
        return self.memory.seen

    def feed(self, ids: list[int], progress: Progress | None = None) -> Tensor:
        """Read `ids`; logits of the last one (vocab,). One token answering from evidence replays the decode graph
        where it can."""
        if len(ids) == 1 and self.decode_graph is not None and (logits := self.decode_graph.step(ids[0])) is not None:
            if progress is not None:
                progress(1, 1)
            return logits
        logits = None
        for chunk in _chunks(ids, self.prefill_chunk, self.device, progress):
            logits = run_model(self.model, chunk, self.memory)
        return logits

    @torch.inference_mode()
    def snapshot(self) -> dict[int, LayerSnapshot]:
        return self.memory.snapshot()

    @torch.inference_mode()
    def restore(self, snap: dict[int, LayerSnapshot]) -> None:
        self.memory.restore(snap)

    @torch.inference_mode()
    def set_question(self, question: Question | None) -> None:
        self.memory.set_question(question)

    @torch.inference_mode()
    def choose_evidence(self, count: int) -> None:
        self.memory.choose_evidence(count)

    def state(self) -> dict[int, dict[str, Tensor]]:
        """The reading, per layer (`LayerMemory.state`)."""
        return self.memory.state()

    @torch.inference_mode()
    def load_state(self, states: dict[int, dict[str, Tensor]]) -> None:
        """Continue from a saved `state()` (a fresh session only)."""
        self.memory.load_state(states, self.device)

    @torch.inference_mode()
    def count_hits(self, on: bool) -> None:
        self.memory.count_hits(on)

    def block_hits(self) -> Tensor | None:
        return self.memory.block_hits()


class FullSession:
    """Ordinary attention with the model's own implementation and a DynamicCache (mode full)."""

    def __init__(self, model: nn.Module, prefill_chunk: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.model, self.device, self.prefill_chunk = model, device, prefill_chunk
        self.cache = DynamicCache(config=model.config)
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes
        takes_cache = "cache" in inspect.signature(type(model).forward).parameters
        self._cache_kwarg = "cache" if takes_cache else "past_key_values"
        self.seen = 0

    def feed(self, ids: list[int], progress: Progress | None = None) -> Tensor:
        logits = None
        for chunk in _chunks(ids, self.prefill_chunk, self.device, progress):
            positions = torch.arange(self.seen, self.seen + chunk.shape[1], device=self.device)[None]
            with torch.inference_mode():
                out = self.model(
                    input_ids=chunk, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{self._cache_kwarg: self.cache},
                )
            self.seen += chunk.shape[1]
            logits = out.logits[0, -1]
        return logits

    def snapshot(self) -> int:
        return self.seen

    def restore(self, seen: int) -> None:
        """Drop cached tokens past `seen`, per layer (an interrupted forward may have filled only some)."""
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - seen
            if extra > 0:
                layer.crop(-extra)  # a negative count removes tokens in transformers 5.17 and 5.24 alike
        self.seen = seen

    def state(self) -> dict[int, dict[str, Tensor]]:
        """The cache per layer: keys, values (batch, kv_heads, seen, head_dim)."""
        return {idx: {"keys": layer.keys, "values": layer.values} for idx, layer in enumerate(self.cache.layers)}

    @torch.inference_mode()
    def load_state(self, states: dict[int, dict[str, Tensor]]) -> None:
        """Continue from a saved `state()` (a fresh session only)."""
        for idx, state in sorted(states.items()):
            self.cache.update(state["keys"].to(self.device), state["values"].to(self.device), idx)
        self.seen = self.cache.get_seq_length()

    def set_question(self, question: Question | None) -> None:
        """Full attention sees everything: nothing to bias."""

    def choose_evidence(self, count: int) -> None:
        """Full attention sees everything: nothing to choose."""

    def count_hits(self, on: bool) -> None:
        """Full attention looks nothing up."""

    def block_hits(self) -> Tensor | None:
        return None


Session = MemorySession | FullSession
