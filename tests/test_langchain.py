"""ChatQLLM beyond the standard suites: the question/context split, memory reuse, concurrency, tool
parsing, structured output checked against its schema, an LCEL chain over a document longer than the
model's window, and an agent tool over a document; and the logic both adapters share."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import threading
import time
from contextlib import aclosing

import pytest

pytest.importorskip("langchain_core")

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool

import qllm_integrations
import qllm_integrations.chat as chat_logic
import qllm_integrations.langchain as lc_adapter
import qllm_integrations.structured as structured_logic
import qllm_integrations.tools as tool_logic
from benchmarks.data import CLASSIC_FILLER
from qllm_integrations import ChatQLLM, QLLMChatModel
from qllm_integrations.chat import ChatCall, pump
from qllm_integrations.structured import json_answer, violations
from qllm_integrations.tools import (
    ParsedToolCall,
    parse_tool_calls,
    template_renders_tools,
    tool_messages_for_template,
    tools_system_prompt,
)
from qllm_runtime import Memory, QLLMEngine

FACT = "The secret launch code of the red rocket is 58291."
QUESTION = "What is the secret launch code of the red rocket?"


PET = {"title": "pet", "type": "object", "required": ["name", "age", "kind"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "kind": {"enum": ["cat", "dog"]}}}
NO_AGE_FITS = {"title": "pet", "type": "object", "required": ["age"],  # no integer is > 5 and < 6
               "properties": {"age": {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 6}}}


class RecordingEngine(QLLMEngine):
    """The test engine over the same model (or another tokenizer), recording each chat call's messages."""

    def __init__(self, engine: QLLMEngine, tokenizer=None) -> None:
        super().__init__(engine.model, tokenizer or engine.tokenizer, engine.config)
        self.calls: list[tuple[list[dict], str | None]] = []

    def stream_chat(self, messages, question=None, **kwargs):
        self.calls.append((list(messages), question))
        return super().stream_chat(messages, question, **kwargs)


class RecordingMemory(Memory):
    """A real read memory that records what each call sends as the turn and as the question."""

    def __init__(self, memory: Memory) -> None:
        super().__init__(memory.engine, memory.session, memory.tokens)
        self.calls: list[tuple[str, str | None]] = []

    def stream(self, turn, *, question=None, **kwargs):
        self.calls.append((turn, question))
        return super().stream(turn, question=question, **kwargs)


def tools_template(tokenizer):
    """A copy of the tokenizer whose ChatML template also renders `tools` (as Qwen's does)."""
    copied = copy.copy(tokenizer)
    header = "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    copied.chat_template = header + tokenizer.chat_template
    return copied


def haystack(n_tokens: int, fact_at: float) -> str:
    """About `n_tokens` tokens of the pass-key filler (the bench's) with FACT at relative position `fact_at`:
    the 135M model copies a number out of block memory from this filler."""
    n = n_tokens // 25  # ~25 tokens a repetition
    return " ".join([CLASSIC_FILLER] * int(n * fact_at) + [FACT] + [CLASSIC_FILLER] * (n - int(n * fact_at)))


@pytest.fixture(scope="module")
def chat(default_engine) -> ChatQLLM:
    return ChatQLLM(engine=default_engine, max_tokens=16)


# ---- public surface, offline --------------------------------------------------------------------------
def test_exports_pinned() -> None:
    assert lc_adapter.__all__ == ["ChatQLLM", "QLLMChatModel"]
    assert tool_logic.__all__ == ["ParsedToolCall", "check_tools", "forced_call_instruction", "parse_tool_calls",
                                  "select_tools", "template_renders_tools", "tool_messages_for_template",
                                  "tools_system_prompt"]
    assert chat_logic.__all__ == ["ChatCall", "pump", "with_system"]
    assert structured_logic.__all__ == ["describe", "forced_call", "json_answer", "violations"]
    assert qllm_integrations.__all__ == [
        "ChatQLLM", "ParsedToolCall", "QLLM", "QLLMChatModel", "QLLMIndex", "QLLMQueryEngine", "QLLMRetriever",
        "document_tools", "parse_tool_calls", "template_renders_tools", "tool_messages_for_template",
        "tools_system_prompt"]
    assert QLLMChatModel is ChatQLLM


def test_runtime_and_package_import_no_framework() -> None:
    code = ("import sys, qllm_runtime, qllm_integrations; "
            "assert not any(m.split('.')[0] in ('langchain', 'langchain_core') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_construction_is_lazy() -> None:
    start = time.perf_counter()
    model = ChatQLLM(model="/nonexistent/model/dir", temperature=0.2, stop=["\n"])
    assert time.perf_counter() - start < 0.5
    assert model._get_ls_params() == {"ls_provider": "qllm", "ls_model_name": "/nonexistent/model/dir",
                                      "ls_model_type": "chat", "ls_temperature": 0.2, "ls_max_tokens": 256,
                                      "ls_stop": ["\n"]}
    with pytest.raises(FileNotFoundError, match="not found"):
        model.invoke("hi")


def test_bind_tools_validates_tool_choice() -> None:
    @tool
    def lookup(term: str) -> str:
        """Look a term up."""
        return term

    bound = ChatQLLM().bind_tools([lookup], tool_choice={"type": "function", "function": {"name": "lookup"}})
    assert bound.kwargs["tool_choice"] == "lookup"
    assert bound.kwargs["tools"][0]["function"]["name"] == "lookup"
    with pytest.raises(ValueError, match="not auto, none, any or a tool name"):
        ChatQLLM().bind_tools([lookup], tool_choice="search")


def test_bind_tools_rejects_malformed_tools_by_name() -> None:
    nameless = {"type": "function", "function": {"parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(ValueError, match="tool #0 has no name"):
        ChatQLLM().bind_tools([nameless])
    for parameters in ("a string", [1, 2], {"type": "array"}, {"type": "object", "properties": ["x"]}):
        tool_schema = {"type": "function", "function": {"name": "lookup", "parameters": parameters}}
        with pytest.raises(ValueError, match="tool 'lookup': 'parameters"):
            ChatQLLM().bind_tools([tool_schema])


def test_no_messages_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="got no messages"):
        ChatQLLM().invoke([])


# ---- tool-call parsing (shared with the LlamaIndex adapter) --------------------------------------------
@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('Sure.<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
         "Sure.", [("weather", {"city": "Oslo"})]),
        ('<tool_call>[{"name": "a", "arguments": {}}, '
         '{"name": "weather", "arguments": "{\\"city\\": \\"X\\"}"}]</tool_call>',
         "", [("a", {}), ("weather", {"city": "X"})]),
        ('<|python_tag|>{"name": "weather", "parameters": {"city": "Oslo"}}', "",
         [("weather", {"city": "Oslo"})]),
        ('Calling {"name": "weather", "arguments": {"city": "Oslo"}} now', "Calling  now",
         [("weather", {"city": "Oslo"})]),
        ('```json\n{"type": "function", "function": {"name": "a", "arguments": {"x": 1}}}\n```', "",
         [("a", {"x": 1})]),
        ('{"name": "Rex", "age": 3}', '{"name": "Rex", "age": 3}', []),  # plain JSON stays content
        ('<tool_call>{"name": "a", "arguments": {"x"', '<tool_call>{"name": "a", "arguments": {"x"', []),
        ("no call {here", "no call {here", []),
    ],
)
def test_parse_tool_calls(text: str, content: str, calls: list) -> None:
    rest, parsed = parse_tool_calls(text)
    assert rest == content
    assert [(c.name, c.arguments) for c in parsed] == calls
    assert all(c.id.startswith("call_") for c in parsed)


def test_parse_tool_calls_with_known_names() -> None:
    assert parse_tool_calls('{"name": "weather"}', {"weather"})[1][0].arguments == {}
    assert parse_tool_calls('{"name": "other", "arguments": {}}', {"weather"})[1] == []
    call = parse_tool_calls('{"id": "c1", "name": "weather", "arguments": {}}')[1][0]
    assert call == ParsedToolCall("weather", {}, "c1")


def test_tool_messages_for_templates(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
    ]
    assert not template_renders_tools(tokenizer)  # SmolLM2's ChatML template has no tools
    assert tool_messages_for_template(messages, renders_tools=False) == [
        {"role": "user", "content": "1 + 2?"},
        {"role": "user", "content": 'Tool result of add({"a": 1, "b": 2}): 3'},
    ]
    hermes = copy.copy(tokenizer)
    hermes.chat_template = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}{% for m in messages %}"
        "{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}"
        "</tool_call>{% endfor %}\n{% endfor %}"
    )
    assert template_renders_tools(hermes)
    assert tool_messages_for_template(messages, renders_tools=True) == messages
    rendered = hermes.apply_chat_template(messages, tokenize=False)
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in rendered
    assert "tool: 3" in rendered
    assert '"name": "add"' in tools_system_prompt([{"type": "function", "function": {"name": "add"}}])


# ---- logic both adapters share ------------------------------------------------------------------------
def test_violations_name_each_field() -> None:
    assert violations({"name": "Rex", "age": 3, "kind": "dog"}, PET) == {}
    assert violations({"name": "Rex", "age": -1, "kind": "bird"}, PET) == {
        "age": "-1 is less than the minimum of 0", "kind": "'bird' is not one of ['cat', 'dog']"}
    assert violations({"age": "3", "kind": "cat"}, PET) == {
        "name": "'name' is a required property", "age": "'3' is not of type 'integer'"}
    assert violations([], PET) == {"": "[] is not of type 'object'"}


async def test_pump_runs_in_one_worker_thread_and_closes_when_the_consumer_stops() -> None:
    threads: list[int] = []
    closed = threading.Event()

    def numbers():
        try:
            for i in range(1000):
                threads.append(threading.get_ident())
                yield i
                time.sleep(0.001)
        finally:
            threads.append(threading.get_ident())
            closed.set()

    got = []
    async with aclosing(pump(numbers())) as items:
        async for i in items:
            got.append(i)
            if i == 2:
                break
    assert got == [0, 1, 2] and closed.is_set()
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()

    closed.clear()
    consumer = asyncio.create_task(_consume(pump(numbers())))
    await asyncio.sleep(0.05)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert closed.is_set()

    def failing():
        yield 1
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await _consume(pump(failing()))


async def _consume(items) -> list:
    return [item async for item in items]


def test_select_tools_follows_tool_choice() -> None:
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    assert tool_logic.select_tools(tools, None) == tool_logic.select_tools(tools, "auto") == (tools, False)
    assert tool_logic.select_tools(tools, "none") == tool_logic.select_tools(None, "any") == ([], False)
    assert tool_logic.select_tools(tools, "any") == tool_logic.select_tools(tools, "required") == (tools, True)
    assert tool_logic.select_tools(tools, {"type": "function", "function": {"name": "b"}}) == (tools[1:], True)


def test_with_system_merges_into_the_leading_system_message() -> None:
    assert chat_logic.with_system([{"role": "user", "content": "q"}], "t") == [
        {"role": "system", "content": "t"}, {"role": "user", "content": "q"}]
    merged = chat_logic.with_system([{"role": "system", "content": "s"}], "t")
    assert merged == [{"role": "system", "content": "s\n\nt"}]


# ---- the embedded model ------------------------------------------------------------------------------
def test_document_block_is_context_and_question_drives_lookup(chat, tokenizer) -> None:
    document = {"type": "text-plain", "mime_type": "text/plain", "text": haystack(1200, 0.3)}
    message = HumanMessage([document, {"type": "text", "text": QUESTION}])
    result = chat.invoke([message])
    assert "58291" in result.text
    passages = result.response_metadata["passages"]
    assert passages and any("58291" in p["text"] for p in passages)
    assert result.response_metadata["full_attention"] is False
    assert result.usage_metadata["input_tokens"] > 1200
    assert result.response_metadata["finish_reason"] in ("stop", "length")


def test_memory_is_read_once_and_reused(chat, default_engine, tokenizer) -> None:
    memory = default_engine.read(haystack(1200, 0.6))
    reader = chat.bind(memory=memory)
    first = reader.invoke(QUESTION)
    assert "58291" in first.text
    assert first.usage_metadata["input_token_details"]["cache_read"] == memory.n_tokens
    assert first.usage_metadata["input_tokens"] < memory.n_tokens + 40  # only the question was encoded
    again = ChatQLLM(engine=default_engine, memory=memory, max_tokens=16).invoke([HumanMessage(QUESTION)])
    assert again.text == first.text  # asking leaves the memory unchanged


def test_stop_strings_and_real_streaming(chat) -> None:
    prompt = "Describe the sea in one sentence."
    chunks = list(chat.stream(prompt))
    text = "".join(c.text for c in chunks)
    assert len(chunks) > 4 and chunks[-1].chunk_position == "last"
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) > 4
    stop = text.split()[2]
    stopped = chat.invoke(prompt, stop=[stop])
    assert stopped.text == text[: text.index(stop)]
    assert stopped.response_metadata["finish_reason"] == "stop"


async def test_async_calls_queue_without_blocking_the_loop(chat) -> None:
    chat = chat.bind(max_tokens=8)
    prompts = ["Name a color.", "Name a fruit."]
    expected = [chat.invoke(p).text for p in prompts]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    streamed = "".join([c.text async for c in chat.astream(prompts[0])])
    together = await asyncio.gather(*(chat.ainvoke(p) for p in prompts))
    ticker.cancel()
    assert streamed == expected[0]
    assert [m.text for m in together] == expected
    assert ticks > 20  # the event loop kept running while the model generated


def test_tool_calls_round_trip(chat) -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    adder = chat.bind_tools([add], tool_choice="add")
    call = adder.invoke("What is 12 plus 30?")
    assert call.tool_calls and call.tool_calls[0]["name"] == "add"
    assert set(call.tool_calls[0]["args"]) <= {"a", "b"}
    history = [SystemMessage("You add numbers."), HumanMessage("What is 12 plus 30?"), call,
               add.invoke(call.tool_calls[0] | {"args": {"a": 12, "b": 30}})]
    assert isinstance(history[-1], ToolMessage)
    assert isinstance(chat.bind_tools([add]).invoke(history), AIMessage)


def test_structured_output_is_checked_against_a_json_schema(default_engine) -> None:
    engine = RecordingEngine(default_engine)
    chat = ChatQLLM(engine=engine, max_tokens=16)
    pet = chat.with_structured_output(PET).invoke("Rex is a 3 year old dog.")
    assert violations(pet, PET) == {} and pet["age"] == 3 and pet["kind"] == "dog"

    engine.calls.clear()
    with pytest.raises(OutputParserException, match="field 'age'"):
        chat.with_structured_output(NO_AGE_FITS).invoke("Rex is a 3 year old dog.")
    first, retry = (messages[-1]["content"] for messages, _ in engine.calls)  # asked once more, with the error
    assert "invalid" not in first and "Your previous answer was invalid:" in retry
    assert all(question == "Rex is a 3 year old dog." for _, question in engine.calls)
    raw = chat.with_structured_output(NO_AGE_FITS, include_raw=True, method="function_calling").invoke("Rex?")
    assert raw["parsed"] is None and "field 'age'" in str(raw["parsing_error"])


def test_json_answers_are_asked_once_more_with_the_violation(default_engine, tokenizer) -> None:
    engine = RecordingEngine(default_engine, tools_template(tokenizer))  # a model that writes JSON itself
    call = ChatCall(engine, "Rex is a 3 year old dog.", generation={"max_new_tokens": 24})
    _, answers = json_answer(call, NO_AGE_FITS)
    assert call.template_tools and len(answers) == len(engine.calls) == 2
    retry = engine.calls[1][0][-1]["content"]
    assert retry.startswith("Rex is a 3 year old dog.\n\nReply with only a JSON object that matches")
    assert "is invalid: " in retry and engine.calls[1][1] == "Rex is a 3 year old dog."


def test_memory_calls_look_up_with_the_bare_question(default_engine, tokenizer) -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    memory = RecordingMemory(default_engine.read(haystack(1200, 0.6)))
    history = [SystemMessage("Answer from the document."), HumanMessage("Hello."), AIMessage("Hi."),
               HumanMessage(QUESTION)]
    reader = ChatQLLM(engine=default_engine, memory=memory, max_tokens=8)
    reader.invoke(history)
    reader.bind_tools([add]).invoke(history)
    (turn, question), (tool_turn, tool_question) = memory.calls
    assert question == tool_question == QUESTION
    assert turn.startswith("Answer from the document.") and turn.endswith(QUESTION) and "Assistant: Hi." in turn
    assert tool_turn.startswith("You can call the following tools") and tool_turn.endswith(QUESTION)


def test_lcel_chain_beyond_the_native_window(chat, tokenizer) -> None:
    document = haystack(9000, 0.1)
    assert len(tokenizer(document).input_ids) > 8192
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from this document.\n\n{document}"),
                                               ("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    assert "58291" in chain.invoke({"document": document, "question": QUESTION})


def test_agent_tool_over_a_read_document(chat, default_engine, tokenizer) -> None:
    agents = pytest.importorskip("langchain.agents")
    from langchain.agents.middleware import wrap_model_call

    memory = default_engine.read(haystack(1200, 0.5))
    asked: list[str] = []

    @tool(parse_docstring=True)
    def ask_document(question: str) -> str:
        """Ask the rocket manual a question.

        Args:
            question: The question to ask about the rocket manual.
        """
        asked.append(question)
        return memory.ask(question, max_new_tokens=24).text

    @wrap_model_call
    def one_tool_call(request, handler):  # a 135M model calls tools only when made to, and then loops
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "any"))

    agent = agents.create_agent(chat, [ask_document], middleware=[one_tool_call])
    messages = agent.invoke({"messages": [HumanMessage(QUESTION)]})["messages"]
    kinds = [type(m).__name__ for m in messages]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert messages[1].tool_calls[0]["name"] == "ask_document" and asked
    assert messages[2].content and isinstance(messages[-1], AIMessage) and messages[-1].text
