"""The OpenAI-compatible server as Ray Serve replicas: N engines, each document's requests sent to a replica
that holds its memory. `quickllama serve --ray --replicas N`, or on a Ray cluster
`serve run qllm_integrations.ray_serve:app_builder replicas=N store=/shared/folder` (`AppArgs` lists the
arguments).

Two deployments:

- `EngineReplica`, N of them (one GPU each when this machine has CUDA GPUs, else an equal share of its CPU
  cores): one engine, behind `server._Server` (its worker thread, reading, answering). A replica's memories
  are Ray Serve multiplexed models keyed by document id: loaded from the store on a miss, at most
  `cached_documents` kept, the least recently used evicted. Ray Serve's router sends a request that names a
  document to a replica that holds its memory (else to one holding the fewest).
- `Gateway`, one, without a model: the HTTP API of `server.build_app`. `POST /v1/documents` hashes the text to
  its id (`server.document_id`, under the model name and config the replicas report) and sends the reading
  with that id, so the replica that reads a document holds it for the questions after; a chat completion
  goes with its `"document"` id, one without a document to any replica.

A document is read once in total: a replica reads it only if the store has no memory of it yet, under a lock
file beside the memories (`.doc-<id>.lock`), so two replicas handed the same new text at once do not both read
it. Every replica must see the same store folder (one machine, or a shared file system).

A replica that dies takes only loaded memories with it: Ray Serve starts another, the router forgets the dead
one, and its documents are loaded from the store by the replicas their next requests reach. The gateway sends a
request again when its replica dies before the client got any of the answer (a non-streamed answer is held back
until complete), so clients see no error.
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from qllm_runtime import EMBEDDED_MODEL_CONFIG, Answer, Memory, QLLMConfig, QLLMEngine

from .engines import shared_engine
from .server import DEFAULT_STORE, ChatRequest, _Server, build_app, document_id

__all__ = ["AppArgs", "EngineReplica", "Gateway", "app_builder", "ray_app", "serve_ray"]

EngineFactory = Callable[[], QLLMEngine]
"""Makes a replica's engine, in the replica's process (pickled to it: a module-level function or a partial)."""

_ATTEMPTS = 3  # sends of one request, while its replica dies before the client got any of the answer
_REPLICA_LOST = (ActorDiedError, ActorUnavailableError)


@serve.deployment
class EngineReplica:
    """One engine; the memories it holds are multiplexed models keyed by document id."""

    def __init__(self, engine: EngineFactory, store: str, max_new_tokens: int, cached_documents: int) -> None:
        # The multiplexed cache holds this replica's memories; the server's own keeps only the last one read or
        # loaded, so that a document just read goes into the multiplexed cache without a load from the store.
        self.server = _Server(engine(), Path(store), max_new_tokens, cached_documents=1)

        async def load(doc_id: str) -> Memory:
            return await self.server.call(lambda: self.server.memory(doc_id))

        self.memory = serve.multiplexed(max_num_models_per_replica=cached_documents)(load)

    def identity(self) -> tuple[str, QLLMConfig]:
        """The model name and config that document ids hash."""
        return self.server.model_name, self.server.engine.config

    async def read(self, text: str) -> dict[str, Any]:
        """The store's entry of `text`, read unless it is stored; its memory is then held here."""
        entry = await self.server.call(lambda: self._read_once(text))
        await self.memory(entry["id"])
        return entry

    def _read_once(self, text: str) -> dict[str, Any]:
        """`_Server.read` under the document's lock file (worker thread): a replica that waited for another
        reading the same text finds its memory stored."""
        doc_id = document_id(self.server.model_name, self.server.engine.config, text)
        with open(self.server.store / f".{doc_id}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            return self.server.read(text)

    async def answer(self, request: ChatRequest) -> AsyncIterator[str | Answer]:
        """`_Server.answer`, from the held memory of the request's document."""
        memory = await self.memory(request.document) if request.document is not None else None
        async for item in self.server.answer(request, memory):
            yield item


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Gateway:
    """The HTTP API, a `server.Backend` that sends each request to the replicas, keyed by its document."""

    def __init__(self, replicas: DeploymentHandle, store: str) -> None:
        self.replicas, self.store = replicas, Path(store)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        self.model_name, self.config = await self.replicas.identity.remote()
        return build_app(self)

    async def read_document(self, text: str) -> dict[str, Any]:
        handle = self.replicas.options(multiplexed_model_id=document_id(self.model_name, self.config, text))
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with _replica_errors():
                    return await handle.read.remote(text)
            except _REPLICA_LOST:
                if attempt == _ATTEMPTS:
                    raise

    async def answer(self, request: ChatRequest) -> AsyncIterator[str | Answer]:
        handle = self.replicas.options(stream=True, multiplexed_model_id=request.document or "")
        for attempt in range(1, _ATTEMPTS + 1):
            response, whole, streamed, finished = handle.answer.remote(request), [], False, False
            try:
                with _replica_errors():
                    async for item in response:
                        if request.stream:
                            streamed = True
                            yield item
                        else:  # held back until complete: a lost replica's answer can be asked again whole
                            whole.append(item)
                finished = True
            except _REPLICA_LOST:
                if streamed or attempt == _ATTEMPTS:
                    raise
                continue
            finally:
                if not finished:
                    response.cancel()  # a client gone mid-answer: the replica stops generating
            for item in whole:
                yield item
            return

    def close(self) -> None:
        """Nothing to release: the replicas are a deployment of their own."""


@contextmanager
def _replica_errors() -> Iterator[None]:
    """A replica's own error (APIError, QLLMError, ...) raised here as itself, for the app to answer."""
    try:
        yield
    except RayTaskError as error:
        raise error.cause from None


def replica_resources(device: str | None, replicas: int | None) -> tuple[int, dict[str, float]]:
    """(replicas, each replica's Ray resources): one GPU each when `device` is CUDA, or unset where CUDA is
    available (replicas None: one per GPU); else a share of the CPU cores (replicas None: one)."""
    on_gpus = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if replicas is None:
        replicas = max(torch.cuda.device_count(), 1) if on_gpus else 1
    return replicas, {"num_gpus": 1} if on_gpus else {"num_cpus": max(1, (os.cpu_count() or 1) // replicas)}


def ray_app(engine: EngineFactory, store: str | os.PathLike = DEFAULT_STORE, *, replicas: int | None = None,
            max_new_tokens: int = 64, cached_documents: int = 4, device: str | None = None) -> Application:
    """The application: `replicas` engines made by `engine()` (None: one per GPU of this machine, else one),
    documents' memories saved in `store`, `cached_documents` memories held per replica; `max_new_tokens`
    applies when a request sets no limit. Each replica takes one GPU from Ray, or a share of the CPU cores when
    `device` is a CPU (None: the GPUs where CUDA is available)."""
    replicas, resources = replica_resources(device, replicas)
    engines = EngineReplica.options(num_replicas=replicas, ray_actor_options=resources)
    return Gateway.bind(engines.bind(engine, str(store), max_new_tokens, cached_documents), str(store))


class AppArgs(BaseModel):
    """Arguments of `app_builder` (`serve run ... key=value`, or a Serve config file's `args`)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="HF directory, hub id or .gguf file (None: embedded SmolLM2-135M)")
    device: str | None = Field(None, description="a replica's device (None: its GPU, else the CPU)")
    config: dict[str, Any] = Field({}, description="QLLMConfig fields over the model's defaults")
    store: str = Field(str(DEFAULT_STORE), description="the documents' memories, a folder every replica sees")
    replicas: int | None = Field(None, ge=1, description="engines (None: one per GPU of this machine, else one)")
    max_new_tokens: int = Field(64, ge=1, description="generated tokens when a request sets no limit")
    cached_documents: int = Field(4, ge=1, description="memories each replica holds")


def app_builder(args: dict[str, Any]) -> Application:
    """The application for `serve run qllm_integrations.ray_serve:app_builder key=value ...` (see `AppArgs`)."""
    options = AppArgs.model_validate(args)
    base = EMBEDDED_MODEL_CONFIG if options.model is None else QLLMConfig()
    config = QLLMConfig(**{**base.model_dump(), **options.config})
    engine = functools.partial(shared_engine, options.model, config, options.device)
    return ray_app(engine, options.store, replicas=options.replicas, max_new_tokens=options.max_new_tokens,
                   cached_documents=options.cached_documents, device=options.device)


def serve_ray(engine: EngineFactory, *, host: str = "127.0.0.1", port: int = 8000,
              store: str | os.PathLike = DEFAULT_STORE, replicas: int | None = None, max_new_tokens: int = 64,
              cached_documents: int = 4, device: str | None = None) -> None:
    """Serve `ray_app(...)` on `host:port` until Ctrl-C or SIGTERM, on a Ray instance started here (or the
    cluster at RAY_ADDRESS); the application is deleted on the way out."""
    serve.start(http_options={"host": host, "port": port})
    # SIGTERM stops it as Ctrl-C does (Serve, then Ray, shut down in order), in place of Ray's handler
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.run(ray_app(engine, store, replicas=replicas, max_new_tokens=max_new_tokens,
                          cached_documents=cached_documents, device=device), blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
