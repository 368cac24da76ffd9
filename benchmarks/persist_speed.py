"""Saved memories: time to load a `.qmem` vs time to read the document again (BENCHMARKS.md §6).

    OMP_NUM_THREADS=1 python -m benchmarks.persist_speed --lengths 8192 32768

The embedded model with EMBEDDED_MODEL_CONFIG on the CPU reads filler text of each length, saves the memory,
loads it, and checks that both answer a question with the same text. One JSON line per length.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qllm_runtime import QLLMEngine
from qllm_runtime.cli import DEMO_QUESTION, demo_document


def document(engine: QLLMEngine, n_tokens: int) -> str:
    """The demo's needle in filler sentences, about `n_tokens` tokens long."""
    sentences = max(1, n_tokens * 850 // engine.count_tokens(demo_document(850, 0.3, 1)[0]))
    return demo_document(sentences, 0.3, 1)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    engine = QLLMEngine.default(device=args.device)
    for n_tokens in args.lengths:
        text = document(engine, n_tokens)
        t0 = time.perf_counter()
        memory = engine.read(text)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            path = memory.save(Path(folder) / "doc.qmem")
            t2 = time.perf_counter()
            loaded = engine.load_memory(path)
            t3 = time.perf_counter()
            size = path.stat().st_size
        same = memory.ask(DEMO_QUESTION, max_new_tokens=8).text == loaded.ask(DEMO_QUESTION, max_new_tokens=8).text
        del memory, loaded
        print(json.dumps({"tokens": n_tokens, "read_s": round(t1 - t0, 2), "save_s": round(t2 - t1, 2),
                          "load_s": round(t3 - t2, 2), "load_vs_read": round((t3 - t2) / (t1 - t0), 4),
                          "file_mib": round(size / 2**20, 1), "same_answer": same}), flush=True)


if __name__ == "__main__":
    main()
