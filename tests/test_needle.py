"""The real embedded model finds a needle through block lookup where a sliding window cannot."""

from __future__ import annotations

import pytest

from qllm_runtime import QLLMEngine
from qllm_runtime.cli import haystack

NEEDLE = "The secret animal of the blue vault is a giraffe."
QUESTION = "What is the secret animal of the blue vault?"


@pytest.fixture(scope="module")
def document() -> str:
    sentences = haystack(400, seed=3)  # ~4.4K tokens with the chat header
    at = int(len(sentences) * 0.3)
    return " ".join([*sentences[:at], NEEDLE, *sentences[at:]])


@pytest.mark.slow
def test_qllm_finds_needle_streaming_does_not(default_engine, document):
    answer = default_engine.ask(document, QUESTION, max_new_tokens=12)
    assert answer.usage.context_tokens > 4000
    assert "giraffe" in answer.text.lower()
    where = document.index("giraffe")
    assert any(b.start <= where < b.end for b in answer.blocks[:8]), "the needle's block was not looked up"

    streaming = QLLMEngine(default_engine.model, default_engine.tokenizer,
                           default_engine.config.model_copy(update={"mode": "streaming"}))
    missed = streaming.ask(document, QUESTION, max_new_tokens=12)
    assert "giraffe" not in missed.text.lower()
    assert missed.blocks == []
