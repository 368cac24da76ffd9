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

import re
import threading
from bisect import bisect_right
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from operator import itemgetter
from typing import Any, TypeVar

from qllm_runtime import Answer, BlockSpan, Memory, QLLMConfig, QLLMEngine

from .chat import ChatCall, pump
from .engines import shared_engine
from .structured import forced_call
from .tools import ParsedToolCall, parse_tool_calls

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


T = TypeVar("T")


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
    device: str | None = Field(default=None, description="where to load the model; None = CUDA if available")
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
            self._engine = shared_engine(self.model_name, self.config, self.device)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.engine.context_capacity,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.engine.model_name,
        )

    # ---- question answering: context and question reach the engine separately -------------------
    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return super().predict(prompt, **prompt_args)
        return self._parse_output("".join(self._ask(*qa)))

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return super().stream(prompt, **prompt_args)
        return self._ask(*qa)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return await super().apredict(prompt, **prompt_args)
        return self._parse_output("".join([delta async for delta in pump(self._ask(*qa))]))

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        qa = _qa_inputs(prompt, prompt_args)
        if qa is None:
            return await super().astream(prompt, **prompt_args)
        return pump(self._ask(*qa))

    def _ask(self, context: str, question: str) -> TokenGen:
        with closing(self.engine.stream(context, question, **self._generation({}))) as stream:
            yield from stream

    # ---- chat and completion: every call is a generator of responses run by the four methods ----
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _last(self._replies(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._replies(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await _alast(pump(self._replies(messages, kwargs)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return pump(self._replies(messages, kwargs))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _last(self._completions(prompt, kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completions(prompt, kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await _alast(pump(self._completions(prompt, kwargs)))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return pump(self._completions(prompt, kwargs))

    def _completions(self, prompt: str, kwargs: dict) -> CompletionResponseGen:
        """The prompt as one user turn (after the system prompt, if any): it is also the question."""
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        if self.system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        for reply in self._replies(messages, kwargs):
            yield CompletionResponse(text=reply.message.content or "", delta=reply.delta, raw=reply.raw)

    def _replies(self, messages: Sequence[ChatMessage], kwargs: dict) -> ChatResponseGen:
        """Text deltas, then the whole reply (with tool calls, raw = the engine's Answer). The last user turn
        is the question; a forced tool call (`tool_choice` a name or "required") comes as one reply."""
        turns = [_to_dict(m) for m in messages]
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        i = users[-1] if users else len(turns) - 1
        tools, forced = _tools(kwargs)
        call = ChatCall(self.engine, turns[i]["content"] if turns else "", turns[:i], turns[i + 1 :], tools,
                        generation=self._generation(kwargs))
        if forced:
            found, answers = forced_call(call)
            yield _reply("", "", [found] if found else [], answers[-1])
            return
        text = ""
        with closing(call.stream()) as stream:
            for delta in stream:
                text += delta
                yield _reply(text, delta)
        content, calls = parse_tool_calls(text, {t["function"]["name"] for t in tools}) if tools else (text, [])
        yield _reply(content, "", calls, stream.answer)

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


def _tools(kwargs: dict) -> tuple[list[dict], bool]:
    """The tools the model may call, and whether it must call one: `tool_choice` a tool name (or OpenAI's
    {"function": {"name": ...}}) or anything but "auto"/"none", e.g. "required"."""
    tools, choice = kwargs.get("tools") or [], kwargs.get("tool_choice")
    if isinstance(choice, dict):
        choice = choice.get("function", {}).get("name")
    if not tools or choice in (None, "auto", "none"):
        return ([] if choice == "none" else tools), False
    return [t for t in tools if t["function"]["name"] == choice] or tools, True


def _reply(text: str, delta: str, calls: Sequence[ParsedToolCall] = (), answer: Answer | None = None
           ) -> ChatResponse:
    """An assistant reply; tool calls become ToolCallBlocks after the text."""
    if not calls:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=answer)
    blocks: list[Any] = [TextBlock(text=text)] if text else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks), delta=delta, raw=answer)


def _last(items: Iterator[T]) -> T:
    for item in items:  # noqa: B007 - the loop runs the generator to its end
        pass
    return item


async def _alast(items: AsyncIterator[T]) -> T:
    async for item in items:  # noqa: B007
        pass
    return item


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
            self._engine = shared_engine()
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
        sources: list[NodeWithScore] = []
        deltas = self._deltas(query_str, sources)
        if self.streaming:
            return StreamingResponse(response_gen=deltas, source_nodes=sources)
        return Response("".join(deltas), source_nodes=sources)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        sources: list[NodeWithScore] = []
        deltas = pump(self._deltas(query_str, sources))
        if self.streaming:
            return AsyncStreamingResponse(response_gen=deltas, source_nodes=sources)
        return Response("".join([d async for d in deltas]), source_nodes=sources)

    def _deltas(self, query_str: str, sources: list[NodeWithScore]) -> TokenGen:
        """The answer's text pieces; once it is complete, the looked-up nodes are added to `sources`."""
        generation = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS} | self.generation
        with closing(self.index.memory.stream(query_str, **generation)) as stream:
            yield from stream
        sources.extend(self.index.source_nodes(stream.answer.blocks))


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
