"""LangChain chat model over QLLMEngine: the question picks which memory blocks each layer looks up."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr

from qllm_runtime import Answer, InvalidInputError, Memory, QLLMConfig, QLLMEngine

from .chat import ChatCall, pump
from .engines import DEFAULT_MODEL_NAME, shared_engine, with_config
from .structured import describe, forced_call, json_answer, violations
from .tools import ParsedToolCall, check_tools, parse_tool_calls, select_tools

__all__ = ["ChatQLLM", "QLLMChatModel"]

_TEXT_ONLY = ("image", "audio", "video", "file")


class ChatQLLM(BaseChatModel):
    """A local Hugging Face model with Q-LLM block memory, as a LangChain chat model.

    The model reads long context into per-layer memory blocks; the question decides which blocks
    each layer attends to. How a call's messages are split:

    * **question**: the text of the last `HumanMessage` (its `text` blocks);
    * **context** (read into memory): everything before it — system messages, earlier turns, tool
      results — plus any document blocks (`{"type": "text-plain", "text": ...}`) of that last
      `HumanMessage`. Messages after it (the agent loop's tool calls and results) follow the question.

    A document read once (`memory = chat.load_engine().read(text)`) can be reused: pass `memory=`
    at construction or bind it per call (`chat.bind(memory=memory)`), or a saved one by its path
    (`ChatQLLM(memory="doc.qmem")`, from `memory.save` or `quickllama read`); each call then encodes only
    its question and answer. With a memory, the call's other messages and document blocks are folded
    into the question turn (as "Assistant: ..." and "Tool result of name(...): ..." lines); the bare
    question still drives the lookups.

    Tools: templates that render `tools` (Qwen, Hermes, Llama-3.1) get them natively; for the others
    the tools are described in the system prompt. Calls are parsed from Hermes `<tool_call>`, Llama-3.1
    and plain JSON. On templates without tools (the embedded model), a forced call (`tool_choice`
    "any" or a name) and structured output with a flat schema are filled in one short answer per
    argument, so even a 135M model returns well-formed calls and objects. Forced calls and structured
    output are checked against their JSON schema and asked once more on a violation.

    Construction is instant and offline: the model (`model`: a local directory, hub id or `.gguf`
    file; default: the embedded SmolLM2-135M-Instruct) loads on first use, once per process and shared
    with the LlamaIndex adapter. Or pass an `engine`. `response_metadata["passages"]` lists the looked-up
    context spans; `usage_metadata` reports memory hits as `input_token_details["cache_read"]`.

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from qllm_integrations import ChatQLLM

        chat = ChatQLLM(max_tokens=64)
        doc = {"type": "text-plain", "text": long_text, "mime_type": "text/plain"}
        chat.invoke([HumanMessage([doc, {"type": "text", "text": "Who wrote the letter?"}])])
        ```
    """

    model_config = ConfigDict(populate_by_name=True)

    model_name: str | None = Field(default=None, alias="model")
    """What to load (local directory, hub id or `.gguf` file; None: the embedded default); with
    `engine` or `memory` only the name reported in metadata."""
    engine: QLLMEngine | None = Field(default=None, exclude=True)
    """Use this engine instead of loading a model."""
    config: QLLMConfig | None = None
    """Engine settings (windows, block size, top-k, mode); None: the engine's own."""
    memory: Memory | str | Path | None = Field(default=None, exclude=True)
    """A document read once with `engine.read(...)`, or the path of one saved with `memory.save(path)` /
    `quickllama read` (loaded on first use, checked against this model and config), used by every call."""
    device: str | None = None
    """Where to load the model (default: CUDA if available, else CPU)."""
    max_tokens: int = 256
    """Maximum number of generated tokens."""
    temperature: float = 0.0
    """0 is greedy decoding."""
    stop: list[str] | None = None
    """Strings that end the answer (not included in it)."""
    streaming: bool = False
    """Whether `invoke` streams internally (token callbacks)."""

    _engine: QLLMEngine | None = PrivateAttr(default=None)
    _saved: dict[str, Memory] = PrivateAttr(default_factory=dict)  # saved memories loaded, by path

    @property
    def _llm_type(self) -> str:
        return "qllm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self._label(), "config": self.config, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stop": self.stop}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="qllm", ls_model_name=kwargs.get("model") or self._label(), ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _label(self) -> str:
        engine = self.engine or (self.memory.engine if isinstance(self.memory, Memory) else None)
        return self.model_name or (engine.model_name if engine is not None else DEFAULT_MODEL_NAME)

    def load_engine(self) -> QLLMEngine:
        """The engine, loading the model on first use (e.g. to `read` a document once)."""
        if self._engine is None:
            base = self.engine or (self.memory.engine if isinstance(self.memory, Memory) else None)
            self._engine = (with_config(base, self.config) if base is not None
                            else shared_engine(self.model_name, self.config, self.device))
        return self._engine

    def _load_memory(self, memory: Memory | str | os.PathLike | None) -> Memory | None:
        """`memory`, or the memory saved in that file, loaded once by this chat model's engine."""
        if memory is None or isinstance(memory, Memory):
            return memory
        key = os.fspath(memory)
        if key not in self._saved:
            self._saved[key] = self.load_engine().load_memory(key)
        return self._saved[key]

    # ---- generation ----------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        tools, forced = select_tools(kwargs.pop("tools", None), kwargs.pop("tool_choice", None))
        response_format = kwargs.pop("response_format", None)
        call = self._call(messages, tools, stop, **kwargs)
        if forced:
            found, answers = forced_call(call)
            yield self._last_chunk(answers, "", [found] if found else [])
            return
        if response_format:
            schema = response_format.get("json_schema", {}).get("schema") or response_format.get("schema")
            text, answers = json_answer(call, schema, show_schema=response_format["type"] == "json_schema")
            yield self._last_chunk(answers, text, [])
            return
        text = ""
        with closing(call.stream()) as stream:
            for delta in stream:
                text += delta
                if tools:  # a tool call is only known once the answer is complete
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        calls: list[ParsedToolCall] = []
        if tools:
            text, calls = parse_tool_calls(text, {t["function"]["name"] for t in tools})
        assert stream.answer is not None  # the loop ran to the end
        yield self._last_chunk([stream.answer], text if tools else "", calls)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in pump(self._stream(messages, stop, None, **kwargs)):
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _call(self, messages: list[BaseMessage], tools: list[dict], stop: list[str] | None,
              **kwargs: Any) -> ChatCall:
        """The messages split around the question, with this call's tools, memory and generation settings."""
        before, question, after = _split(messages)
        memory = self._load_memory(kwargs.get("memory", self.memory))
        generation = {"max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
                      "temperature": kwargs.get("temperature", self.temperature),
                      "stop": stop if stop is not None else self.stop}
        engine = memory.engine if memory is not None else self.load_engine()
        return ChatCall(engine, question, before, after, tools, memory, generation)

    def _last_chunk(self, answers: list[Answer], text: str,
                    calls: list[ParsedToolCall]) -> ChatGenerationChunk:
        """The closing chunk: remaining text, tool calls, usage (summed over answers) and metadata."""
        usage = [a.usage for a in answers]
        message = AIMessageChunk(
            content=text,
            tool_call_chunks=[tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False),
                                              id=c.id, index=i) for i, c in enumerate(calls)],
            usage_metadata={
                "input_tokens": sum(u.input_tokens for u in usage),
                "output_tokens": sum(u.generated_tokens for u in usage),
                "total_tokens": sum(u.total_tokens for u in usage),
                "input_token_details": {"cache_read": sum(u.cached_tokens for u in usage)},
            },
            response_metadata={
                "model_name": self._label(),
                "finish_reason": "tool_calls" if calls else answers[-1].finish_reason,
                "passages": [{"start": b.start, "end": b.end, "text": b.text, "hits": b.hits}
                             for a in answers[:1] for b in a.blocks],
                "full_attention": any(a.full_attention for a in answers[:1]),  # fit the model's window: no passages
            },
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message)

    # ---- tools and structured output ----------------------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: str | bool | dict | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any form `convert_to_openai_tool` takes). `tool_choice`: "auto", "none",
        "any"/"required"/True (some tool), a tool name, or {"type": "function", "function": {"name"}}."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        check_tools(formatted)
        names = [t["function"]["name"] for t in formatted]
        if isinstance(tool_choice, dict):
            tool_choice = tool_choice.get("function", {}).get("name")
        if tool_choice is True or tool_choice == "required":
            tool_choice = "any"
        if tool_choice not in (None, False, "auto", "none", "any", *names):
            raise ValueError(f"tool_choice {tool_choice!r} is not auto, none, any or a tool name: {names}")
        return self.bind(tools=formatted, tool_choice=tool_choice or None, **kwargs)

    def with_structured_output(
        self, schema: dict | type, *, include_raw: bool = False,
        method: Literal["function_calling", "json_mode", "json_schema"] = "json_schema",
        strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers parsed into `schema` (pydantic class, TypedDict or JSON schema).

        `json_schema` (default) and `json_mode` prompt for a JSON object; `function_calling` forces a call
        of a tool made from the schema. `strict` is accepted: answers are always validated, pydantic
        classes by pydantic, other schemas as JSON schemas; a violation raises OutputParserException.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        json_schema = convert_to_json_schema(schema)
        trace = {"ls_structured_output_format": {"kwargs": {"method": method, "strict": strict},
                                                 "schema": schema}}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, **trace)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_mode", "json_schema"):
            response_format: dict[str, Any] = {"type": "json_schema", "json_schema": {"schema": json_schema}}
            if method == "json_mode":  # the schema is not shown; a model that cannot write JSON fills it
                response_format = {"type": "json_object", "schema": json_schema}
            llm = self.bind(response_format=response_format, **trace)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be function_calling, json_mode or json_schema, got {method!r}")
        if not is_pydantic:
            parser = parser | RunnableLambda(lambda value: _checked(value, json_schema))
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


QLLMChatModel = ChatQLLM


def _checked(value: Any, schema: dict) -> Any:
    """`value` if it matches the JSON `schema`, else OutputParserException naming the fields."""
    found = violations(value, schema)
    if found:
        raise OutputParserException(f"the answer does not match the schema: {describe(found)}",
                                    llm_output=json.dumps(value, ensure_ascii=False))
    return value


def _split(messages: list[BaseMessage]) -> tuple[list[dict], str, list[dict]]:
    """(template messages before the question turn, with its document blocks as user turns; the question;
    the messages after it)."""
    if not messages:
        raise InvalidInputError("ChatQLLM got no messages: pass at least one message with the question")
    humans = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    last = humans[-1] if humans else len(messages) - 1
    blocks = _blocks(messages[last])
    question = "\n".join(b["text"] for b in blocks if b["type"] == "text")
    documents = [{"role": "user", "content": _document(b)} for b in blocks if b["type"] == "text-plain"]
    return ([*map(_to_dict, messages[:last]), *documents], question, [*map(_to_dict, messages[last + 1 :])])


def _blocks(message: BaseMessage) -> list[dict]:
    blocks = [dict(b) for b in message.content_blocks]
    for b in blocks:
        if b["type"] in _TEXT_ONLY or (b["type"] == "text-plain" and "text" not in b):
            raise InvalidInputError(f"ChatQLLM reads text only, got a {b['type']!r} block with no text")
    return [b for b in blocks if b["type"] in ("text", "text-plain")]


def _document(block: dict) -> str:
    return f"{block['title']}\n\n{block['text']}" if block.get("title") else block["text"]


def _to_dict(message: BaseMessage) -> dict:
    content = "\n\n".join(b["text"] if b["type"] == "text" else _document(b) for b in _blocks(message))
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": content}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": content}
    if isinstance(message, AIMessage):
        out: dict[str, Any] = {"role": "assistant", "content": content}
        if message.tool_calls:
            out["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["args"]}}
                                 for c in message.tool_calls]
        return out
    if isinstance(message, ToolMessage):
        return {"role": "tool", "content": content, "tool_call_id": message.tool_call_id,
                "name": message.name}
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": content}
    raise InvalidInputError(f"unsupported message type {type(message).__name__}")
