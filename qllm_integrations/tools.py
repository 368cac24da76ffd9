"""Tool calling for local chat templates, shared by the LangChain and LlamaIndex adapters.

Tools are OpenAI-style function schemas (`{"type": "function", "function": {"name", "description",
"parameters"}}`). Templates that render `tools` (Qwen, Hermes, Llama-3.1, ...) get them as they are;
for the others `tools_system_prompt` asks the model to answer with a JSON tool call. Either way the
model's text is turned back into calls by `parse_tool_calls`, which understands Hermes/Qwen
`<tool_call>{json}</tool_call>`, Llama-3.1 `{"name", "parameters"}` (optionally after `<|python_tag|>`),
generic `{"name", "arguments"}` JSON and fenced ```json blocks.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ParsedToolCall",
    "check_tools",
    "forced_call_instruction",
    "parse_tool_calls",
    "select_tools",
    "template_renders_tools",
    "tool_messages_for_template",
    "tools_system_prompt",
]

_PROBE_NAME = "qllm_probe_tool_5f2c"
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call found in the model's text."""

    name: str
    arguments: dict
    id: str


def tools_system_prompt(tools: list[dict]) -> str:
    """Instructions that make a model whose template ignores `tools` answer with a JSON tool call."""
    functions = [t.get("function", t) for t in tools]
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    return (
        "You can call the following tools (JSON schemas):\n"
        f"{listing}\n"
        "To call a tool, reply with only one JSON object and nothing else: "
        '{"name": <tool name>, "arguments": {<argument name>: <value>, ...}}. '
        "Tool results come back in a message that starts with 'Tool result'. "
        "If no tool is needed, answer normally."
    )


def forced_call_instruction(tools: list[dict]) -> str:
    """The instruction that follows the question when the model must call one of `tools`."""
    which = tools[0]["function"]["name"] if len(tools) == 1 else "one of the tools"
    return f"Call {which}: reply with only the JSON tool call."


def select_tools(tools: list[dict] | None, tool_choice: Any = None) -> tuple[list[dict], bool]:
    """The tools the model may call, and whether it must call one. `tool_choice`: None or "auto" (may call
    any), "none" or False (no tools), a tool name or {"type": "function", "function": {"name": ...}} (must
    call that one), anything else ("any", "required", True) must call one of them."""
    if isinstance(tool_choice, dict):
        tool_choice = tool_choice.get("function", {}).get("name")
    if not tools or tool_choice in ("none", False):
        return [], False
    if tool_choice in (None, "auto"):
        return tools, False
    return [t for t in tools if t["function"]["name"] == tool_choice] or tools, True


def check_tools(tools: list[dict]) -> None:
    """Raise ValueError naming the tool and the problem unless every tool is an OpenAI function schema
    with a name and (if any) object `parameters`."""
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        label = f"tool {name!r}" if isinstance(name, str) and name else f"tool #{i}"
        if not isinstance(function, dict):
            raise ValueError(f'{label} is not an OpenAI function schema {{"type": "function", "function": {{...}}}}')
        if not isinstance(name, str) or not name:
            raise ValueError(f"{label} has no name: give it a non-empty 'name'")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ValueError(f"{label}: 'parameters' must be a JSON schema object "
                             f'({{"type": "object", "properties": {{...}}}}), got {parameters!r:.100}')
        if not isinstance(parameters.get("properties", {}), dict):
            raise ValueError(f"{label}: 'parameters.properties' must map argument names to JSON schemas")


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template puts the `tools` schemas into the prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = {"type": "function", "function": {"name": _PROBE_NAME, "description": "", "parameters": {
        "type": "object", "properties": {}}}}
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[probe], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that fails on tools does not render them
        return False
    return _PROBE_NAME in rendered


def tool_messages_for_template(messages: list[dict], renders_tools: bool) -> list[dict]:
    """Make assistant tool calls and tool results fit the template.

    `messages` use the OpenAI/transformers shape: assistant `{"tool_calls": [{"id", "type": "function",
    "function": {"name", "arguments": dict}}]}` and `{"role": "tool", "content", "tool_call_id", "name"?}`.
    Templates that render tools get them unchanged. For the others each result becomes a user turn
    "Tool result of name({arguments}): ..." and the calls leave the assistant turns (small models would
    copy a call they see there instead of answering from its result).
    """
    if renders_tools:
        return [dict(m) for m in messages]
    calls: dict[str, str] = {}
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                fn = call.get("function", call)
                arguments = json.dumps(_as_dict(fn.get("arguments")) or {}, ensure_ascii=False)
                calls[call.get("id", "")] = f"{fn['name']}({arguments})"
            if m.get("content"):
                out.append({"role": "assistant", "content": m["content"]})
        elif m["role"] == "tool":
            call = calls.get(m.get("tool_call_id", ""), m.get("name") or "a tool")
            out.append({"role": "user", "content": f"Tool result of {call}: {m.get('content', '')}"})
        else:
            out.append(dict(m))
    return out


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> tuple[str, list[ParsedToolCall]]:
    """Tool calls in `text` and the text left around them.

    With `tool_names`, only calls to those tools count. Untagged JSON counts as a call only if it has
    `arguments`/`parameters` or names a known tool, so ordinary JSON answers stay content.
    """
    calls: list[ParsedToolCall] = []
    spans: list[tuple[int, int]] = []
    for match in _TAGGED.finditer(text):
        found = _calls_in(match.group(1), tool_names, tagged=True)
        if found:
            calls += found
            spans.append(match.span())
    if not calls:
        for match in _FENCED.finditer(text):
            found = _calls_in(match.group(1), tool_names, tagged=False)
            if found:
                calls += found
                spans.append(match.span())
    if not calls:
        calls, spans = _bare_calls(text, tool_names)
    rest, last = [], 0
    for start, end in spans:
        rest.append(text[last:start])
        last = end
    rest.append(text[last:])
    content = "".join(rest).replace("<|python_tag|>", "").strip()
    return content, calls


def _bare_calls(text: str, tool_names: set[str] | None) -> tuple[list[ParsedToolCall], list[tuple[int, int]]]:
    """Tool-call JSON values (objects or lists of them) anywhere in `text`."""
    decoder = json.JSONDecoder()
    calls, spans, pos = [], [], 0
    while (start := _next_json_start(text, pos)) >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        found = _calls_from(value, tool_names, tagged=False)
        if found:
            calls += found
            spans.append((start, end))
        pos = end if found else start + 1
    return calls, spans


def _next_json_start(text: str, pos: int) -> int:
    starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
    return min(starts, default=-1)


def _calls_in(snippet: str, tool_names: set[str] | None, tagged: bool) -> list[ParsedToolCall]:
    try:
        value = json.loads(snippet)
    except json.JSONDecodeError:
        calls, _ = _bare_calls(snippet, tool_names)
        return calls
    return _calls_from(value, tool_names, tagged)


def _calls_from(value: Any, tool_names: set[str] | None, tagged: bool) -> list[ParsedToolCall]:
    items = value if isinstance(value, list) else [value]
    calls = [_call_from(item, tool_names, tagged) for item in items]
    return [c for c in calls if c is not None] if all(calls) else []


def _call_from(obj: Any, tool_names: set[str] | None, tagged: bool) -> ParsedToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI shape {"type": "function", "function": {...}}
        obj = {**obj["function"], "id": obj.get("id")}
    name = obj.get("name")
    if not isinstance(name, str) or not name or (tool_names is not None and name not in tool_names):
        return None
    key = "arguments" if "arguments" in obj else "parameters" if "parameters" in obj else None
    if key is None and not tagged and tool_names is None:
        return None
    arguments = _as_dict(obj.get(key)) if key else {}
    if arguments is None:
        return None
    call_id = obj.get("id") if isinstance(obj.get("id"), str) and obj.get("id") else _new_id()
    return ParsedToolCall(name, arguments, call_id)


def _as_dict(arguments: Any) -> dict | None:
    """Arguments as a dict: JSON strings are decoded, None is empty; anything else is rejected."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
