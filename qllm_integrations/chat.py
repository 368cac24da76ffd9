"""One chat call as the engine takes it, shared by the LangChain and LlamaIndex adapters.

Each adapter turns its messages into template dicts (OpenAI/transformers shape) split around the question
turn; `ChatCall.stream` adds the tools (to the template, or described in the system prompt if it ignores
them) and any format instructions after the question, and passes the bare question to the engine, which
alone drives the block lookups. `pump` runs a sync generator in a worker thread for the async methods.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from qllm_runtime import Answer, AnswerStream, InvalidInputError, Memory, QLLMEngine

from .tools import template_renders_tools, tool_messages_for_template, tools_system_prompt

__all__ = ["ChatCall", "pump", "with_system"]

T = TypeVar("T")


@dataclass(frozen=True)
class ChatCall:
    """One call: `before` and `after` are the template messages around the question turn, `question` its
    bare text, `tools` OpenAI function schemas the model may call, `generation` the engine's generation
    keywords. With a `memory` (a document read once) the other messages are folded, as lines, into the
    question turn."""

    engine: QLLMEngine
    question: str
    before: list[dict] = field(default_factory=list)
    after: list[dict] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    memory: Memory | None = None
    generation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise InvalidInputError("the last user message has no text: nothing to use as the question")

    @functools.cached_property
    def template_tools(self) -> bool:
        """Whether the chat template renders tool schemas (a proxy for a model trained to call tools)."""
        return template_renders_tools(self.engine.tokenizer)

    def stream(self, instructions: Sequence[str] = (), **generation: Any) -> AnswerStream:
        """Start one answer; `instructions` follow the question in its turn, `generation` overrides."""
        generation = self.generation | generation
        native = self.template_tools
        tools = self.tools if native and self.tools else None
        described = tools_system_prompt(self.tools) if self.tools and not native else ""
        turn = "\n\n".join([self.question, *instructions])
        if self.memory is not None:
            folded = [_fold(m) for m in tool_messages_for_template([*self.before, *self.after], False)]
            lines = "\n\n".join(p for p in [described, *folded, turn] if p)
            return self.memory.stream(lines, question=self.question, tools=tools, **generation)
        turns = tool_messages_for_template([*self.before, {"role": "user", "content": turn}, *self.after], native)
        if described:
            turns = with_system(turns, described)
        return self.engine.stream_chat(turns, question=self.question, tools=tools, **generation)

    def ask(self, instruction: str) -> Answer:
        """One short answer (a line) to `instruction`, without tools."""
        return replace(self, tools=[]).stream([instruction], stop=["\n"]).result()


def with_system(messages: list[dict], text: str) -> list[dict]:
    """`text` added to the leading system message (or as a new one)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _fold(message: dict) -> str:
    """A template message as a line of the question turn (memory calls)."""
    return f"Assistant: {message['content']}" if message["role"] == "assistant" else message["content"]


async def pump(items: Iterator[T]) -> AsyncIterator[T]:
    """Yield `items` on the event loop while one worker thread runs it from start to close (the engine's
    model lock belongs to the thread that started a call). When the consumer stops early, the worker
    stops after the item in progress and closes `items`, which ends the engine call."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        error: Exception | None = None
        try:
            for item in items:
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, (False, item))
        except Exception as e:
            error = e
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            loop.call_soon_threadsafe(queue.put_nowait, (True, error))

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        while not (item := await queue.get())[0]:
            yield item[1]
        if item[1] is not None:
            raise item[1]
    finally:
        stop.set()
        await worker
