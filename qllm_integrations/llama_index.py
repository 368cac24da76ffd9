"""LlamaIndex adapters: an LLM whose question-answering calls pass the question separately, and an index
that reads its documents into block memory once (`qllm_integrations.llama_index_memory`, exported here).

    from llama_index.core import SummaryIndex
    from qllm_integrations.llama_index import QLLM, QLLMIndex

    index = QLLMIndex.from_documents(documents)            # read into memory on the first query
    response = index.as_query_engine().query("What is the pass key?")
    response.source_nodes                                    # nodes of the passages the engine looked up

    SummaryIndex.from_documents(documents).as_query_engine(llm=QLLM())   # stock engine: one call

`QLLM` advertises the engine's memory capacity as its context window, so a stock `compact` synthesizer
packs every node into one QA prompt; `QLLM.predict` then passes that prompt's `context_str` and
`query_str` to `engine.ask(context, question)` instead of one formatted string. Other prompts go through
`chat` (the last user turn steers the lookups). Tool calls, and structured output through them
(`structured_predict`, `as_structured_llm`), use the logic shared with LangChain (`chat`, `structured`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from typing import Any, TypeVar

from qllm_runtime import Answer, QLLMConfig, QLLMEngine

from .chat import ChatCall, pump
from .engines import shared_engine
from .llama_index_memory import (
    DEFAULT_MAX_NEW_TOKENS,
    GENERATION_KEYS,
    QLLMIndex,
    QLLMQueryEngine,
    QLLMRetriever,
    document_tools,
)
from .structured import forced_call
from .tools import ParsedToolCall, parse_tool_calls, select_tools

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
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import ToolSelection
    from llama_index.core.prompts import BasePromptTemplate
    from llama_index.core.types import TokenAsyncGen, TokenGen
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "qllm_integrations.llama_index needs llama-index-core: pip install 'quickllama[llama-index]'"
    ) from e

__all__ = ["QLLM", "QLLMIndex", "QLLMQueryEngine", "QLLMRetriever", "document_tools"]

_ROLES = {"developer": "system", "chatbot": "assistant", "model": "assistant", "function": "tool"}

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
        tools, forced = select_tools(kwargs.get("tools"), kwargs.get("tool_choice"))
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
        return fields | {k: kwargs[k] for k in GENERATION_KEYS if k in kwargs}

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


def _reply(text: str, delta: str, calls: Sequence[ParsedToolCall] = (), answer: Answer | None = None
           ) -> ChatResponse:
    """An assistant reply; tool calls become ToolCallBlocks after the text."""
    if not calls:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=answer)
    blocks: list[Any] = [TextBlock(text=text)] if text else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks), delta=delta, raw=answer)


def _last(items: Iterator[T]) -> T:
    """The last item, running the generator to its end."""
    for item in items:
        last = item
    return last


async def _alast(items: AsyncIterator[T]) -> T:
    async for item in items:
        last = item
    return last
