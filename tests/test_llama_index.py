"""LlamaIndex adapters on the embedded model: QLLM, QLLMIndex, its query engine, retriever and tools."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from typing import Literal

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, PromptTemplate, StorageContext, SummaryIndex
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage
from pydantic import BaseModel, Field

import qllm_integrations.llama_index as li
from qllm_integrations.engines import shared_engine
from qllm_integrations.llama_index import QLLM, QLLMIndex, document_tools
from qllm_runtime import ModelNotFoundError, QLLMEngine
from qllm_runtime.cli import haystack
from tests.conftest import SMALL_WINDOWS

NEEDLE = "The secret password for the blue vault is 4172."
NEEDLE_QUESTION = "What is the secret password for the blue vault?"
ORCHARD = Document(
    text="The orchard at Millbrook grows apples and pears. The head gardener of the orchard is named "
    "Tobias Fenwick. He has worked there for twelve years.",
    metadata={"title": "Millbrook orchard"},
)
HARBOUR = Document(text="The harbour of Kelby has a red lighthouse. The keeper of the Kelby lighthouse is named "
                   "Mara Quill.")
GARDENER_QUESTION = "Who is the head gardener of the Millbrook orchard?"


class Pet(BaseModel):
    """A pet."""

    name: str
    age: int = Field(ge=0)
    kind: Literal["cat", "dog"]


def filler(n_paragraphs: int, seed: int = 0) -> list[str]:
    """Seeded paragraphs of eight synthetic sentences (the project's demo filler)."""
    sentences = haystack(8 * n_paragraphs, seed)
    return [" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 8)]


class CountingEngine(QLLMEngine):
    """The test engine over the same model, recording what each call is asked."""

    def __init__(self, engine: QLLMEngine) -> None:
        super().__init__(engine.model, engine.tokenizer, engine.config)
        self.asked: list[tuple[object, str | None]] = []

    def stream(self, context, question, *args, **kwargs):
        self.asked.append((context, question))
        return super().stream(context, question, *args, **kwargs)

    def stream_chat(self, messages, question=None, **kwargs):
        self.asked.append((messages, question))
        return super().stream_chat(messages, question, **kwargs)


def read_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("read ")]


# ---- a document beyond the model's window, read once ------------------------------------------------
@pytest.fixture(scope="module")
def needle_index(default_engine):
    paragraphs = filler(100)
    paragraphs.insert(3, NEEDLE)
    return QLLMIndex.from_documents([Document(text="\n\n".join(paragraphs))], engine=default_engine)


@pytest.fixture(scope="module")
def needle_response(needle_index):
    return needle_index.as_query_engine(max_new_tokens=16).query(NEEDLE_QUESTION)


def test_query_engine_finds_a_needle_beyond_the_native_window(needle_index, needle_response, default_engine):
    assert needle_index.memory.n_tokens > default_engine.model.config.max_position_embeddings
    assert "4172" in needle_response.response
    scores = [n.score for n in needle_response.source_nodes]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert any(NEEDLE in n.node.get_content() for n in needle_response.source_nodes)


def test_streaming_gives_the_same_answer_from_the_same_memory(needle_index, needle_response, caplog):
    with caplog.at_level(logging.INFO, logger="quickllama"):
        streaming = needle_index.as_query_engine(streaming=True, max_new_tokens=16).query(NEEDLE_QUESTION)
        assert streaming.source_nodes == []  # known once the answer is complete
        text = "".join(streaming.response_gen)
    assert text == needle_response.response
    assert [n.node_id for n in streaming.source_nodes] == [n.node_id for n in needle_response.source_nodes]
    assert read_lines(caplog) == []


def test_retriever_returns_the_looked_up_nodes(needle_index):
    nodes = needle_index.as_retriever().retrieve(NEEDLE_QUESTION)
    assert any(NEEDLE in n.node.get_content() for n in nodes)


# ---- short documents ----------------------------------------------------------------------------------
async def test_summary_index_compact_mode_is_one_call_with_the_question_apart(default_engine, caplog):
    engine = CountingEngine(default_engine)
    llm = QLLM(engine=engine, max_new_tokens=24)
    index = SummaryIndex.from_documents([ORCHARD, HARBOUR])
    with caplog.at_level(logging.INFO, logger="quickllama"):
        response = index.as_query_engine(llm=llm).query(GARDENER_QUESTION)
    assert len(engine.asked) == 1
    context, question = engine.asked[0]
    assert question == GARDENER_QUESTION
    assert ORCHARD.text in context and HARBOUR.text in context and GARDENER_QUESTION not in context
    assert sum(r.getMessage().startswith("answered:") for r in caplog.records) == 1
    assert "Tobias" in response.response

    streaming = index.as_query_engine(llm=llm, streaming=True)
    assert "".join(streaming.query(GARDENER_QUESTION).response_gen) == response.response
    assert (await index.as_query_engine(llm=llm).aquery(GARDENER_QUESTION)).response == response.response
    deltas = [d async for d in (await streaming.aquery(GARDENER_QUESTION)).async_response_gen()]
    assert "".join(deltas) == response.response
    assert engine.asked == [(context, question)] * 4


async def test_persisted_index_loads_and_answers_the_same(default_engine, tmp_path):
    index = QLLMIndex.from_documents([ORCHARD, HARBOUR], engine=default_engine)
    index.storage_context.persist(persist_dir=str(tmp_path))
    loaded = QLLMIndex.from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path)), engine=default_engine)
    assert loaded.index_struct.nodes == index.index_struct.nodes
    assert set(loaded.ref_doc_info) == {ORCHARD.doc_id, HARBOUR.doc_id}
    before = index.as_query_engine(max_new_tokens=12).query(GARDENER_QUESTION)
    after = await loaded.as_query_engine(max_new_tokens=12).aquery(GARDENER_QUESTION)
    streamed = await loaded.as_query_engine(streaming=True, max_new_tokens=12).aquery(GARDENER_QUESTION)
    assert after.response == before.response
    assert "".join([d async for d in streamed.async_response_gen()]) == before.response


def test_inserting_a_document_extends_the_memory(default_engine, caplog):
    index = QLLMIndex.from_documents([ORCHARD], engine=default_engine)
    n_tokens = index.memory.n_tokens
    question = "Who keeps the Kelby lighthouse?"
    with caplog.at_level(logging.INFO, logger="quickllama"):
        index.insert(HARBOUR)
        inserted = index.as_query_engine(max_new_tokens=12).query(question)
    assert read_lines(caplog) == []
    assert index.memory.n_tokens > n_tokens and index.memory.context.endswith(HARBOUR.text)
    at_once = QLLMIndex.from_documents([ORCHARD, HARBOUR], engine=default_engine)
    assert at_once.memory.context == index.memory.context
    assert at_once.as_query_engine(max_new_tokens=12).query(question).response == inserted.response


# ---- the LLM --------------------------------------------------------------------------------------
def test_metadata_advertises_the_memory_capacity(default_engine):
    metadata = QLLM(engine=default_engine).metadata
    assert metadata.context_window == default_engine.context_capacity
    assert metadata.context_window > default_engine.model.config.max_position_embeddings
    assert metadata.is_chat_model and metadata.is_function_calling_model


def test_adapters_share_one_engine_per_model_and_config():
    pytest.importorskip("langchain_core")
    from qllm_integrations import ChatQLLM

    engine = ChatQLLM(max_tokens=8).load_engine()  # the embedded model, loaded here once
    assert QLLM().engine is engine and QLLMIndex(nodes=[]).engine is engine and shared_engine() is engine
    other = QLLM(config=SMALL_WINDOWS).engine
    assert other is not engine and other.config == SMALL_WINDOWS and other.model is engine.model
    assert ChatQLLM(config=SMALL_WINDOWS).load_engine() is other
    assert QLLMEngine(engine.model, engine.tokenizer, SMALL_WINDOWS).model is other.model


def test_structured_predict_fills_a_validated_object(default_engine):
    engine = CountingEngine(default_engine)
    llm = QLLM(engine=engine, max_new_tokens=16)
    prompt = PromptTemplate("Describe the pet: {text}")
    pet = llm.structured_predict(Pet, prompt, text="Rex is a 3 year old dog.")
    assert isinstance(pet, Pet) and (pet.age, pet.kind) == (3, "dog")
    assert {question for _, question in engine.asked} == {"Describe the pet: Rex is a 3 year old dog."}
    chat = llm.as_structured_llm(Pet).chat([ChatMessage(role="user", content="Rex is a 3 year old dog.")])
    assert isinstance(chat.raw, Pet) and chat.raw.kind == "dog" and json.loads(chat.message.content)["age"] == 3


def test_model_loads_on_first_use():
    llm = QLLM(model_name="/nonexistent/model")  # constructing loads nothing
    with pytest.raises(ModelNotFoundError):
        _ = llm.metadata


async def test_sync_and_async_calls_agree_without_blocking_the_loop(default_engine):
    llm = QLLM(engine=default_engine, max_new_tokens=12)
    prompt = "What colour is the sky on a clear day?"
    messages = [ChatMessage(role="user", content=prompt)]
    text = llm.complete(prompt).text
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    texts = [
        (await llm.acomplete(prompt)).text,
        (await llm.achat(messages)).message.content,
        "".join([r.delta async for r in await llm.astream_complete(prompt)]),
        "".join([r.delta async for r in await llm.astream_chat(messages)]),
    ]
    ticker.cancel()
    assert ticks > 20
    texts += [
        llm.chat(messages).message.content,
        "".join(r.delta for r in llm.stream_complete(prompt)),
        "".join(r.delta for r in llm.stream_chat(messages)),
    ]
    assert text and texts == [text] * 7


# ---- agents ---------------------------------------------------------------------------------------
async def test_function_agent_calls_the_document_tool(default_engine):
    tools = document_tools([ORCHARD], engine=default_engine, return_direct=True, max_new_tokens=24)
    name = tools[0].metadata.name
    agent = FunctionAgent(tools=tools, llm=QLLM(engine=default_engine, max_new_tokens=48), initial_tool_choice=name)
    handler = agent.run(GARDENER_QUESTION)
    results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
    response = await handler
    assert [r.tool_name for r in results] == [name]
    assert "Tobias Fenwick" in results[0].tool_output.content
    assert str(response) == results[0].tool_output.content


async def test_react_agent_answers_from_the_tool(default_engine):
    tools = document_tools([ORCHARD], engine=default_engine, max_new_tokens=24)
    name = tools[0].metadata.name
    history = [
        ChatMessage(role="user", content="When was the Millbrook orchard founded?"),
        ChatMessage(role="assistant", content="Thought: I need to use a tool to help me answer the question.\n"
                    f'Action: {name}\nAction Input: {{"input": "When was the Millbrook orchard founded?"}}'),
        ChatMessage(role="user", content="Observation: The orchard was founded in 1887."),
        ChatMessage(role="assistant", content="Thought: I can answer without using any more tools.\n"
                    "Answer: The orchard was founded in 1887."),
    ]
    agent = ReActAgent(tools=tools, llm=QLLM(engine=default_engine, max_new_tokens=64))
    handler = agent.run(GARDENER_QUESTION, chat_history=history)
    results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
    response = await handler
    assert [r.tool_name for r in results] == [name]
    assert "Tobias" in str(response)


# ---- the module -----------------------------------------------------------------------------------
def test_exports_and_lazy_package_import():
    assert li.__all__ == ["QLLM", "QLLMIndex", "QLLMQueryEngine", "QLLMRetriever", "document_tools"]
    code = ("import sys, qllm_integrations; "
            "assert not [m for m in sys.modules if m.startswith(('llama_index', 'langchain'))]; "
            "from qllm_integrations import QLLMIndex; from qllm_integrations.llama_index import QLLMIndex as Index; "
            "assert QLLMIndex is Index")
    subprocess.run([sys.executable, "-c", code], check=True)
