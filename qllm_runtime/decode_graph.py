"""One-token answer steps replayed as a CUDA graph.

While a reading is answered from evidence, every generated token runs the same kernels: the model's layers and,
per layer, the token into the tail, the token leaving the window into the evidence buffer, and the attention
(`qllm_kernels.decode_attention`), whose positions it reads from a small device tensor
(`LayerMemory.attend_decode_step`). So the first step is recorded once as a CUDA graph and later steps replay it
after writing their positions: one launch from the host instead of some 30 per layer from Python, which bounded
decode (BENCHMARKS.md §1). Between replays the host keeps its bookkeeping (blocks made as they fill, the evidence
buffer gathered again after one is made, the tail compacted); a step the graph cannot take runs the ordinary way,
and a step whose tensors moved records the graph again.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from itertools import chain

import torch
from torch import Tensor, nn

from .hook import run_model
from .memory import LayerMemory, ModelMemory
from .ops import DecodeAttendFn, decode_attention_op

STEP_VALUES = 7  # LayerMemory.prepare_decode_step
log = logging.getLogger("quickllama")


class DecodeGraph:
    """Answer steps of one model and memory on one CUDA device (batch 1). `record=False` runs each step's device
    work without a graph, the same launches (the CPU tests, with the kernels interpreted)."""

    def __init__(self, model: nn.Module, memory: ModelMemory, device: torch.device,
                 attend: DecodeAttendFn | None = None, record: bool = True) -> None:
        self.model, self.memory, self.device = model, memory, device
        self._attend, self.record = attend, record
        self._ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._steps: Tensor | None = None  # (layers, STEP_VALUES) int64 on the device
        self._host_steps: Tensor | None = None  # its host copy (pinned on CUDA)
        self._written: torch.cuda.Event | None = None  # the last copy of the host steps to the device
        self._rows: dict[int, int] = {}  # layer index -> row of the steps
        self._graph: torch.cuda.CUDAGraph | None = None
        self._recorded: list[tuple] | None = None  # what the graph reads and writes
        self._logits: Tensor | None = None  # the graph's output
        self.failed: str | None = None  # why recording failed: the steps then take the ordinary path

    @property
    def recorded(self) -> bool:
        """Whether the last step replayed (or recorded) a graph."""
        return self._graph is not None

    @torch.inference_mode()
    def step(self, token: int) -> Tensor | None:
        """Read `token`; the logits after it (vocab,), or None when this step must take the ordinary path."""
        # streams, events and the capture belong to the memory's device, which need not be the current one
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            return self._step(token)

    def _step(self, token: int) -> Tensor | None:
        layers = self._layers()
        if not layers or self.failed is not None:
            return None
        values = []
        for layer in layers:
            readied = layer.prepare_decode_step()
            if readied is None:
                return None
            values.append(readied)
        self._write_steps(values)
        self._ids.fill_(token)
        recorded = [_describe(layer.decode_step_tensors()) for layer in layers]
        recorded.append(tuple(t.data_ptr() for t in chain(self.model.parameters(), self.model.buffers())))
        if self._graph is not None and recorded == self._recorded:
            self._graph.replay()
            logits = self._logits.clone()
        else:
            logits = self._run_and_record(recorded)
        for layer in layers:
            layer.finish_decode_step()
        return logits

    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        """The attention of the model's layer `layer_idx` in a step (`hook.AttentionState`)."""
        layer = self.memory.layers[layer_idx]
        return layer.attend_decode_step(query, key, value, scaling, self._steps[self._rows[layer_idx]], self._attend)

    def _layers(self) -> list[LayerMemory]:
        """The memory's layers if a step can run here: all on this device, the attention kernel there."""
        layers = [self.memory.layers[idx] for idx in sorted(self.memory.layers)]
        if not layers or any(layer.device != self.device for layer in layers):
            return []
        if self._attend is None:
            self._attend = decode_attention_op(self.device, layers[0].head_dim)
        return layers if self._attend is not None else []

    def _write_steps(self, values: list[tuple[int, ...]]) -> None:
        """Put the layers' step values on the device (one copy), the host buffer reused once its last copy is done."""
        if self._steps is None or self._steps.shape[0] != len(values):
            self._rows = {idx: row for row, idx in enumerate(sorted(self.memory.layers))}
            shape = (len(values), STEP_VALUES)
            self._steps = torch.zeros(shape, dtype=torch.int64, device=self.device)
            self._host_steps = torch.zeros(shape, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            self._written = torch.cuda.Event() if self.device.type == "cuda" else None
            self._graph = None
        if self._written is not None:
            self._written.synchronize()  # an event not yet recorded returns at once
        self._host_steps.numpy()[:] = values
        self._steps.copy_(self._host_steps, non_blocking=True)
        if self._written is not None:
            self._written.record()

    def _run(self) -> Tensor:
        return run_model(self.model, self._ids, self)

    def _run_and_record(self, recorded: list[tuple]) -> Tensor:
        """This step's logits, run for real; then, on CUDA, the graph recorded from it (recording runs nothing)."""
        self._graph = self._logits = None  # the old graph's memory goes back first
        if not self.record:
            return self._run()
        # warm up on a side stream, as CUDA graph capture asks: the step itself, for real
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            logits = self._run().clone()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        logits.record_stream(torch.cuda.current_stream(self.device))  # made on the side stream, used on this one
        graph = torch.cuda.CUDAGraph()
        try:
            with _capturing(graph, self.device, "thread_local"):
                self._logits = self._run()
        except RuntimeError as e:  # e.g. a model whose forward syncs the host (dynamic RoPE): answer the ordinary way
            self.failed, self._logits = f"{type(e).__name__}: {e}", None
            _release_generators(self.device)
            log.warning("recording the decode step as a CUDA graph failed (%s); this reading's answer steps take "
                        "the ordinary path (QLLMConfig(decode_graphs=False) skips the attempt)", self.failed)
            return logits
        self._graph, self._recorded = graph, recorded
        return logits


def _release_generators(device: torch.device) -> None:
    """A capture that failed leaves the device's default random generator registered to it: every later random draw
    on the device (the user's own `torch.randn(..., device="cuda")`) then raises "Offset increment outside graph
    capture" (torch 2.11). An empty capture registers and releases it again."""
    with warnings.catch_warnings():  # "The CUDA Graph is empty": it is meant to be
        warnings.simplefilter("ignore", UserWarning)
        with _capturing(torch.cuda.CUDAGraph(), device):
            pass


@contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, device: torch.device, error_mode: str = "global") -> Iterator[None]:
    """Record `graph` from what runs inside, on a side stream: `torch.cuda.graph(graph, stream=...)` without what that
    does first, emptying the allocator's caches of device and pinned host memory. That hands every cached block back
    to the driver at each answer's first token (with 40 GiB cached: 32-35 ms for that step against 11-17 ms,
    BENCHMARKS.md §1), and the next reading has to allocate, and page-lock, it again."""
    torch.cuda.synchronize(device)
    with torch.cuda.stream(torch.cuda.Stream(device)):
        graph.capture_begin(capture_error_mode=error_mode)
        try:
            yield
        finally:
            graph.capture_end()


def _describe(tensors: list[Tensor]) -> tuple:
    """Where and how `tensors` lie: a graph replays addresses, shapes and strides as recorded."""
    return tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in tensors)
