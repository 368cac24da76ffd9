"""The `quickllama demo` needle over several seeds and config variants, on one loaded model (BENCHMARKS.md §5).

    python -m benchmarks.demo_needle --seeds 1-8 "" far_positions=shared "far_positions=shared,topk=32"

Each variant is a comma list of QLLMConfig fields applied over the demo's windows and the library defaults
(`""` = no change); every variant reads the same documents. Prints one line per (seed, variant) and a tally.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.cli import parse_value
from qllm_runtime import QLLMConfig, QLLMEngine
from qllm_runtime.cli import DEMO_CONFIG, DEMO_QUESTION, demo_document


def variant(text: str) -> dict:
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {key: parse_value(value) for key, _, value in pairs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help='comma lists of QLLMConfig fields, "" for the defaults')
    parser.add_argument("--seeds", default="1-8", help="first-last")
    args = parser.parse_args(argv)
    first, _, last = args.seeds.partition("-")
    engine = QLLMEngine.default()
    found = dict.fromkeys(args.variants, 0)
    seeds = range(int(first), int(last or first) + 1)
    for seed in seeds:
        context, _, animal = demo_document(850, 0.3, seed)
        for text in args.variants:
            config = QLLMConfig(**{**DEMO_CONFIG, **variant(text)})
            t0 = time.perf_counter()
            answer = QLLMEngine(engine.model, engine.tokenizer, config).ask(context, DEMO_QUESTION, max_new_tokens=16)
            hit = animal in answer.text.lower()
            found[text] += hit
            print(f"seed {seed} [{text}] {'found' if hit else 'missed'} {answer.text[:60]!r} "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    for text, n in found.items():
        print(f"[{text}] {n} / {len(seeds)}")


if __name__ == "__main__":
    main()
