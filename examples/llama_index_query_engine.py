"""LlamaIndex query engines over a document longer than the model's 8K-token window.

1. `QLLMIndex`: the document is read into block memory once; each query is passed to the engine as the
   question (it picks the blocks every layer looks up), and the response's source nodes are the nodes
   of the passages looked up. A second query, streamed, reuses the memory.
2. A stock `SummaryIndex` with `QLLM` as its LLM: `QLLM` advertises its memory capacity as the context
   window, so the compact synthesizer sends the whole document in one call, and `QLLM` hands the
   engine the document and the question separately.

Run: python examples/llama_index_query_engine.py   (embedded SmolLM2-135M-Instruct, CPU is fine)
"""

from __future__ import annotations

import random
import time

from llama_index.core import Document, SummaryIndex

from qllm_integrations.llama_index import QLLM, QLLMIndex
from qllm_runtime import QLLMConfig, QLLMEngine

FACT = "The secret password for the blue vault is 4172."
QUESTION = "What is the secret password for the blue vault?"
CLOSING = "At the end of the year the town choir sang in the old mill."


def town_chronicle(n_paragraphs: int, seed: int = 0) -> str:
    """Seeded paragraphs of everyday sentences, with one memorable fact near the start."""
    rng = random.Random(seed)
    who = ["The baker", "A gardener", "The old sailor", "My neighbour", "The teacher", "A young painter",
           "The mayor", "The librarian", "A fisherman", "The doctor"]
    did = ["walked to", "looked at", "talked about", "painted", "visited", "cleaned", "repaired", "described"]
    what = ["the quiet harbour", "a red bicycle", "the village market", "an old bridge", "the green valley",
            "a wooden boat", "the town hall", "a small garden", "the stone chapel", "a noisy cafe"]
    when = ["in the morning", "after lunch", "before the rain started", "with great care", "on a sunny day",
            "while humming a song", "for the third time", "without saying a word"]
    paragraphs = [" ".join(f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(when)}."
                           for _ in range(8)) for _ in range(n_paragraphs)]
    return "\n\n".join([*paragraphs[:3], FACT, *paragraphs[3:], CLOSING])


def main() -> None:
    document = Document(text=town_chronicle(n_paragraphs=110), metadata={"title": "Town chronicle"})
    # the embedded model with small windows (sinks 16, local 256, top-4 blocks of 64): most of the document
    # is reached only through block lookups
    engine = QLLMEngine.default(QLLMConfig(n_init=16, n_local=256, block_size=64, topk=4, lookup_chunk=128))
    index = QLLMIndex.from_documents([document], engine=engine)  # read on the first query
    print(f"document: {index.engine.count_tokens(document.text)} tokens in {len(index.index_struct.nodes)} "
          "nodes (the model was trained on 8K)")

    start = time.perf_counter()
    response = index.as_query_engine(max_new_tokens=32).query(QUESTION)
    print(f"\nQ: {QUESTION}\nA: {response}  ({time.perf_counter() - start:.0f} s, reading included)")
    print("source nodes (share of the lookups):")
    for source in response.source_nodes[:3]:
        text = source.node.get_content().replace("\n", " ")
        print(f"  {source.score:.2f}  {source.node.node_id[:8]}  {text[:90]}...")
    fact_node = next(s.node.node_id for s in response.source_nodes if FACT in s.node.get_content())
    print(f"  (the fact is in node {fact_node[:8]})")

    question = "Where did the town choir sing at the end of the year?"
    start = time.perf_counter()
    streaming = index.as_query_engine(streaming=True, max_new_tokens=32).query(question)
    print(f"\nQ: {question}\nA: ", end="")
    streaming.print_response_stream()
    print(f"  ({time.perf_counter() - start:.1f} s from memory, {len(streaming.source_nodes)} source nodes)")

    llm = QLLM(engine=engine, max_new_tokens=32)
    start = time.perf_counter()
    answer = SummaryIndex.from_documents([document]).as_query_engine(llm=llm).query(QUESTION)
    print(f"\nSummaryIndex + QLLM (one call, context window {llm.metadata.context_window:,} tokens):\n"
          f"A: {answer}  ({time.perf_counter() - start:.0f} s, document read with the question's lookups)")


if __name__ == "__main__":
    main()
