"""Thin adapters from QuickLLaMA's engine to LangChain and LlamaIndex (each an optional extra).

Names load lazily from their submodule, so `import qllm_integrations` needs neither framework.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChatQLLM": "langchain",
    "QLLMChatModel": "langchain",
    "ParsedToolCall": "tools",
    "parse_tool_calls": "tools",
    "template_renders_tools": "tools",
    "tool_messages_for_template": "tools",
    "tools_system_prompt": "tools",
    "QLLM": "llama_index",
    "QLLMIndex": "llama_index_memory",
    "QLLMQueryEngine": "llama_index_memory",
    "QLLMRetriever": "llama_index_memory",
    "document_tools": "llama_index_memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
