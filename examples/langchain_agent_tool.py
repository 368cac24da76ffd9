"""A LangChain agent with a tool that asks questions about a long document read once into memory.

The tool's question steers the block lookup of QuickLLaMA's engine; the agent model is ChatQLLM too.
Sized for the embedded 135M model, which neither calls tools unprompted nor writes good tool
arguments: a middleware makes the first step call the tool and the next one answer, and the tool
takes the user's question from the agent state. With a stronger model, drop the middleware and give
the tool a `question: str` parameter.

Run: python examples/langchain_agent_tool.py   (needs `pip install langchain`; embedded model, CPU is fine)
"""

from __future__ import annotations

import itertools

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain.tools import ToolRuntime
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool

from qllm_integrations import ChatQLLM


def station_log(n_entries: int) -> str:
    """A monotonous station log with one memorable entry."""
    weather = itertools.cycle(["calm", "windy", "rainy", "foggy", "clear"])
    entries = [f"Day {day}: The weather was {next(weather)}. The crew tested the radio." for day in
               range(1, n_entries + 1)]
    entries.insert(n_entries // 3, "The secret launch code of the red rocket is 58291.")
    return "\n".join(entries)


@wrap_model_call
def one_tool_call(request: ModelRequest, handler) -> ModelResponse:
    """Call a tool first, then answer from its result."""
    answered = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request.override(tool_choice="none" if answered else "any"))


def main() -> None:
    chat = ChatQLLM(max_tokens=48)
    memory = chat.load_engine().read(station_log(300))
    print(f"read the station log: {memory.n_tokens} tokens")

    @tool
    def ask_station_log(runtime: ToolRuntime) -> str:
        """Answer the user's question from the station log (launch codes, weather, crew work)."""
        question = next(m.text for m in reversed(runtime.state["messages"]) if isinstance(m, HumanMessage))
        return memory.ask(question, max_new_tokens=32).text

    agent = create_agent(chat, [ask_station_log], middleware=[one_tool_call],
                         system_prompt="You answer questions about the space station.")
    result = agent.invoke({"messages": [HumanMessage("What is the secret launch code of the red rocket?")]})
    for message in result["messages"]:
        print(f"{type(message).__name__}: {message.text or message.tool_calls}")


if __name__ == "__main__":
    main()
