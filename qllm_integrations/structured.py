"""Forced tool calls and JSON answers, checked against their JSON schema; shared by both adapters.

A model whose chat template renders tools is asked for the whole call or object at once. A model whose
template knows no tools (the embedded 135M model) is asked one short answer per argument, each parsed to
its JSON type, so even it returns well-formed calls and objects. Either way, a result that breaks the
schema (a missing required key, a value outside `minimum`/`enum`, ...) is asked for once more with the
violation in the prompt; what comes back then is returned as it is, for the caller's parser to reject.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from qllm_runtime import Answer

from .chat import ChatCall
from .tools import ParsedToolCall, forced_call_instruction, parse_tool_calls

try:
    from jsonschema import validators
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("checking structured output needs jsonschema: pip install jsonschema") from e

__all__ = ["describe", "forced_call", "json_answer", "violations"]

T = TypeVar("T")


def violations(value: Any, schema: dict) -> dict[str, str]:
    """Where `value` breaks the JSON `schema`: {top-level field, or "" for the value itself: message}."""
    validator = validators.validator_for(schema)(schema)
    found: dict[str, str] = {}
    for error in validator.iter_errors(value):
        if error.validator == "required" and not error.absolute_path and isinstance(value, dict):
            for key in (k for k in error.validator_value if k not in value):
                found.setdefault(key, f"{key!r} is a required property")
        else:
            found.setdefault(str(error.absolute_path[0]) if error.absolute_path else "", error.message)
    return found


def describe(found: dict[str, str]) -> str:
    """Violations as one line that names each field."""
    return "; ".join(f"field {k!r}: {m}" if k else m for k, m in found.items())


def forced_call(call: ChatCall) -> tuple[ParsedToolCall | None, list[Answer]]:
    """A call of one of `call.tools` (the only one if there is one), or None if the model made none."""
    tools, answers = call.tools, []
    if not call.template_tools:
        if len(tools) > 1:
            names = [t["function"]["name"] for t in tools]
            answers.append(call.ask(f"Which tool fits best: {', '.join(names)}? Reply with only its name."))
            tools = [next((t for t, n in zip(tools, names, strict=True) if n in answers[-1].text), tools[0])]
        function = tools[0]["function"]
        arguments, filled = _fill(call, function.get("parameters") or {})
        return ParsedToolCall(function["name"], arguments, f"call_{uuid.uuid4().hex[:24]}"), answers + filled

    def parse(text: str) -> tuple[ParsedToolCall | None, dict[str, str]]:
        calls = parse_tool_calls(text, None if len(tools) == 1 else {t["function"]["name"] for t in tools})[1]
        if not calls:
            return None, {"": "it holds no JSON tool call"}
        function = next((t["function"] for t in tools if t["function"]["name"] == calls[0].name), tools[0]["function"])
        found = ParsedToolCall(function["name"], calls[0].arguments, calls[0].id)  # a forced call names its tool
        return found, violations(found.arguments, function.get("parameters") or {})

    return _with_retry(call, forced_call_instruction(tools), parse)


def json_answer(call: ChatCall, schema: dict | None, show_schema: bool = True) -> tuple[str, list[Answer]]:
    """A JSON object answering `call`; `show_schema`: the instruction includes `schema`."""
    if schema and _is_flat(schema) and not call.template_tools:
        value, answers = _fill(call, schema)
        return json.dumps(value, ensure_ascii=False), answers
    instruction = "Reply with only a JSON object."
    if schema and show_schema:
        instruction = f"Reply with only a JSON object that matches this JSON schema: {json.dumps(schema)}"

    def parse(text: str) -> tuple[str, dict[str, str]]:
        value = _json_in(text, "{")
        if not isinstance(value, dict):
            return text, {"": "it is not a JSON object"}
        return json.dumps(value, ensure_ascii=False), violations(value, schema) if schema else {}

    return _with_retry(call, instruction, parse)


def _with_retry(call: ChatCall, instruction: str, parse: Callable[[str], tuple[T, dict[str, str]]]
                ) -> tuple[T, list[Answer]]:
    """Answer with `instruction`; when `parse(text)` -> (result, violations) finds any, ask once more."""
    answers = [call.stream([instruction]).result()]
    result, found = parse(answers[-1].text)
    if found:
        retry = (f"{instruction}\nYour previous reply {answers[-1].text.strip()[:300]!r} is invalid: "
                 f"{describe(found)}. Reply again, corrected.")
        answers.append(call.stream([retry]).result())
        result, _ = parse(answers[-1].text)
    return result, answers


def _fill(call: ChatCall, schema: dict) -> tuple[dict[str, Any], list[Answer]]:
    """An object of `schema` from one short answer per property (a small model follows "give x" better
    than "to call tool t, give x"); the properties that break the schema are asked once more, with the
    violation."""
    arguments: dict[str, Any] = {}
    answers: list[Answer] = []
    properties = schema.get("properties", {})

    def ask(key: str, prop: dict, error: str = "") -> None:
        known = "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in arguments.items() if k != key)
        about = prop.get("description") or prop.get("title") or key
        fix = f" Your previous answer was invalid: {error}." if error else ""
        answers.append(call.ask(f"{known}Give {key} ({about}).{fix} Reply with only the {_kind(prop)}."))
        value = _coerce(answers[-1].text.strip(), prop)
        if value is None:
            arguments.pop(key, None)
        else:
            arguments[key] = value

    for key, prop in properties.items():
        ask(key, prop)
    for key, error in violations(arguments, schema).items():
        if key in properties:
            ask(key, properties[key], error)
    return arguments, answers


def _kind(prop: dict) -> str:
    """"integer", "number", "boolean", "string", "one of ..." for a flat property, else "JSON value"."""
    if "enum" in prop:
        return "one of " + ", ".join(map(str, prop["enum"]))
    types = [prop.get("type")] + [p.get("type") for p in prop.get("anyOf", [])]
    return next((t for t in types if t in ("integer", "number", "boolean", "string")), "JSON value")


def _is_flat(schema: dict) -> bool:
    """An object schema whose properties are all strings, numbers, booleans or enums (maybe optional)."""
    properties = schema.get("properties")
    return bool(properties) and all(_kind(p) != "JSON value" for p in properties.values())


def _coerce(text: str, prop: dict) -> Any:
    """A short answer as the property's JSON value; None when it holds none."""
    if "enum" in prop:
        return next((v for v in prop["enum"] if str(v).lower() in text.lower()), None)
    kind = _kind(prop)
    if kind in ("integer", "number"):
        match = re.search(r"-?\d+(?:\.\d+)?" if kind == "number" else r"-?\d+", text)
        return (float if kind == "number" else int)(match.group()) if match else None
    if kind == "boolean":
        word = re.search(r"\b(yes|true|no|false)\b", text.lower())
        return word.group() in ("yes", "true") if word else None
    if kind == "JSON value":
        return _json_in(text, "{[\"-0123456789")
    return text.strip("\"'` ") or None


def _json_in(text: str, openers: str) -> Any:
    """The first JSON value in `text` that starts with one of `openers` (prose around it allowed), or None."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c in openers):
        try:
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            continue
    return None
