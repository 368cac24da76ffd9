"""LlamaIndex adapters: an LLM whose question-answering calls pass the question separately, and an index
that reads its documents into block memory once.

    from llama_index.core import SummaryIndex
    from qllm_integrations.llama_index import QLLM, QLLMIndex

    index = QLLMIndex.from_documents(documents)            # read into memory on the first query
    response = index.as_query_engine().query("What is the pass key?")
    response.source_nodes                                    # nodes of the passages the engine looked up

    SummaryIndex.from_documents(documents).as_query_engine(llm=QLLM())   # stock engine: one call

`QLLM` advertises the engine's memory capacity as its context window, so a stock `compact` synthesizer
packs every node into one QA prompt; `QLLM.predict` then passes that prompt's `context_str` and
`query_str` to `engine.ask(context, question)` instead of one formatted string. Other prompts go through
`chat` (the last user turn steers the lookups). Tool calling uses `qllm_integrations.tools`.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from bisect import bisect_right
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from dataclasses import replace
from operator import itemgetter
from typing import Any

from qllm_runtime import Answer, AnswerStream, BlockSpan, Memory, QLLMConfig, QLLMEngine

from .tools import parse_tool_calls, template_renders_tools, tool_messages_for_template, tools_system_prompt

try:
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
        TextBlock,
        ToolCallBlock,
    )
    from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.indices.list.base import SummaryIndex
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import ToolSelection
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.prompts import BasePromptTemplate
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import (
        BaseNode,
        Document,
        MetadataMode,
        NodeWithScore,
        QueryBundle,
        TransformComponent,
    )
    from llama_index.core.storage import StorageContext
    from llama_index.core.tools import QueryEngineTool
    from llama_index.core.types import TokenAsyncGen, TokenGen
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "qllm_integrations.llama_index needs llama-index-core: pip install 'quickllama[llama-index]'"
    ) from e

__all__ = ["QLLM", "QLLMIndex", "QLLMQueryEngine", "QLLMRetriever", "document_tools"]

NODE_SEPARATOR = "\n\n"
DEFAULT_MAX_NEW_TOKENS = 256
_ROLES = {"developer": "system", "chatbot": "assistant", "model": "assistant", "function": "tool"}
_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")


@functools.cache
def _shared_engine(model_name: str | None, config: QLLMConfig | None) -> QLLMEngine:
    """One engine per (model, config) in this process, loaded on first use; engines share the model."""
    if config is not None:
        base = _shared_engine(model_name, None)
        return QLLMEngine(base.model, base.tokenizer, config)
    return QLLMEngine.default() if model_name is None else QLLMEngine.from_pretrained(model_name)


class QLLM(FunctionCallingLLM):
    """A local Hugging Face chat model over a `QLLMEngine`: long context in block memory, the question
    steering which blocks each layer looks up.

    `engine` (optional) is used as is; otherwise `model_name` (local directory, hub id or .gguf; None =
    the embedded SmolLM2-135M-Instruct) and `config` are loaded on the first call. Per call, the keyword
    arguments `max_new_tokens`, `temperature`, `top_p`, `stop` and `seed` override the fields.

    A prompt template with `context_str` and `query_str` (the QA templates of the response synthesizers)
    becomes `engine.ask(context_str, query_str)`: the engine's own prompt layout replaces the template's
    wording and `system_prompt`. Every other call is a chat whose last user turn is the question.
    """

    model_name: str | None = Field(default=None, description="HF directory, hub id or .gguf; None = embedded")
    config: QLLMConfig | None = Field(default=None, description="engine settings; None = QLLMConfig()")
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    _engine: QLLMEngine | None = PrivateAttr(default=None)

    def __init__(self, engine: QLLMEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "QLLM"

    @property
    def engine(self) -> QLLMEngine:
        if self._engine is None:
            self._engine = _shared_engine(self.model_name, self.config)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.engine.context_capacity,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name or "quickllama-default",
        )

    # ---- question answering: context and question reach the engine separately -------------------
    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return super().predict(prompt, **prompt_args)
        return self._parse_output(self._ask(*qa).result().text)

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return super().stream(prompt, **prompt_args)
        return _deltas(self._ask(*qa))

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return await super().apredict(prompt, **prompt_args)
        answer = await asyncio.to_thread(lambda: self._ask(*qa).result())
        return self._parse_output(answer.text)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return await super().astream(prompt, **prompt_args)
        return _pump(await asyncio.to_thread(self._ask, *qa))

    def _ask(self, context: str, question: str) -> AnswerStream:
        return self.engine.stream(context, question, **self._generation({}))

    # ---- chat and completion -----------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = self._chat(messages, kwargs).result()
        return _chat_response(answer.text, answer.text, kwargs, answer)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._chat(messages, kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for delta in _deltas(stream):
                text += delta
                yield _chat_response(text, delta)
            if kwargs.get("tools"):
                yield _chat_response(text, "", kwargs, stream.answer)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = await asyncio.to_thread(lambda: self._chat(messages, kwargs).result())
        return _chat_response(answer.text, answer.text, kwargs, answer)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = await asyncio.to_thread(self._chat, messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for delta in _pump(stream):
                text += delta
                yield _chat_response(text, delta)
            if kwargs.get("tools"):
                yield _chat_response(text, "", kwargs, stream.answer)

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self._complete(prompt, kwargs).result()
        return CompletionResponse(text=answer.text, raw=answer)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self._complete(prompt, kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for delta in _deltas(stream):
                text += delta
                yield CompletionResponse(text=text, delta=delta)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = await asyncio.to_thread(lambda: self._complete(prompt, kwargs).result())
        return CompletionResponse(text=answer.text, raw=answer)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        stream = await asyncio.to_thread(self._complete, prompt, kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for delta in _pump(stream):
                text += delta
                yield CompletionResponse(text=text, delta=delta)

        return gen()

    def _complete(self, prompt: str, kwargs: dict) -> AnswerStream:
        """The prompt as one user turn (after the system prompt, if any): it is also the question."""
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        if self.system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        return self._chat(messages, kwargs)

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict) -> AnswerStream:
        """Chat-template messages. Tool schemas go to the template, or to the system prompt if it ignores
        them; a forced call adds an instruction to the last user turn (the lookups keep the question)."""
        tools = kwargs.get("tools")
        renders = bool(tools) and template_renders_tools(self.engine.tokenizer)
        turns = tool_messages_for_template([_to_dict(m) for m in messages], renders)
        if tools and not renders:
            turns = _with_system_text(turns, tools_system_prompt(tools))
        forced = _forced_tool(tools, kwargs)
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        question = None
        if forced is not None and users:
            question = turns[users[-1]]["content"]
            order = f"Call {forced or 'one of the tools'}: reply with only the JSON tool call."
            turns[users[-1]] = {**turns[users[-1]], "content": f"{question}\n\n{order}"}
        return self.engine.stream_chat(turns, question=question, tools=tools if renders else None,
                                       **self._generation(kwargs))

    def _generation(self, kwargs: dict) -> dict:
        fields = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        return fields | {k: kwargs[k] for k in _GENERATION_KEYS if k in kwargs}

    # ---- function calling --------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Chat kwargs with OpenAI-style tool schemas. `tool_choice` (a tool name, or "required") or
        `tool_required` force a call: the model then only supplies the arguments."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        choice = kwargs.pop("tool_choice", None) or ("required" if tool_required else None)
        schemas = [t.metadata.to_openai_tool() for t in tools] or None
        return {**kwargs, "messages": messages, "tools": schemas, "tool_choice": choice}

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = [
            ToolSelection(tool_id=b.tool_call_id or "", tool_name=b.tool_name, tool_kwargs=b.tool_kwargs)
            for b in response.message.blocks
            if isinstance(b, ToolCallBlock)
        ]
        if not calls and error_on_no_tool_call:
            raise ValueError(f"expected a tool call in the reply, got: {response.message.content!r:.200}")
        return calls


def _qa_inputs(prompt: BasePromptTemplate, prompt_args: dict) -> tuple[str, str] | None:
    """(context, question) when `prompt` is a question-answering template with both filled in."""
    values = {**prompt.kwargs, **prompt_args}
    context, question = values.get("context_str"), values.get("query_str")
    if not {"context_str", "query_str"} <= set(prompt.template_vars):
        return None
    if isinstance(context, str) and context.strip() and isinstance(question, str) and question.strip():
        return context, question
    return None


def _to_dict(message: ChatMessage) -> dict:
    """A ChatMessage in the OpenAI/transformers shape that the engine and `tools` expect."""
    role = _ROLES.get(message.role.value, message.role.value)
    out: dict[str, Any] = {"role": role, "content": message.content or ""}
    calls = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if calls:
        out["tool_calls"] = [
            {"id": c.tool_call_id or "", "type": "function",
             "function": {"name": c.tool_name, "arguments": c.tool_kwargs}}
            for c in calls
        ]
    if role == "tool":
        out["tool_call_id"] = message.additional_kwargs.get("tool_call_id", "")
    return out


def _with_system_text(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _forced_tool(tools: list[dict] | None, kwargs: dict) -> str | None:
    """The tool a forced call must name: its name, "" for any tool, None when the call is not forced."""
    choice = kwargs.get("tool_choice")
    if isinstance(choice, dict):  # OpenAI shape {"type": "function", "function": {"name": ...}}
        choice = choice.get("function", {}).get("name")
    if not tools or choice in (None, "auto", "none"):
        return None
    names = [t["function"]["name"] for t in tools]
    return choice if choice in names else names[0] if len(names) == 1 else ""


def _chat_response(text: str, delta: str, kwargs: dict | None = None, answer: Answer | None = None
                   ) -> ChatResponse:
    """An assistant reply; with tools, tool calls in the text become ToolCallBlocks (a forced tool's
    call counts whatever name the model wrote)."""
    tools = (kwargs or {}).get("tools")
    if not tools:
        message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
    else:
        forced = _forced_tool(tools, kwargs or {})
        content, calls = parse_tool_calls(text, None if forced else {t["function"]["name"] for t in tools})
        if forced:
            calls = [replace(call, name=forced) for call in calls[:1]]
        blocks: list[Any] = [TextBlock(text=content)] if content else []
        blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
        message = ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)
    return ChatResponse(message=message, delta=delta, raw=answer)


def _deltas(stream: AnswerStream) -> Iterator[str]:
    """The stream's text pieces; stopping early closes it (and frees the model)."""
    with closing(stream):
        yield from stream


async def _pump(stream: AnswerStream) -> AsyncIterator[str]:
    """Iterate `stream` in one worker thread from start to end (the model lock belongs to the thread that
    started the call) and yield its pieces on the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            for delta in _deltas(stream):
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))
        except Exception as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        while (item := await queue.get())[0] == "delta":
            yield item[1]
        if item[0] == "error":
            raise item[1]
    finally:
        stop.set()
        await worker


# ---- the index ------------------------------------------------------------------------------------
def _default_transformations() -> list[TransformComponent]:
    """Sentence chunks without overlap: the engine reads every node, so overlap would be read twice."""
    return [SentenceSplitter(chunk_size=256, chunk_overlap=0)]


class QLLMIndex(SummaryIndex):
    """Documents read into one block memory, answered with the question passed separately.

    Nodes are kept in the docstore like a `SummaryIndex` (so `storage_context.persist()` keeps them); the
    memory is read on the first query (again after loading) from the node texts joined in order, and
    inserted nodes extend it. Nodes are citation units, not retrieval units: unless `transformations` are
    given, documents are split into sentence chunks of 256 tokens without overlap. `engine`: a
    `QLLMEngine`, default the embedded model.
    """

    def __init__(self, *args: Any, engine: QLLMEngine | None = None,
                 transformations: list[TransformComponent] | None = None, **kwargs: Any) -> None:
        self._engine = engine
        self._memory: Memory | None = None
        self._spans: list[tuple[int, int, str]] = []  # (start, end, node_id) in the memory's context
        self._read_lock = threading.Lock()
        super().__init__(*args, transformations=transformations or _default_transformations(), **kwargs)

    @classmethod
    def from_documents(cls, documents: Sequence[Document],
                       transformations: list[TransformComponent] | None = None, **kwargs: Any) -> QLLMIndex:
        transformations = transformations or _default_transformations()
        return super().from_documents(documents, transformations=transformations, **kwargs)

    @classmethod
    def from_storage(cls, storage_context: StorageContext, index_id: str | None = None, **kwargs: Any
                     ) -> QLLMIndex:
        """Load a persisted QLLMIndex (`load_index_from_storage` would give a plain SummaryIndex)."""
        index_struct = storage_context.index_store.get_index_struct(index_id)
        if index_struct is None:
            raise ValueError(f"no index {index_id or ''} in this storage context; persist one first")
        return cls(index_struct=index_struct, storage_context=storage_context, **kwargs)

    @property
    def engine(self) -> QLLMEngine:
        if self._engine is None:
            self._engine = _shared_engine(None, None)
        return self._engine

    @property
    def memory(self) -> Memory:
        """The nodes read into block memory (on first use)."""
        with self._read_lock:
            if self._memory is None:
                nodes = self.docstore.get_nodes(self.index_struct.nodes)
                if not nodes:
                    raise ValueError("this QLLMIndex has no nodes: insert documents before querying it")
                texts = [node.get_content(MetadataMode.LLM) for node in nodes]
                self._spans, start = [], 0
                for node, text in zip(nodes, texts, strict=True):
                    self._spans.append((start, start + len(text), node.node_id))
                    start += len(text) + len(NODE_SEPARATOR)
                self._memory = self.engine.read(NODE_SEPARATOR.join(texts))
            return self._memory

    def _insert(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        super()._insert(nodes, **insert_kwargs)
        with self._read_lock:
            if self._memory is not None:
                for node in nodes:
                    text = node.get_content(MetadataMode.LLM)
                    start = len(self._memory.context) + len(NODE_SEPARATOR)
                    self._memory.extend(NODE_SEPARATOR + text)
                    self._spans.append((start, start + len(text), node.node_id))

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        super()._delete_node(node_id, **delete_kwargs)
        with self._read_lock:
            self._memory = None  # memory cannot forget: read again on the next query

    def source_nodes(self, blocks: Sequence[BlockSpan]) -> list[NodeWithScore]:
        """Nodes overlapping the looked-up passages; score = their share of the lookups, best first."""
        total = sum(b.hits for b in blocks) or 1
        scores: dict[str, float] = {}
        for block in blocks:
            i = max(bisect_right(self._spans, block.start, key=itemgetter(0)) - 1, 0)  # spans are sorted
            while i < len(self._spans) and self._spans[i][0] < block.end:
                start, end, node_id = self._spans[i]
                overlap = min(end, block.end) - max(start, block.start)
                if overlap > 0:
                    share = block.hits / total * overlap / max(block.end - block.start, 1)
                    scores[node_id] = scores.get(node_id, 0.0) + share
                i += 1
        nodes = self.docstore.get_nodes(list(scores))
        return sorted((NodeWithScore(node=n, score=scores[n.node_id]) for n in nodes), key=lambda n: -n.score)

    def as_retriever(self, **kwargs: Any) -> QLLMRetriever:
        return QLLMRetriever(self, callback_manager=self._callback_manager)

    def as_query_engine(self, llm: Any = None, streaming: bool = False, **kwargs: Any) -> QLLMQueryEngine:
        """A query engine over the memory; `max_new_tokens`, `temperature`, `top_p`, `stop` and `seed` are
        passed to the engine, `llm` and other kwargs are not used (the index's engine answers)."""
        settings = {k: kwargs[k] for k in _GENERATION_KEYS if k in kwargs}
        return QLLMQueryEngine(index=self, streaming=streaming, generation=settings,
                               callback_manager=self._callback_manager)


class QLLMRetriever(BaseRetriever):
    """The nodes a QLLMIndex's memory looks up for a question (the question turn only, no answer)."""

    def __init__(self, index: QLLMIndex, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._index = index

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        answer = self._index.memory.ask(query_bundle.query_str, max_new_tokens=1)
        return self._index.source_nodes(answer.blocks)


class QLLMQueryEngine(CustomQueryEngine):
    """Answers each query from a QLLMIndex's memory, the query passed as the question; `source_nodes` are
    the looked-up nodes (when streaming, filled once the stream is exhausted)."""

    index: QLLMIndex
    streaming: bool = False
    generation: dict[str, Any] = Field(default_factory=dict)

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        stream = self._stream(query_str)
        if not self.streaming:
            answer = stream.result()
            return Response(answer.text, source_nodes=self.index.source_nodes(answer.blocks))
        sources: list[NodeWithScore] = []

        def gen() -> TokenGen:
            yield from _deltas(stream)
            sources.extend(self.index.source_nodes(stream.answer.blocks))

        return StreamingResponse(response_gen=gen(), source_nodes=sources)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        if not self.streaming:
            return await asyncio.to_thread(self.custom_query, query_str)
        stream = await asyncio.to_thread(self._stream, query_str)
        sources: list[NodeWithScore] = []

        async def gen() -> TokenAsyncGen:
            async for delta in _pump(stream):
                yield delta
            sources.extend(self.index.source_nodes(stream.answer.blocks))

        return AsyncStreamingResponse(response_gen=gen(), source_nodes=sources)

    def _stream(self, query_str: str) -> AnswerStream:
        return self.index.memory.stream(query_str, **({"max_new_tokens": DEFAULT_MAX_NEW_TOKENS} | self.generation))


# ---- agent tools ----------------------------------------------------------------------------------
def document_tools(documents: Sequence[Document], engine: QLLMEngine | None = None, return_direct: bool = False,
                   **query_kwargs: Any) -> list[QueryEngineTool]:
    """One QueryEngineTool per document, each over its own QLLMIndex (read on its first query).

    A tool is named after the document's `title` or `file_name` metadata (else its id) and described by
    its `description` metadata, if any. `return_direct`: the agent returns the tool's answer as is;
    `query_kwargs` go to `as_query_engine`.
    """
    tools, seen = [], set()
    for doc in documents:
        title = str(doc.metadata.get("title") or doc.metadata.get("file_name") or doc.doc_id)
        description = doc.metadata.get("description") or f"Answers questions about the document '{title}'."
        query_engine = QLLMIndex.from_documents([doc], engine=engine).as_query_engine(**query_kwargs)
        name = _tool_name(title, seen)
        tools.append(QueryEngineTool.from_defaults(query_engine, name, description, return_direct))
    return tools


def _tool_name(title: str, seen: set[str]) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]+", "_", title).strip("_").lower()[:48] or "document"
    name, n = base, 1
    while name in seen:
        n += 1
        name = f"{base}_{n}"
    seen.add(name)
    return name
