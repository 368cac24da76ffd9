"""Run the methods over generated samples on one shared model: one result row per (method, question).

Methods: `full` and every registered lookup policy (`streaming`, `infllm`, `qllm`, `random`, ...) call
`engine.ask(context, question)` with that mode;
`qllm-read` reads the context once with `engine.read` and asks each question of the memory.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.tasks import Query, Sample, Task
from qllm_runtime import Answer, QLLMConfig, QLLMEngine
from qllm_runtime.policies import POLICIES

METHODS = ("full", *sorted(POLICIES), "qllm-read")  # every registered lookup policy is a method
_QUESTION_KEYS = {"question_weight", "question_topk", "question_scale"}
_MEMORY_KEYS = {"block_size", "topk", "repr_topk", "lookup_chunk", "offload", "device_pool_gb",
                "pin_question_blocks", *_QUESTION_KEYS}
# Config keys a method does not read: sweeping them would only repeat identical runs.
_IGNORED: dict[str, set[str] | None] = {
    "full": None, "streaming": _MEMORY_KEYS, "infllm": _QUESTION_KEYS, "random": _QUESTION_KEYS,
}


@dataclass(frozen=True)
class Method:
    """A method and the swept config values it runs with."""

    kind: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.overrides)
        return f"{self.kind}[{inner}]" if inner else self.kind

    def config(self, base: QLLMConfig) -> QLLMConfig:
        """`base` with this method's mode and overrides, validated."""
        mode = "qllm" if self.kind == "qllm-read" else self.kind
        return QLLMConfig.model_validate({**base.model_dump(), **dict(self.overrides), "mode": mode})


def expand_methods(kinds: Sequence[str], sweep: Mapping[str, Sequence[Any]]) -> list[Method]:
    """Every method × every combination of swept values it reads (combinations it ignores are merged)."""
    unknown = set(kinds) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    out: list[Method] = []
    for kind in kinds:
        ignored = _IGNORED.get(kind, set())
        for combo in itertools.product(*sweep.values()):
            pairs = tuple(
                (k, v) for k, v in zip(sweep, combo, strict=True) if ignored is not None and k not in ignored
            )
            if Method(kind, pairs) not in out:
                out.append(Method(kind, pairs))
    return out


def _overlaps(span: tuple[int, int], answer: Answer) -> bool:
    return any(b.start < span[1] and span[0] < b.end for b in answer.blocks)


class Runner:
    """Runs methods over samples with one model and tokenizer; `base` is the config methods start from."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, base: QLLMConfig) -> None:
        self.model, self.tokenizer, self.base = model, tokenizer, base
        self.cuda = next(model.parameters()).device.type == "cuda"
        self._warm: set[str] = set()

    def _warm_up(self, method: Method, engine: QLLMEngine) -> None:
        """One untimed answer over a context that fills the window and makes blocks (kernel compilation,
        allocator growth and first-call costs stay out of the timings)."""
        if method.label in self._warm:
            return
        cfg = engine.config
        words = cfg.n_init + cfg.n_local + 2 * cfg.block_size * max(cfg.topk, 1)
        context = " ".join(["warm"] * words)
        if method.kind == "qllm-read":
            engine.read(context).ask("Why?", max_new_tokens=2)
        else:
            engine.ask(context, "Why?", max_new_tokens=2)
        self._warm.add(method.label)

    def _clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def run(self, method: Method, task: Task, samples: Sequence[Sample]) -> Iterator[dict[str, Any]]:
        """Rows for every question of every sample; a failing sample yields rows with `error` set."""
        engine = QLLMEngine(self.model, self.tokenizer, method.config(self.base))
        for sample in samples:
            read_s, done = None, 0
            try:
                self._warm_up(method, engine)
                memory = None
                if method.kind == "qllm-read":
                    t0 = self._clock()
                    memory = engine.read(sample.context)
                    read_s = self._clock() - t0
                for q_index, query in enumerate(sample.queries):
                    torch.manual_seed(sample.seed)
                    if self.cuda:
                        torch.cuda.reset_peak_memory_stats()
                    t0 = self._clock()
                    budget = task.max_new_tokens
                    if memory is not None:
                        answer = memory.ask(query.question, max_new_tokens=budget)
                    else:
                        answer = engine.ask(sample.context, query.question, max_new_tokens=budget)
                    wall = self._clock() - t0
                    row = self._row(method, sample, q_index, query, read_s)
                    row.update(self._measure(task, query, answer, wall))
                    done += 1
                    yield row
            except Exception as e:  # a failed sample (e.g. out of memory) must not end a long sweep
                if self.cuda:
                    torch.cuda.empty_cache()
                error = "".join(traceback.format_exception_only(e)).strip()
                for q_index, query in enumerate(sample.queries[done:], start=done):
                    yield {**self._row(method, sample, q_index, query, read_s), "error": error, "score": None}

    @staticmethod
    def _row(
        method: Method, sample: Sample, q_index: int, query: Query, read_s: float | None
    ) -> dict[str, Any]:
        return {
            "task": sample.task, "length": sample.length, "seed": sample.seed, "sample": sample.index,
            "query": q_index, "method": method.label, "kind": method.kind,
            "overrides": dict(method.overrides),
            "depth": query.depth, "context_tokens": sample.context_tokens, "questions": len(sample.queries),
            "subject": query.subject, "expected": list(query.answers), "read_s": read_s, "error": None,
        }

    def _measure(self, task: Task, query: Query, answer: Answer, wall: float) -> dict[str, Any]:
        recall = None
        if answer.blocks and query.evidence:
            recall = sum(_overlaps(span, answer) for span in query.evidence) / len(query.evidence)
        return {
            "prediction": answer.text,
            "score": task.score(answer.text, query),
            "evidence_recall": recall,
            "blocks": len(answer.blocks),
            "full_attention": answer.full_attention,
            "engine_context_tokens": answer.usage.context_tokens,
            "question_tokens": answer.usage.question_tokens,
            "generated_tokens": answer.usage.generated_tokens,
            "wall_s": wall,
            "timings": asdict(answer.timings),
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None,
        }
