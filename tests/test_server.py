"""The OpenAI-compatible server: a real uvicorn server on loopback, driven by LangChain, LlamaIndex and httpx."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from langchain_openai import ChatOpenAI
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from qllm_integrations.server import create_app
from qllm_runtime import QLLMEngine
from qllm_runtime.cli import DEMO_QUESTION, build_parser, cmd_serve, demo_document

QUESTION = "What is the capital of France?"


@contextmanager
def running(engine: QLLMEngine, store: Path) -> Iterator[str]:
    """A server over `engine` on a free loopback port, always stopped (bounded); yields its /v1 base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, store), log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def base_url(default_engine, tmp_path_factory) -> Iterator[str]:
    with running(default_engine, tmp_path_factory.mktemp("store")) as url:
        yield url


def chat_openai(base_url: str, **options) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key="x", model="any", **{
        "temperature": 0, "max_retries": 0, "timeout": 120, "max_tokens": 8, **options})


def test_serve_command_line():
    args = build_parser().parse_args(["serve", "--port", "9001", "--store", "docs", "--topk", "4"])
    assert (args.run, args.host, args.port, args.store, args.topk) == (cmd_serve, "127.0.0.1", 9001, "docs", 4)


def test_models(base_url, default_engine):
    data = httpx.get(f"{base_url}/models").json()["data"]
    assert [m["id"] for m in data] == [default_engine.model_name]


def test_langchain_invoke_and_stream(base_url):
    llm = chat_openai(base_url, stream_usage=True)
    message = llm.invoke(QUESTION)
    assert "paris" in message.content.lower()
    assert message.usage_metadata["output_tokens"] <= 8 < message.usage_metadata["input_tokens"]
    chunks = list(llm.stream(QUESTION))
    assert "".join(c.content for c in chunks) == message.content  # greedy: the same answer
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.usage_metadata == message.usage_metadata
    assert total.response_metadata["finish_reason"] == message.response_metadata["finish_reason"]


def test_llama_index_chat_and_stream(base_url):
    llm = OpenAILike(model="any", api_base=base_url, api_key="x", is_chat_model=True, max_tokens=8,
                     temperature=0.0, max_retries=0, timeout=120)
    messages = [ChatMessage(role="user", content=QUESTION)]
    reply = llm.chat(messages).message.content
    assert "paris" in reply.lower()
    assert "".join(r.delta or "" for r in llm.stream_chat(messages)) == reply


def test_unknown_document_is_404(base_url):
    llm = chat_openai(base_url, extra_body={"document": "doc-" + "0" * 32})
    with pytest.raises(openai.NotFoundError, match="no document"):
        llm.invoke(QUESTION)
    response = httpx.post(f"{base_url}/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "document": "../../etc/passwd"})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "document"


@pytest.mark.parametrize("body", [
    {"model": "any"},  # no messages
    {"messages": [{"role": "user", "content": QUESTION}], "temperature": -1},
    {"messages": [{"role": "user", "content": QUESTION}], "stop": 3},
    {"messages": [{"role": "wizard", "content": QUESTION}]},
    {"messages": [{"role": "system", "content": "Be brief."}]},  # no user message: no question
    {"messages": [{"role": "user", "content": QUESTION}], "n": 2},
    {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 0},
])
def test_malformed_request_is_400(base_url, body):
    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [{}, {"text": ""}, {"text": 3}])
def test_malformed_document_is_400(base_url, body):
    response = httpx.post(f"{base_url}/documents", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


def test_invalid_json_is_400(base_url):
    response = httpx.post(f"{base_url}/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "json" in response.json()["error"]["message"].lower()


def test_disconnecting_client_frees_the_model(base_url, caplog):
    caplog.set_level(logging.INFO, logger="quickllama")
    body = {"stream": True, "max_tokens": 2000, "messages": [{"role": "user", "content": "Tell a long story."}]}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{base_url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        pieces = 0
        for line in r.iter_lines():
            pieces += line.startswith("data: {")
            if pieces == 3:
                break  # leaving closes the connection mid-answer
    t0 = time.monotonic()
    assert chat_openai(base_url, max_tokens=4, timeout=30).invoke(QUESTION).content
    assert time.monotonic() - t0 < 30
    answered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("answered")]
    assert len(answered) == 1 and "4 generated" in answered[0]  # the story was never finished


def test_documents_are_answered_from_memories_that_survive_a_restart(default_engine, tmp_path):
    context, _, animal = demo_document(60, 0.3, seed=3)
    store = tmp_path / "store"
    answers = []
    for restart in (False, True):
        with running(default_engine, store) as url:
            if not restart:
                posted = httpx.post(f"{url}/documents", json={"text": context}, timeout=120).json()
            listed = httpx.get(f"{url}/documents").json()["data"]
            assert [d["id"] for d in listed] == [posted["id"]]
            llm = chat_openai(url, max_tokens=16, extra_body={"document": posted["id"]})
            message = llm.invoke(DEMO_QUESTION)
            usage = message.response_metadata["token_usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]  # the document, read once before
            assert default_engine.count_tokens(context) <= cached < usage["prompt_tokens"] < cached + 100
            answers.append(message.content)
    assert answers[0] == answers[1]  # saved ⇒ loaded answers the same
    assert animal in answers[0].lower()
