"""LlamaIndex index over one block memory: documents read once, each query passed as the question; its
query engine, retriever and per-document agent tools. Exported with the LLM by `qllm_integrations.llama_index`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from bisect import bisect_right
from collections.abc import Sequence
from contextlib import closing
from operator import itemgetter
from pathlib import Path
from typing import Any

from qllm_runtime import BlockSpan, Memory, QLLMEngine

from .chat import pump
from .engines import shared_engine

try:
    from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
    from llama_index.core.bridge.pydantic import Field
    from llama_index.core.indices.list.base import SummaryIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import BaseNode, Document, MetadataMode, NodeWithScore, QueryBundle, TransformComponent
    from llama_index.core.storage import StorageContext
    from llama_index.core.tools import QueryEngineTool
    from llama_index.core.types import TokenGen
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "qllm_integrations.llama_index needs llama-index-core: pip install 'quickllama[llama-index]'"
    ) from e

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GENERATION_KEYS", "QLLMIndex", "QLLMQueryEngine", "QLLMRetriever",
           "document_tools"]

NODE_SEPARATOR = "\n\n"
DEFAULT_MAX_NEW_TOKENS = 256
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")
"""Keyword arguments passed to the engine per call."""

log = logging.getLogger("quickllama")


def _default_transformations() -> list[TransformComponent]:
    """Sentence chunks without overlap: the engine reads every node, so overlap would be read twice."""
    return [SentenceSplitter(chunk_size=256, chunk_overlap=0)]


class QLLMIndex(SummaryIndex):
    """Documents read into one block memory, answered with the question passed separately.

    Nodes are kept in the docstore like a `SummaryIndex`; the memory is read on the first query from the node
    texts joined in order, and inserted nodes extend it. `index.persist(dir)` keeps the nodes and the memory,
    `QLLMIndex.from_storage(StorageContext.from_defaults(persist_dir=dir), persist_dir=dir)` loads both.
    Nodes are citation units, not retrieval units: unless `transformations` are
    given, documents are split into sentence chunks of 256 tokens without overlap. `engine`: a
    `QLLMEngine`, default the embedded model.
    """

    def __init__(self, *args: Any, engine: QLLMEngine | None = None,
                 transformations: list[TransformComponent] | None = None, **kwargs: Any) -> None:
        self._engine = engine
        self._memory: Memory | None = None
        self._memory_file: Path | None = None  # a persisted memory to load instead of reading
        self._spans: list[tuple[int, int, str]] = []  # (start, end, node_id) in the memory's context
        self._read_lock = threading.Lock()
        super().__init__(*args, transformations=transformations or _default_transformations(), **kwargs)

    @classmethod
    def from_documents(cls, documents: Sequence[Document],
                       transformations: list[TransformComponent] | None = None, **kwargs: Any) -> QLLMIndex:
        transformations = transformations or _default_transformations()
        return super().from_documents(documents, transformations=transformations, **kwargs)

    @classmethod
    def from_storage(cls, storage_context: StorageContext, index_id: str | None = None,
                     persist_dir: str | os.PathLike | None = None, **kwargs: Any) -> QLLMIndex:
        """Load a persisted QLLMIndex (`load_index_from_storage` would give a plain SummaryIndex). With the
        `persist_dir` given to `persist`, its saved memory is loaded on the first query instead of reading
        the nodes again (unless the nodes changed since); the engine must match the one that read it."""
        index_struct = storage_context.index_store.get_index_struct(index_id)
        if index_struct is None:
            raise ValueError(f"no index {index_id or ''} in this storage context; persist one first")
        index = cls(index_struct=index_struct, storage_context=storage_context, **kwargs)
        if persist_dir is not None:
            index._memory_file = _memory_file(persist_dir, index.index_id)
        return index

    def persist(self, persist_dir: str | os.PathLike, **kwargs: Any) -> None:
        """`storage_context.persist(persist_dir)`, plus the memory (if read) as `<index_id>.qmem` beside it;
        `from_storage(..., persist_dir=persist_dir)` then answers without reading the nodes again."""
        self.storage_context.persist(persist_dir=str(persist_dir), **kwargs)
        with self._read_lock:
            if self._memory is not None:
                self._memory.save(_memory_file(persist_dir, self.index_id))

    @property
    def engine(self) -> QLLMEngine:
        if self._engine is None:
            self._engine = shared_engine()
        return self._engine

    @property
    def memory(self) -> Memory:
        """The nodes read into block memory (on first use)."""
        with self._read_lock:
            if self._memory is None:
                nodes = self.docstore.get_nodes(self.index_struct.nodes)
                if not nodes:
                    raise ValueError("this QLLMIndex has no nodes: insert documents before querying it")
                texts = [node.get_content(MetadataMode.LLM) for node in nodes]
                self._spans, start = [], 0
                for node, text in zip(nodes, texts, strict=True):
                    self._spans.append((start, start + len(text), node.node_id))
                    start += len(text) + len(NODE_SEPARATOR)
                context = NODE_SEPARATOR.join(texts)
                self._memory = self._saved_memory(context) or self.engine.read(context)
            return self._memory

    def _saved_memory(self, context: str) -> Memory | None:
        """The memory persisted with the storage, if there is one and it holds `context`."""
        if self._memory_file is None or not self._memory_file.exists():
            return None
        memory = self.engine.load_memory(self._memory_file)
        if memory.context != context:
            log.warning("%s was saved from other nodes; reading the index again", self._memory_file)
            return None
        return memory

    def _insert(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        super()._insert(nodes, **insert_kwargs)
        with self._read_lock:
            if self._memory is not None:
                for node in nodes:
                    text = node.get_content(MetadataMode.LLM)
                    start = len(self._memory.context) + len(NODE_SEPARATOR)
                    self._memory.extend(NODE_SEPARATOR + text)
                    self._spans.append((start, start + len(text), node.node_id))

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        super()._delete_node(node_id, **delete_kwargs)
        with self._read_lock:
            self._memory = None  # memory cannot forget: read again on the next query

    def source_nodes(self, blocks: Sequence[BlockSpan]) -> list[NodeWithScore]:
        """Nodes overlapping the looked-up passages; score = their share of the lookups, best first."""
        total = sum(b.hits for b in blocks) or 1
        scores: dict[str, float] = {}
        for block in blocks:
            i = max(bisect_right(self._spans, block.start, key=itemgetter(0)) - 1, 0)  # spans are sorted
            while i < len(self._spans) and self._spans[i][0] < block.end:
                start, end, node_id = self._spans[i]
                overlap = min(end, block.end) - max(start, block.start)
                if overlap > 0:
                    share = block.hits / total * overlap / max(block.end - block.start, 1)
                    scores[node_id] = scores.get(node_id, 0.0) + share
                i += 1
        nodes = self.docstore.get_nodes(list(scores))
        return sorted((NodeWithScore(node=n, score=scores[n.node_id]) for n in nodes), key=lambda n: -n.score)

    def as_retriever(self, **kwargs: Any) -> QLLMRetriever:
        return QLLMRetriever(self, callback_manager=self._callback_manager)

    def as_query_engine(self, llm: Any = None, streaming: bool = False, **kwargs: Any) -> QLLMQueryEngine:
        """A query engine over the memory; `max_new_tokens`, `temperature`, `top_p`, `stop` and `seed` are
        passed to the engine, `llm` and other kwargs are not used (the index's engine answers)."""
        settings = {k: kwargs[k] for k in GENERATION_KEYS if k in kwargs}
        return QLLMQueryEngine(index=self, streaming=streaming, generation=settings,
                               callback_manager=self._callback_manager)


class QLLMRetriever(BaseRetriever):
    """The nodes a QLLMIndex's memory looks up for a question (the question turn only, no answer)."""

    def __init__(self, index: QLLMIndex, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._index = index

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        answer = self._index.memory.ask(query_bundle.query_str, max_new_tokens=1)
        return self._index.source_nodes(answer.blocks)


class QLLMQueryEngine(CustomQueryEngine):
    """Answers each query from a QLLMIndex's memory, the query passed as the question; `source_nodes` are
    the looked-up nodes (when streaming, filled once the stream is exhausted)."""

    index: QLLMIndex
    streaming: bool = False
    generation: dict[str, Any] = Field(default_factory=dict)

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        sources: list[NodeWithScore] = []
        deltas = self._deltas(query_str, sources)
        if self.streaming:
            return StreamingResponse(response_gen=deltas, source_nodes=sources)
        return Response("".join(deltas), source_nodes=sources)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        sources: list[NodeWithScore] = []
        deltas = pump(self._deltas(query_str, sources))
        if self.streaming:
            return AsyncStreamingResponse(response_gen=deltas, source_nodes=sources)
        return Response("".join([d async for d in deltas]), source_nodes=sources)

    def _deltas(self, query_str: str, sources: list[NodeWithScore]) -> TokenGen:
        """The answer's text pieces; once it is complete, the looked-up nodes are added to `sources`."""
        generation = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS} | self.generation
        with closing(self.index.memory.stream(query_str, **generation)) as stream:
            yield from stream
        sources.extend(self.index.source_nodes(stream.answer.blocks))


def _memory_file(persist_dir: str | os.PathLike, index_id: str) -> Path:
    return Path(persist_dir) / f"{index_id}.qmem"


# ---- agent tools ----------------------------------------------------------------------------------
def document_tools(documents: Sequence[Document], engine: QLLMEngine | None = None, return_direct: bool = False,
                   **query_kwargs: Any) -> list[QueryEngineTool]:
    """One QueryEngineTool per document, each over its own QLLMIndex (read on its first query).

    A tool is named after the document's `title` or `file_name` metadata (else its id) and described by
    its `description` metadata, if any. `return_direct`: the agent returns the tool's answer as is;
    `query_kwargs` go to `as_query_engine`.
    """
    tools, seen = [], set()
    for doc in documents:
        title = str(doc.metadata.get("title") or doc.metadata.get("file_name") or doc.doc_id)
        description = doc.metadata.get("description") or f"Answers questions about the document '{title}'."
        query_engine = QLLMIndex.from_documents([doc], engine=engine).as_query_engine(**query_kwargs)
        name = _tool_name(title, seen)
        tools.append(QueryEngineTool.from_defaults(query_engine, name, description, return_direct))
    return tools


def _tool_name(title: str, seen: set[str]) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]+", "_", title).strip("_").lower()[:48] or "document"
    name, n = base, 1
    while name in seen:
        n += 1
        name = f"{base}_{n}"
    seen.add(name)
    return name
