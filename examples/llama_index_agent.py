"""Agents with one query-engine tool per document (each document its own QLLMIndex, read on first use).

A `FunctionAgent` needs a function-calling LLM: `QLLM` is one (tool schemas go to the chat template, or
to the system prompt when the template ignores them, and calls are parsed from the reply). A
`ReActAgent` works with any LLM. The embedded 135M model is too small to pick among tools or to call
one unprompted, so here each agent gets one tool: the FunctionAgent's first step names it
(`initial_tool_choice`; a forced call on a template without tools is filled one argument at a time) and
returns its answer directly, the ReActAgent gets a one-shot example of the ReAct format. Larger instruct
models with tool-aware templates (Qwen2.5, Llama-3.1) take the whole list and need none of this. For
answers from documents beyond the model's window, see llama_index_query_engine.py.

Run: python examples/llama_index_agent.py   (embedded SmolLM2-135M-Instruct, CPU is fine)
"""

from __future__ import annotations

import asyncio

from llama_index.core import Document
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage

from qllm_integrations.llama_index import QLLM, document_tools
from qllm_runtime import QLLMConfig, QLLMEngine

DOCUMENTS = [
    Document(text="The orchard at Millbrook grows apples and pears. The head gardener of the orchard is named "
             "Tobias Fenwick. He has worked there for twelve years.", metadata={"title": "Millbrook orchard"}),
    Document(text="The harbour of Kelby has a red lighthouse. The keeper of the Kelby lighthouse is named "
             "Mara Quill.", metadata={"title": "Kelby harbour"}),
]
QUESTION = "Who is the head gardener of the Millbrook orchard?"
EXAMPLE = "When was the Millbrook orchard founded?"


def react_example(tool: str) -> list[ChatMessage]:
    """An earlier exchange in the ReAct format, calling `tool`."""
    return [
        ChatMessage(role="user", content=EXAMPLE),
        ChatMessage(role="assistant", content="Thought: I need to use a tool to help me answer the question.\n"
                    f'Action: {tool}\nAction Input: {{"input": "{EXAMPLE}"}}'),
        ChatMessage(role="user", content="Observation: The orchard was founded in 1887."),
        ChatMessage(role="assistant", content="Thought: I can answer without using any more tools.\n"
                    "Answer: The orchard was founded in 1887."),
    ]


async def run(agent: FunctionAgent | ReActAgent, question: str, history: list[ChatMessage]) -> None:
    handler = agent.run(question, chat_history=history)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"  tool {event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}")
    print(f"Q: {question}\nA: {await handler}\n")


def main() -> None:
    engine = QLLMEngine.default(QLLMConfig(n_init=16, n_local=256, block_size=64, topk=4, lookup_chunk=128))
    llm = QLLM(engine=engine, max_new_tokens=64)
    orchard, harbour = document_tools(DOCUMENTS, engine=engine, max_new_tokens=24)
    print(f"tools: {orchard.metadata.name}, {harbour.metadata.name}\n")

    print("FunctionAgent (returns the tool's answer):")
    orchard_direct, _ = document_tools(DOCUMENTS, engine=engine, return_direct=True, max_new_tokens=24)
    agent = FunctionAgent(tools=[orchard_direct], llm=llm, initial_tool_choice=orchard.metadata.name)
    asyncio.run(run(agent, QUESTION, []))

    print("ReActAgent (reads the tool's answer and replies):")
    asyncio.run(run(ReActAgent(tools=[orchard], llm=llm), QUESTION, react_example(orchard.metadata.name)))


if __name__ == "__main__":
    main()
