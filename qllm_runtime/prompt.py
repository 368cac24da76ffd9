"""Turn (context, question) or chat messages into token ids: the part to read and the question turn.

The model's chat template decides the layout. For `ask`, the user turn is `context + "\\n\\n" +
question`; the template text before the question (header + context) is what gets read into memory,
the rest (question, end of turn, assistant header) is the question turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError

_SENTINEL = "\u2063QLLM-SPLIT\u2063"
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "</s>")


@dataclass
class ContextTokens:
    """Tokens to read; `offsets[i]` is token i's character span in `text`, or None for template tokens."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int] | None]


@dataclass
class PromptParts:
    context: ContextTokens
    turn_ids: list[int]
    question: str


def check_text(value: Any, what: str) -> str:
    """`value` if it is non-blank, encodable text; else InvalidInputError naming `what`."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidInputError(f"{what} is empty (or only whitespace)")
    return check_encodable(value, what)


def check_encodable(text: str, what: str) -> str:
    """`text` if tokenizers can encode it (no lone surrogates), else InvalidInputError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"{what} contains a lone surrogate {text[e.start]!r} at character {e.start}: pass valid Unicode "
            "text (decode bytes with errors='replace', or drop the surrogates)"
        ) from e
    return text


class PromptBuilder:
    """Chat-template-aware tokenisation for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self._bos = [bos] if adds_bos else []

    # ---- pieces ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc.input_ids, [tuple(o) for o in enc.offset_mapping]
        ids = self.encode(text)  # slow tokenizer: spans from the decoded length of each token
        offsets, pos = [], 0
        for token in ids:
            piece = len(self.tokenizer.decode([token]))
            offsets.append((min(pos, len(text)), min(pos + piece, len(text))))
            pos += piece
        return ids, offsets

    def _start(self, rendered: str) -> list[int]:
        """BOS to prepend, unless the template already renders it."""
        bos_text = self.tokenizer.bos_token or ""
        return [] if bos_text and rendered.startswith(bos_text) else list(self._bos)

    def render(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        """The chat template applied to `messages`; templates that reject a system role or repeated
        roles get the messages normalised (system folded into the first user turn, same roles merged)."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError:
            return self.tokenizer.apply_chat_template(
                normalise_roles(messages), tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )

    def _split_user_turn(
        self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None
    ) -> tuple[str, str]:
        """Render the template with the last user content replaced by a marker; text before and after it."""
        rendered = self.render(messages, generation_prompt, tools)
        head, sep, tail = rendered.partition(_SENTINEL)
        if not sep:
            raise InvalidInputError("the chat template dropped the user message; cannot locate the question")
        return head, tail

    def context_tokens(self, head: str, body: str) -> ContextTokens:
        """Template text `head` (no offsets) followed by `body` (offsets into body)."""
        head_ids = self._start(head + body) + (self.encode(head) if head else [])
        body_ids, body_offsets = self.encode_with_offsets(body)
        return ContextTokens(body, head_ids + body_ids, [None] * len(head_ids) + list(body_offsets))

    # ---- prompts -----------------------------------------------------------------------------------
    def ask_parts(self, context: str, question: str) -> PromptParts:
        head, tail = self._ask_template()
        return PromptParts(self.context_tokens(head, context), self._turn(question, tail), question)

    def read_parts(self, context: str) -> ContextTokens:
        head, _ = self._ask_template()
        return self.context_tokens(head, context)

    def turn_ids(self, turn: str, tools: list[dict] | None = None) -> list[int]:
        """The user turn after a context read with `read_parts`. `tools`: OpenAI-style function schemas for
        the chat template; what it renders for them before the user content (e.g. in a system prompt, read
        with the context, without tools) opens the turn instead."""
        head, tail = self._ask_template()
        if tools and self.has_template:
            tools_head, tail = self._split_user_turn([{"role": "user", "content": _SENTINEL}], True, tools)
            added = _inserted(head, tools_head).strip()
            turn = f"{added}\n\n{turn}" if added else turn
        return self._turn(turn, tail)

    def _turn(self, text: str, tail: str) -> list[int]:
        lead = "\n\n" if self.has_template else "\n\nQuestion: "
        return self.encode(lead + text + tail)

    def _ask_template(self) -> tuple[str, str]:
        if not self.has_template:
            return "", "\nAnswer:"
        return self._split_user_turn([{"role": "user", "content": _SENTINEL}], generation_prompt=True)

    def chat_parts(
        self, messages: Sequence[dict], question: str | None, tools: list[dict] | None = None
    ) -> PromptParts:
        """Everything before the last user message's content is read; that content onwards is the turn.
        `tools`: OpenAI-style function schemas, rendered by templates that support them."""
        messages = check_messages(messages)
        if not self.has_template:
            raise InvalidInputError("this tokenizer has no chat template; use ask(context, question)")
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        content = messages[last_user]["content"]
        marked = [*messages[:last_user], {**messages[last_user], "content": _SENTINEL}, *messages[last_user + 1 :]]
        head, tail = self._split_user_turn(marked, messages[-1]["role"] != "assistant", tools)
        question = check_text(question, "question") if question is not None else content
        return PromptParts(self.context_tokens("", head), self.encode(content + tail), question)

    def question_probe(self, question: str, max_tokens: int) -> tuple[list[int], int, int]:
        """Ids of (chat header + question) and the [start, end) span of the question's tokens; a question
        longer than `max_tokens` keeps its end (where the ask usually is), so the probe stays short."""
        if self.has_template:
            head, _ = self._split_user_turn([{"role": "user", "content": _SENTINEL}], generation_prompt=False)
        else:
            head = "Question: "
        head_ids = self._start(head) + self.encode(head)
        q_ids = self.encode(question)[-max_tokens:]
        return head_ids + q_ids, len(head_ids), len(head_ids) + len(q_ids)

    def stop_token_ids(self, generation_config) -> set[int]:
        """End-of-sequence ids from the generation config, the tokenizer and the chat template."""
        ids: set[int] = set()
        eos = getattr(generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        template = getattr(self.tokenizer, "chat_template", None) or ""
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in template and t in vocab)
        return ids


def check_messages(messages: Any) -> list[dict]:
    """Validate chat messages: a non-empty list of {"role", "content": str} with at least one user turn."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), str):
            raise InvalidInputError(f"message {i} must be a dict with a 'role' and a str 'content', got {m!r:.80}")
        out.append({**m, "content": check_encodable(m.get("content") or "", f"message {i}")})
    if not any(m["role"] == "user" for m in out):
        raise InvalidInputError("messages contain no user turn: nothing to use as the question")
    if not out[max(i for i, m in enumerate(out) if m["role"] == "user")]["content"].strip():
        raise InvalidInputError("the last user message is empty: nothing to use as the question")
    return out


def _inserted(base: str, extended: str) -> str:
    """The text `extended` has in place of `base`'s middle (after their common prefix, before their common
    suffix)."""
    prefix = _common_prefix(base, extended)
    suffix = _common_prefix(base[prefix:][::-1], extended[prefix:][::-1])
    return extended[prefix : len(extended) - suffix]


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def normalise_roles(messages: list[dict]) -> list[dict]:
    """Fold system messages into the next user turn and merge consecutive messages of the same role."""
    out: list[dict] = []
    pending_system: list[str] = []
    for m in messages:
        if m["role"] == "system":
            pending_system.append(m["content"])
            continue
        if m["role"] == "user" and pending_system:
            m = {**m, "content": "\n\n".join([*pending_system, m["content"]])}
            pending_system = []
        if out and out[-1]["role"] == m["role"] and not out[-1].get("tool_calls") and not m.get("tool_calls"):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    if pending_system:  # only system text after the last user turn: keep it as a user turn
        out.append({"role": "user", "content": "\n\n".join(pending_system)})
    return out
