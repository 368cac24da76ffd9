"""`quickllama serve`: an OpenAI-compatible HTTP API over one engine (FastAPI + uvicorn).

- `GET /v1/models`: the one model served (a request's `model` field is not checked).
- `POST /v1/chat/completions`, streamed (`"stream": true`, SSE) or not; `max_tokens` (or
  `max_completion_tokens`), `temperature`, `top_p`, `stop` and `seed` become the engine's generation options,
  other fields are ignored. With `"document": id` (OpenAI clients: `extra_body={"document": id}`) the last
  user message is the question, answered from that document's memory.
- `POST /v1/documents` `{"text": ...}` reads the text once and saves its memory in the store directory
  (`{"id": ...}`, a hash of model, config and text); `GET /v1/documents` lists the store. Memories outlive
  the server; a few loaded ones stay in memory.

Requests queue for one worker thread that makes every engine call, one at a time, so the event loop never
waits for the model; a streaming client that disconnects closes its answer stream, which frees the model.
Errors have OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`).

`build_app` serves the same API from any `Backend`: `create_app` from one engine in this process,
`qllm_integrations.ray_serve` from engine replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from qllm_runtime import Answer, InvalidInputError, Memory, QLLMConfig, QLLMEngine, QLLMError

from .chat import ChatCall

__all__ = ["DEFAULT_STORE", "Backend", "build_app", "create_app", "document_id", "serve"]

DEFAULT_STORE = Path.home() / ".cache" / "quickllama" / "documents"
_SUFFIX = ".qmem"
_DOCUMENT_ID = re.compile(r"doc-[0-9a-f]{32}")
T = TypeVar("T")


class APIError(Exception):
    """An error answered with `status` and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def __reduce__(self) -> tuple[type[APIError], tuple[int, str, str | None]]:
        return type(self), (self.status, self.message, self.param)  # pickled whole (raised in another process)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def template_dict(self) -> dict[str, str]:
        """The message as the chat template takes it (`developer` is a system message, text parts joined)."""
        content = self.content or ""
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, "only text content parts are supported", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many fields this server has no use for
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    document: str | None = Field(None, min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    tools: list[dict[str, Any]] | None = None

    def generation(self, max_new_tokens: int) -> dict[str, Any]:
        """The engine's generation options (`max_new_tokens`: when the request sets no limit)."""
        limit = next((n for n in (self.max_completion_tokens, self.max_tokens) if n is not None), max_new_tokens)
        options = dict(max_new_tokens=limit, temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                       seed=self.seed)
        return {name: value for name, value in options.items() if value is not None}


class DocumentRequest(BaseModel):
    text: str


def document_id(model_name: str, config: QLLMConfig, text: str) -> str:
    """The store's id of `text` read by model `model_name` under `config`."""
    key = json.dumps([model_name, config.model_dump_json(), text])
    return "doc-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class Backend(Protocol):
    """What `build_app` serves from: the model's name, the document store, reading and answering."""

    model_name: str
    store: Path

    async def read_document(self, text: str) -> dict[str, Any]:
        """The store's entry of `text` (`{"id", "object": "document", "bytes", "created_at"}`), read and saved
        unless it is stored already."""

    def answer(self, request: ChatRequest) -> AsyncIterator[str | Answer]:
        """Text pieces, then the Answer, of one request; closing the iterator early ends its generation."""

    def close(self) -> None:
        """Release what the backend holds (the app is shutting down)."""


class _Server:
    """The engine, the document store and the one worker thread that makes every engine call."""

    def __init__(self, engine: QLLMEngine, store: Path, max_new_tokens: int, cached_documents: int) -> None:
        self.engine, self.store, self.max_new_tokens = engine, store, max_new_tokens
        self.model_name = engine.model_name
        self.cached_documents = cached_documents
        self.memories: OrderedDict[str, Memory] = OrderedDict()  # touched only in the worker thread
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quickllama-model")

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` in the worker thread, after the calls queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn)

    async def read_document(self, text: str) -> dict[str, Any]:
        return await self.call(lambda: self.read(text))

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)

    # ---- documents (worker thread) -----------------------------------------------------------------------
    def read(self, text: str) -> dict[str, Any]:
        doc_id = document_id(self.model_name, self.engine.config, text)
        path = self.store / f"{doc_id}{_SUFFIX}"
        if not path.exists():
            memory = self.engine.read(text)
            path = memory.save(path)  # atomic: a listed document is complete
            self._remember(doc_id, memory)
        return _document_entry(path)

    def memory(self, doc_id: str) -> Memory:
        if doc_id in self.memories:
            self.memories.move_to_end(doc_id)
            return self.memories[doc_id]
        path = self.store / f"{doc_id}{_SUFFIX}"
        if not _DOCUMENT_ID.fullmatch(doc_id) or not path.exists():
            raise APIError(404, f"no document {doc_id!r}: POST /v1/documents returns the ids (GET lists them)",
                           "document")
        return self._remember(doc_id, self.engine.load_memory(path))

    def _remember(self, doc_id: str, memory: Memory) -> Memory:
        self.memories[doc_id] = memory
        while len(self.memories) > self.cached_documents:
            self.memories.popitem(last=False)
        return memory

    # ---- answers ---------------------------------------------------------------------------------------------
    def chat_call(self, request: ChatRequest, memory: Memory | None = None) -> ChatCall:
        """The request as one engine call; `memory`: its document's, else looked up here (worker thread: it may
        load the document)."""
        messages = [m.template_dict() for m in request.messages]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise APIError(400, "messages have no user message: the last one is the question", "messages")
        if memory is None and request.document is not None:
            memory = self.memory(request.document)
        last = users[-1]
        return ChatCall(self.engine, messages[last]["content"], messages[:last], messages[last + 1 :],
                        memory=memory, generation=request.generation(self.max_new_tokens))

    async def answer(self, request: ChatRequest, memory: Memory | None = None) -> AsyncIterator[str | Answer]:
        """Text pieces, then the Answer, of one request (`memory`: its document's, if the caller has it);
        closing this iterator early ends its generation (or drops it from the queue)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | Answer | BaseException] = asyncio.Queue()
        stop = threading.Event()

        def put(item: str | Answer | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                stream = self.chat_call(request, memory).stream()
                try:
                    for piece in stream:
                        if stop.is_set():
                            return
                        put(piece)
                finally:
                    stream.close()  # a no-op once exhausted; else stops generating and frees the model
                put(stream.answer)
            except Exception as error:
                put(error)

        job = loop.run_in_executor(self.worker, work)
        try:
            while not isinstance(item := await queue.get(), Answer):
                if isinstance(item, BaseException):
                    raise item
                yield item
            yield item
        finally:
            stop.set()
            job.cancel()  # a job still queued never starts


def create_app(engine: QLLMEngine, store: str | os.PathLike = DEFAULT_STORE, *,
               max_new_tokens: int = 64, cached_documents: int = 4) -> FastAPI:
    """The API over `engine`, documents saved in `store`; `max_new_tokens` applies when a request sets no
    limit, `cached_documents` loaded memories are kept."""
    return build_app(_Server(engine, Path(store), max_new_tokens, cached_documents))


def build_app(backend: Backend) -> FastAPI:
    """The API over `backend` (its store folder is created if missing)."""
    backend.store.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        backend.close()

    app = FastAPI(title="QuickLLaMA", lifespan=lifespan)
    model = {"id": backend.model_name, "object": "model", "created": int(time.time()), "owned_by": "quickllama"}

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return _error(error.status, error.message, error.param)

    @app.exception_handler(InvalidInputError)
    async def invalid_input(_: Request, error: InvalidInputError) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(QLLMError)
    async def engine_error(_: Request, error: QLLMError) -> JSONResponse:
        return _error(500, f"{type(error).__name__}: {error}")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model]}

    @app.get("/v1/documents")
    async def documents() -> dict[str, Any]:
        paths = sorted(p for p in backend.store.glob(f"*{_SUFFIX}") if _DOCUMENT_ID.fullmatch(p.stem))
        return {"object": "list", "data": [_document_entry(p) for p in paths]}

    @app.post("/v1/documents")
    async def read_document(request: DocumentRequest) -> dict[str, Any]:
        return await backend.read_document(request.text)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatRequest) -> dict[str, Any] | StreamingResponse:
        if request.n != 1:
            raise APIError(400, "n must be 1: this server generates one choice per request", "n")
        if request.tools:
            raise APIError(400, "tools are not supported by this server: send the request without them", "tools")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.model_name}
        items = backend.answer(request)
        first = await anext(items)  # errors before the first piece (bad input, unknown document) get a status
        if not request.stream:
            pieces = [first] + [item async for item in items]
            answer = pieces[-1]
            return {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                "finish_reason": answer.finish_reason}], "usage": _usage(answer)}
        usage = bool((request.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(head, first, items, usage), media_type="text/event-stream")

    return app


async def _sse(head: dict[str, Any], first: str | Answer, items: AsyncIterator[str | Answer],
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's `chat.completion.chunk` events of one answer, then `[DONE]`."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return event(choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def event(**fields: Any) -> str:
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', **fields})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    item = first
    try:
        while not isinstance(item, Answer):
            yield chunk({"content": item})
            item = await anext(items)
    except QLLMError as error:
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
        return
    finally:
        await items.aclose()
    yield chunk({}, item.finish_reason)
    if include_usage:
        yield event(choices=[], usage=_usage(item))
    yield "data: [DONE]\n\n"


def _usage(answer: Answer) -> dict[str, Any]:
    u = answer.usage
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.generated_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _document_entry(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"id": path.stem, "object": "document", "bytes": stat.st_size, "created_at": int(stat.st_mtime)}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def serve(engine: QLLMEngine, *, host: str = "127.0.0.1", port: int = 8000,
          store: str | os.PathLike = DEFAULT_STORE, max_new_tokens: int = 64, cached_documents: int = 4) -> None:
    """Serve `engine` until interrupted."""
    import uvicorn

    app = create_app(engine, store, max_new_tokens=max_new_tokens, cached_documents=cached_documents)
    uvicorn.run(app, host=host, port=port)
