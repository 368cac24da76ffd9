"""Time and peak memory against context length, for the four modes, each measured in a fresh process.

    python -m benchmarks.scaling --lengths 2048 4096 8192 16384 32768 --modes full streaming infllm qllm

Each (mode, length) runs `engine.ask` once on synthetic filler of that many tokens in a subprocess, so
the peak resident memory (CPU) or peak allocated memory (CUDA) belongs to that run alone. Reported:
read time (prefill), ms per generated token, peak memory above the loaded model, as JSON lines and a
markdown table with ratios against full attention measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WINDOWS = dict(n_init=64, n_local=512, block_size=64, topk=8, lookup_chunk=256, prefill_chunk=4096,
               full_within_window=False)


def measure(mode: str, length: int, model: str | None, device: str | None, new_tokens: int) -> dict:
    import torch

    from qllm_runtime import QLLMConfig, QLLMEngine
    from qllm_runtime.cli import haystack

    config = QLLMConfig(mode=mode, **WINDOWS)
    engine = (QLLMEngine.from_pretrained(model, config, device=device) if model
              else QLLMEngine.default(config, device=device))
    cuda = engine.device.type == "cuda"
    engine.ask("Warm-up text. " * 50, "Why?", max_new_tokens=2)
    sentences = haystack(length // 8, seed=1)
    while engine.count_tokens(" ".join(sentences)) < length:
        sentences += haystack(length // 64 + 1, seed=len(sentences))
    context = " ".join(sentences)
    ids = engine.prompts.encode(context)[:length]
    context = engine.tokenizer.decode(ids)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    answer = engine.ask(context, "What did the mayor carry?", max_new_tokens=new_tokens)
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    t = answer.timings
    return {
        "mode": mode, "tokens": answer.usage.context_tokens, "device": str(engine.device),
        "read_s": round(t.read_s, 3), "wall_s": round(wall, 3),
        "decode_ms": round(1000 * t.generate_s / max(answer.usage.generated_tokens, 1), 1),
        "peak_gb": round(peak / 2**30, 3),
    }


def table(rows: list[dict]) -> str:
    full = {r["tokens"]: r for r in rows if r["mode"] == "full" and "error" not in r}
    lines = ["| mode | tokens | read s | decode ms/token | peak GB over model | read time vs full |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["mode"], r["tokens"])):
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['tokens']} | {r['error']} | | | |")
            continue
        ref = full.get(r["tokens"])
        ratio = f"{r['read_s'] / ref['read_s']:.2f}×" if ref else "full not run"
        lines.append(f"| {r['mode']} | {r['tokens']} | {r['read_s']:.2f} | {r['decode_ms']:.1f} | "
                     f"{r['peak_gb']:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--modes", nargs="+", default=["full", "streaming", "infllm", "qllm"])
    parser.add_argument("--model")
    parser.add_argument("--device")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--full-max", type=int, default=1 << 30, help="skip full attention above this length")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="scaling.jsonl")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = measure(args.one[0], int(args.one[1]), args.model, args.device, args.new_tokens)
        print(json.dumps(row))
        return
    rows = []
    for length in args.lengths:
        for mode in args.modes:
            if mode == "full" and length > args.full_max:
                rows.append({"mode": mode, "tokens": length, "error": "skipped (too slow)"})
                continue
            cmd = [sys.executable, "-m", "benchmarks.scaling", "--one", mode, str(length),
                   "--new-tokens", str(args.new_tokens)]
            cmd += ["--model", args.model] if args.model else []
            cmd += ["--device", args.device] if args.device else []
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                row = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                       else {"mode": mode, "tokens": length, "error": done.stderr.strip().splitlines()[-1][:80]})
            except subprocess.TimeoutExpired:
                row = {"mode": mode, "tokens": length, "error": f"timeout > {args.timeout:.0f} s"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
