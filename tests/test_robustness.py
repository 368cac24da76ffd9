"""Failed, interrupted and concurrent calls leave memories and engines exactly as before; bad settings are caught
before any reading."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from qllm_runtime import (
    EngineBusyError,
    InvalidInputError,
    QLLMConfig,
    QLLMEngine,
    StreamClosedError,
)
from qllm_runtime.layout import BlockLayout
from qllm_runtime.session import FullSession

from .conftest import tiny_model

WINDOWS = dict(n_init=4, n_local=32, block_size=8, topk=2, lookup_chunk=16, prefill_chunk=64,
               full_within_window=False)
CONTEXT = "The cat sat on the mat. The dog slept by the door. " * 12
MORE = " Later the bird sang in the old oak tree by the river. " * 12
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


class Interrupt(Exception):
    """Raised from a progress callback: a caller giving up half-way."""


def interrupt(done: int, total: int) -> None:
    raise Interrupt(f"stopped at {done}/{total}")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", len(tokenizer))


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return QLLMEngine(model, tokenizer, QLLMConfig(**WINDOWS))


@pytest.fixture(scope="module")
def full(model, tokenizer):
    return QLLMEngine(model, tokenizer, QLLMConfig(mode="full", prefill_chunk=64))


@torch.inference_mode()
def memory_state(memory) -> list:
    """Everything a memory holds: its tokens and every tensor that later answers read."""
    session = memory.session
    state: list = [memory.context, list(memory.tokens.ids), list(memory.tokens.offsets)]
    if isinstance(session, FullSession):
        return [*state, session.seen, *[(layer.keys.clone(), layer.values.clone()) for layer in session.cache.layers]]
    for layer in session.memory.layers.values():
        n = layer.n_blocks
        snap = layer.snapshot()
        blocks = layer.store.gather(torch.arange(n)[None]) if n else ()
        state += [snap.init_len, snap.tail_start, snap.seen, n, snap.tail_k, snap.tail_v, snap.tail_scores,
                  layer.init_k[:, : layer.init_len].clone(), layer.repr_keys[:n].clone(), *blocks]
    return state


def assert_same_state(before: list, after: list) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        if isinstance(a, tuple) and a and isinstance(a[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b


# ---- 1. interrupted calls leave no trace ----------------------------------------------------------------
@pytest.mark.parametrize("which", ["engine", "full"])
def test_interrupted_extend_leaves_the_memory_as_before(which, request):
    engine = request.getfixturevalue(which)
    memory = engine.read(CONTEXT)
    expected = memory.ask("Where did the cat sit?", max_new_tokens=6)
    before = memory_state(memory)
    with pytest.raises(Interrupt):
        memory.extend(MORE, progress=interrupt)
    assert_same_state(before, memory_state(memory))
    again = memory.ask("Where did the cat sit?", max_new_tokens=6)
    assert (again.text, again.blocks, again.usage) == (expected.text, expected.blocks, expected.usage)
    memory.extend(MORE)  # and a later extend reads the text as if the interrupted one never happened
    assert memory.context == CONTEXT + MORE


@pytest.mark.parametrize("which", ["engine", "full"])
def test_abandoned_memory_answer_leaves_the_memory_as_before(which, request):
    engine = request.getfixturevalue(which)
    memory = engine.read(CONTEXT)
    expected = memory.ask("Where did the cat sit?", max_new_tokens=6)
    before = memory_state(memory)
    stream = memory.stream("Where did the cat sit?", max_new_tokens=6)
    next(stream, None)
    stream.close()
    assert_same_state(before, memory_state(memory))
    assert memory.ask("Where did the cat sit?", max_new_tokens=6).text == expected.text


def test_interrupted_read_and_ask_leave_the_engine_as_before(engine):
    expected = engine.ask(CONTEXT, "Where did the cat sit?", max_new_tokens=6)
    with pytest.raises(Interrupt):
        engine.read(CONTEXT, progress=interrupt)
    with pytest.raises(Interrupt):
        engine.ask(CONTEXT, "Where did the cat sit?", progress=interrupt)
    with pytest.raises(Interrupt):
        engine.stream_chat([{"role": "user", "content": CONTEXT}], progress=interrupt).result()
    assert engine.model.config._attn_implementation == "sdpa"
    assert engine.ask(CONTEXT, "Where did the cat sit?", max_new_tokens=6).text == expected.text


# ---- 2. mode full answers from a memory ---------------------------------------------------------------------
def test_full_mode_memory_answers_twice_and_is_restored(full):
    memory = full.read(CONTEXT)
    first = memory.ask("Where did the cat sit?", max_new_tokens=6)
    second = memory.ask("Where did the cat sit?", max_new_tokens=6)
    assert first.text == second.text
    assert memory.session.cache.get_seq_length() == memory.session.seen == memory.n_tokens
    assert first.text == full.ask(CONTEXT, "Where did the cat sit?", max_new_tokens=6).text  # same tokens, same answer


# ---- 3. sizes, text and settings -----------------------------------------------------------------------------
def test_huge_max_new_tokens_is_bounded_by_the_capacity(model, tokenizer):
    capped = QLLMEngine(model, tokenizer, QLLMConfig(**WINDOWS, max_context_tokens=300))
    answer = capped.ask("A short note about a cat.", "Why?", max_new_tokens=10**9)
    assert answer.usage.generated_tokens >= 1
    assert answer.usage.total_tokens <= 301  # the last generated token is never read back
    memory = capped.read("A short note about a cat.")
    assert memory.ask("Why?", max_new_tokens=10**9).usage.total_tokens <= 301


@pytest.mark.parametrize("where", ["context", "question", "message", "turn", "extend"])
def test_lone_surrogates_are_invalid_input(engine, where):
    bad = "Some text \ud800 here."
    with pytest.raises(InvalidInputError, match=r"surrogate .*\\ud800"):
        if where == "context":
            engine.ask(bad, "Why?")
        elif where == "question":
            engine.ask(CONTEXT, bad)
        elif where == "message":
            engine.chat([{"role": "system", "content": bad}, {"role": "user", "content": "Why?"}])
        elif where == "turn":
            engine.read(CONTEXT).ask(bad)
        else:
            engine.read(CONTEXT).extend(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(temperature="hot"), "temperature must be a finite number"),
        (dict(top_p="all"), "top_p must be a number"),
        (dict(top_p=float("nan")), "top_p must be a number"),
        (dict(stop=5), "stop must be a str or a list of str"),
        (dict(seed="x"), "seed must be None or an int"),
        (dict(seed=True), "seed must be None or an int"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive int"),
        (dict(max_tokens=5), "unknown generation option.*max_new_tokens"),
    ],
)
def test_bad_generation_settings_are_caught_before_reading(engine, options, message):
    progress: list[int] = []
    record = lambda done, total: progress.append(done)  # noqa: E731
    with pytest.raises(InvalidInputError, match=message):
        engine.ask(CONTEXT, "Why?", progress=record, **options)
    with pytest.raises(InvalidInputError, match=message):
        engine.chat([{"role": "user", "content": "Why?"}], progress=record, **options)
    memory = engine.read(CONTEXT)
    with pytest.raises(InvalidInputError, match=message):
        memory.ask("Why?", **options)
    assert progress == []


# ---- 4. max_context_tokens is enforced -----------------------------------------------------------------------
def test_max_context_tokens_is_enforced_before_reading(model, tokenizer):
    capped = QLLMEngine(model, tokenizer, QLLMConfig(**WINDOWS, max_context_tokens=100))
    n = capped.count_tokens(CONTEXT)
    assert n > 100
    progress: list[int] = []
    record = lambda done, total: progress.append(done)  # noqa: E731
    message = r"max_context_tokens \(100\).*QLLMConfig\(max_context_tokens="
    with pytest.raises(InvalidInputError, match=message):
        capped.ask(CONTEXT, "Why?", progress=record)
    with pytest.raises(InvalidInputError, match=message):
        capped.stream(CONTEXT, "Why?", progress=record)
    with pytest.raises(InvalidInputError, match=message):
        capped.chat([{"role": "user", "content": CONTEXT}], progress=record)
    with pytest.raises(InvalidInputError, match=r"context is [\d,]+ tokens, more than"):
        capped.read(CONTEXT, progress=record)
    memory = capped.read("A short note about a cat.")
    with pytest.raises(InvalidInputError, match=message):
        memory.extend(CONTEXT, progress=record)
    with pytest.raises(InvalidInputError, match=message):
        memory.ask("Why? " * 100)
    assert progress == []
    assert memory.context == "A short note about a cat."


# ---- 5. sampling leaves the caller's random stream alone ------------------------------------------------------
def test_sampling_uses_a_private_generator(engine):
    state = torch.random.get_rng_state()
    unseeded = engine.ask(CONTEXT, "Why?", max_new_tokens=5, temperature=1.0)
    seeded = engine.ask(CONTEXT, "Why?", max_new_tokens=5, temperature=1.0, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert unseeded.usage.generated_tokens >= 1
    again = engine.ask(CONTEXT, "Why?", max_new_tokens=5, temperature=1.0, seed=7)
    assert again.text == seeded.text


# ---- 6. streams and the model lock -----------------------------------------------------------------------
def test_result_of_a_closed_stream_is_a_clear_error(engine):
    stream = engine.stream(CONTEXT, "Why?", max_new_tokens=6)
    next(stream, None)
    stream.close()
    with pytest.raises(StreamClosedError, match="closed before it finished"):
        stream.result()


def test_a_second_thread_gets_a_clear_error_instead_of_waiting_forever(engine):
    impatient = QLLMEngine(engine.model, engine.tokenizer, engine.config, lock_timeout=0.2)
    stream = engine.stream(CONTEXT, "Where did the cat sit?", max_new_tokens=6)
    next(stream, None)  # half-read: the stream holds the model
    errors: list[BaseException] = []

    def call() -> None:
        try:
            impatient.ask("Other text.", "What?", max_new_tokens=2)
        except BaseException as e:  # handed to the main thread
            errors.append(e)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    stream.close()
    assert len(errors) == 1 and isinstance(errors[0], EngineBusyError)
    assert "Where did the cat sit?" in str(errors[0]) and "lock_timeout" in str(errors[0])
    assert impatient.ask("Other text.", "What?", max_new_tokens=2).usage.generated_tokens <= 2


@pytest.mark.parametrize("timeout", [-1, float("nan"), "soon"])
def test_bad_lock_timeout(engine, timeout):
    with pytest.raises(InvalidInputError, match="lock_timeout"):
        QLLMEngine(engine.model, engine.tokenizer, engine.config, lock_timeout=timeout)


# ---- 7. a memory's turn, question and tools ------------------------------------------------------------------
def test_memory_turn_and_question_are_separate(model, tokenizer):
    engine = QLLMEngine(model, tokenizer, QLLMConfig(**WINDOWS, question_weight=1e4))
    memory = engine.read(CONTEXT + MORE)
    turn = "Earlier notes: none.\n\nWhere did the cat sit?"
    plain = memory.ask(turn, max_new_tokens=4)
    same = memory.ask(turn, question=turn, max_new_tokens=4)
    assert (plain.text, plain.blocks) == (same.text, same.blocks)  # the question defaults to the turn
    by_cat = memory.ask(turn, question="cat mat", max_new_tokens=4)
    by_bird = memory.ask(turn, question="bird oak river", max_new_tokens=4)
    assert by_cat.usage == by_bird.usage == plain.usage  # the same turn is sent ...
    assert by_cat.blocks != by_bird.blocks  # ... but each question steers its own lookups


def test_memory_turn_renders_tools_through_the_chat_template(model, tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    engine = QLLMEngine(model, tokenizer, QLLMConfig(**WINDOWS))
    memory = engine.read(CONTEXT)
    turn = tokenizer.decode(engine.prompts.turn_ids("What is the weather in Paris?", [TOOL]))
    assert "get_weather" in turn and turn.rstrip().endswith("<|im_start|>assistant")
    with_tools = memory.ask("What is the weather in Paris?", tools=[TOOL], max_new_tokens=2)
    without = memory.ask("What is the weather in Paris?", max_new_tokens=2)
    assert with_tools.usage.question_tokens > without.usage.question_tokens


# ---- 8. block layout ------------------------------------------------------------------------------------------
def test_block_layout_maps_blocks_to_positions():
    layout = BlockLayout(n_init=4, block_size=8)
    assert layout.start(0) == 4 and layout.span(2) == range(20, 28)
    assert [layout.count(n) for n in (3, 4, 11, 12, 20)] == [0, 0, 0, 1, 2]


def test_block_spans_point_at_the_looked_up_text(engine):
    facts = " ".join(f"Fact {i}: box {i} holds {7 * i} coins." for i in range(40))  # no two blocks alike
    memory = engine.read(facts)
    answer = memory.ask("Which box holds 91 coins?", max_new_tokens=3)
    layout = BlockLayout(WINDOWS["n_init"], WINDOWS["block_size"])
    offsets = memory.tokens.offsets

    def block_text(block: int) -> str | None:  # None: only chat-template tokens
        spans = [offsets[p] for p in layout.span(block) if offsets[p] is not None]
        return memory.context[spans[0][0] : spans[-1][1]] if spans else None

    texts = {block_text(b) for b in range(layout.count(memory.n_tokens))}
    assert answer.blocks
    for span in answer.blocks:
        assert span.text == memory.context[span.start : span.end] and span.text in texts
