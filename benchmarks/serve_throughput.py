"""Ray Serve replicas (`quickllama serve --ray`): questions/s of N replicas vs 1, many concurrent questions over
several documents (issue #14).

    # CPU (2 cores: 1 replica on 1 thread vs 2 replicas on 1 thread each)
    python -m benchmarks.serve_throughput --device cpu --replicas 1 2 --documents 4 --questions 16 \\
        --concurrency 4 --doc-tokens 2048 --out serve_cpu.json
    # 2-GPU box (Ray gives each replica one GPU; `--model Qwen/Qwen2.5-0.5B-Instruct` for a larger model)
    python -m benchmarks.serve_throughput --device cuda --replicas 1 2 --documents 8 --questions 256 \\
        --concurrency 16 --doc-tokens 32768 --out serve_2gpu.json

For each replica count the app of `qllm_integrations.ray_serve.app_builder` runs on a local Ray instance, with a
fresh store: the D synthetic documents (seeded filler sentences with a few "secret animal" facts) are posted to
`/v1/documents` by C concurrent clients (the read phase), then Q questions, round-robin over the documents, by C
concurrent clients to `/v1/chat/completions` (greedy). Every answer must be non-empty and equal to the first
run's answer to the same (document, question). Serve is shut down between runs. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from qllm_runtime.cli import haystack

COLORS = ["blue", "red", "green", "yellow", "purple", "orange", "silver", "black"]
ANIMALS = ["giraffe", "penguin", "kangaroo", "flamingo", "tortoise", "octopus", "hedgehog", "zebra"]
TOKENS_PER_SENTENCE = 11  # of `haystack` sentences, SmolLM2's tokenizer (answers report the true count)


def document(index: int, n_tokens: int, n_facts: int) -> tuple[str, dict[str, str]]:
    """(text, color → animal): seeded filler of about `n_tokens` tokens, `n_facts` facts spread through it."""
    rng = random.Random(1000 + index)
    sentences = haystack(max(n_facts, n_tokens // TOKENS_PER_SENTENCE), 1000 + index)
    facts = dict(zip(COLORS[:n_facts], rng.sample(ANIMALS, n_facts), strict=True))
    for k, (color, animal) in enumerate(facts.items()):
        sentences.insert((2 * k + 1) * len(sentences) // (2 * n_facts), f"The secret animal of the {color} vault "
                         f"is a {animal}.")
    return " ".join(sentences), facts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(client: httpx.Client, doc_id: str, question: str, max_tokens: int) -> tuple[str, float, int]:
    """(answer, latency s, context tokens) of one greedy question about a document."""
    t0 = time.perf_counter()
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": question}], "document": doc_id, "max_tokens": max_tokens,
        "temperature": 0})
    latency = time.perf_counter() - t0
    response.raise_for_status()
    body = response.json()
    return body["choices"][0]["message"]["content"], latency, body["usage"]["prompt_tokens_details"]["cached_tokens"]


def run(replicas: int, args: argparse.Namespace, texts: list[str],
        questions: list[tuple[int, str]]) -> tuple[dict[str, Any], list[str]]:
    """One replica count: (figures, answers in `questions`' order)."""
    from ray import serve

    from qllm_integrations.ray_serve import app_builder

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="qllm-serve-bench-") as store:
        t0 = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(app_builder({"model": args.model, "device": args.device, "store": store, "replicas": replicas,
                                   "max_new_tokens": args.max_tokens, "cached_documents": args.cached_documents}),
                      name="quickllama-bench", route_prefix="/")
            start_s = time.perf_counter() - t0
            limits = httpx.Limits(max_connections=args.concurrency)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=args.timeout, limits=limits) as client, \
                    ThreadPoolExecutor(args.concurrency) as pool:
                t0 = time.perf_counter()
                posted = pool.map(lambda text: client.post("/v1/documents", json={"text": text}), texts)
                ids = [response.raise_for_status().json()["id"] for response in posted]
                read_s = time.perf_counter() - t0
                time.sleep(0.5)  # the replicas' multiplexed ids reach the router (pushed every 0.1 s)
                t0 = time.perf_counter()
                results = list(pool.map(lambda q: ask(client, ids[q[0]], q[1], args.max_tokens), questions))
                question_s = time.perf_counter() - t0
        finally:
            serve.shutdown()
    answers, latencies, tokens = zip(*results, strict=True)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"replicas": replicas, "start_s": start_s, "read_s": read_s, "questions": len(questions),
            "question_s": question_s, "qps": len(questions) / question_s, "p50_s": cuts[49], "p95_s": cuts[94],
            "context_tokens": statistics.mean(tokens)}, list(answers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts, run in order")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="a replica's device (default: its GPU, else the CPU)")
    parser.add_argument("--model", default=None, help="HF directory, hub id or .gguf (default: the embedded model)")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--doc-tokens", type=int, default=2048, help="about this many tokens per document")
    parser.add_argument("--facts", type=int, default=4, help="facts (distinct questions) per document")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per answer")
    parser.add_argument("--cached-documents", type=int, default=None,
                        help="memories each replica holds (default: all the documents, so none is reloaded)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica (OMP_NUM_THREADS)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per HTTP request")
    parser.add_argument("--out", help="write the figures and answers as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.facts <= len(COLORS):
        parser.error(f"--facts: 1 to {len(COLORS)}")
    args.cached_documents = args.cached_documents or args.documents
    import torch

    from qllm_integrations.ray_serve import replica_resources

    _, resources = replica_resources(args.device, max(args.replicas))
    if "num_gpus" in resources and max(args.replicas) > torch.cuda.device_count():  # else serve.run waits
        parser.error(f"each replica takes a GPU: at most {torch.cuda.device_count()} replicas")

    docs = [document(i, args.doc_tokens, args.facts) for i in range(args.documents)]
    questions = [(i % args.documents, (i // args.documents) % args.facts) for i in range(args.questions)]
    asked = [(d, f"What is the secret animal of the {COLORS[k]} vault?") for d, k in questions]
    expected = [docs[d][1][COLORS[k]] for d, k in questions]

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the Ray processes started here
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    t0 = time.perf_counter()
    runs, reference, problems = [], None, []
    try:
        for n in args.replicas:
            figures, answers = run(n, args, [text for text, _ in docs], asked)
            reference = reference or answers
            problems += [f"{n} replicas, document {d}, {q!r}: {a!r}" + ("" if a else " (empty)")
                         + ("" if a == r else f" != {r!r} (first run)")
                         for (d, q), a, r in zip(asked, answers, reference, strict=True) if not a or a != r]
            figures["correct"] = sum(e in a.lower() for e, a in zip(expected, answers, strict=True))
            runs.append({**figures, "answers": answers})
            print(json.dumps(figures), flush=True)
    finally:
        ray.shutdown()
    wall_s = time.perf_counter() - t0
    for figures in runs:
        figures["speedup"] = figures["qps"] / runs[0]["qps"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall_s, "problems": problems, "runs": runs}, f, indent=1)
    for problem in problems:
        print("MISMATCH", problem, file=sys.stderr)
    print(f"\n{args.documents} documents of ~{runs[0]['context_tokens']:.0f} tokens, {args.questions} questions "
          f"({args.max_tokens} tokens each), {args.concurrency} clients, device {args.device or 'default'}, "
          f"{args.threads} thread(s) per replica; {wall_s:.0f} s in all; answers "
          f"{'all equal to the first run' if not problems else f'{len(problems)} PROBLEMS'}\n")
    print(f"| replicas | read s | questions | q/s | p50 s | p95 s | speed-up vs {runs[0]['replicas']} replica(s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['replicas']} | {r['read_s']:.1f} | {r['questions']} | {r['qps']:.2f} | {r['p50_s']:.2f} "
              f"| {r['p95_s']:.2f} | {r['speedup']:.2f}x |")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
