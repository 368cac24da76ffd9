"""Agents that call one query-engine tool per long document (each a QLLMIndex, read on first use).

A `FunctionAgent` needs a function-calling LLM: `QLLM` is one (tool schemas go to the chat template, or
to the system prompt when the template ignores them, and calls are parsed from the reply). A
`ReActAgent` works with any LLM. The embedded 135M model does not call tools by itself: here each agent
gets a one-shot example of a call in its chat history, and the FunctionAgent's first step names the tool
(`initial_tool_choice`). Larger instruct models with tool-aware templates (Qwen2.5, Llama-3.1) need neither.

Run: python examples/llama_index_agent.py   (embedded SmolLM2-135M-Instruct, CPU is fine)
"""

from __future__ import annotations

import asyncio
import random

from llama_index.core import Document
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock

from qllm_integrations.llama_index import QLLM, document_tools
from qllm_runtime import QLLMConfig, QLLMEngine

EXAMPLE = "When was the orchard founded?"


def chronicle(fact: str, n_paragraphs: int, seed: int) -> str:
    """Seeded paragraphs of everyday sentences with one fact near the start."""
    rng = random.Random(seed)
    who = ["The baker", "A gardener", "The old sailor", "My neighbour", "The teacher", "The mayor"]
    did = ["walked to", "looked at", "talked about", "painted", "visited", "cleaned", "repaired"]
    what = ["the quiet harbour", "a red bicycle", "the village market", "an old bridge", "a wooden boat",
            "the town hall", "a small garden", "the stone chapel"]
    when = ["in the morning", "after lunch", "before the rain started", "on a sunny day", "without a word"]
    paragraphs = [" ".join(f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(when)}."
                           for _ in range(8)) for _ in range(n_paragraphs)]
    return "\n\n".join([*paragraphs[:2], fact, *paragraphs[2:]])


async def run(agent: FunctionAgent | ReActAgent, question: str, history: list[ChatMessage]) -> None:
    handler = agent.run(question, chat_history=history)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"  tool {event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}")
    print(f"Q: {question}\nA: {await handler}\n")


def main() -> None:
    documents = [
        Document(text=chronicle("The head gardener of the orchard is named Tobias Fenwick.", 30, seed=1),
                 metadata={"title": "Millbrook orchard", "description": "The chronicle of the Millbrook orchard."}),
        Document(text=chronicle("The keeper of the Kelby lighthouse is named Mara Quill.", 30, seed=2),
                 metadata={"title": "Kelby harbour", "description": "The chronicle of the Kelby harbour."}),
    ]
    engine = QLLMEngine.default(QLLMConfig(n_init=16, n_local=256, block_size=64, topk=4, lookup_chunk=128))
    llm = QLLM(engine=engine, max_new_tokens=64)
    print("tools:", ", ".join(f"{engine.count_tokens(d.text)} tokens" for d in documents), "\n")

    print("FunctionAgent (the tool's answer is returned directly):")
    tools = document_tools(documents, engine=engine, return_direct=True, max_new_tokens=24)
    one_shot = [
        ChatMessage(role="user", content=EXAMPLE),
        ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="call_0", tool_name="millbrook_orchard",
                                                            tool_kwargs={"input": EXAMPLE})]),
        ChatMessage(role="tool", content="The orchard was founded in 1887.",
                    additional_kwargs={"tool_call_id": "call_0"}),
    ]
    agent = FunctionAgent(tools=tools, llm=llm, initial_tool_choice="millbrook_orchard")
    asyncio.run(run(agent, "Who is the head gardener of the Millbrook orchard?", one_shot))

    print("ReActAgent (the model reads the tool's answer and replies):")
    tools = document_tools(documents, engine=engine, max_new_tokens=24)
    one_shot = [
        ChatMessage(role="user", content=EXAMPLE),
        ChatMessage(role="assistant", content="Thought: I need to use a tool to help me answer the question.\n"
                    f'Action: millbrook_orchard\nAction Input: {{"input": "{EXAMPLE}"}}'),
        ChatMessage(role="user", content="Observation: The orchard was founded in 1887."),
        ChatMessage(role="assistant", content="Thought: I can answer without using any more tools.\n"
                    "Answer: The orchard was founded in 1887."),
    ]
    asyncio.run(run(ReActAgent(tools=tools, llm=llm), "Who is the keeper of the Kelby lighthouse?", one_shot))


if __name__ == "__main__":
    main()
