"""GPU speed and memory of the engine against stock SDPA full attention, on a LLaMA-3-8B-shaped model.

    python -m benchmarks.gpu_speed --lengths 32768 100000 --profile-length 32768
    python -m benchmarks.gpu_speed --gpus 2 --lengths 1000000 --no-full --offload-lengths  # layers split over 2 GPUs
    python -m benchmarks.gpu_speed --kv-dtype float8_e4m3 --lengths 100000 1000000 --no-full --offload-lengths
    python -m benchmarks.gpu_speed --lengths 100000 --offload-lengths --far-positions ordered shared
    python -m benchmarks.gpu_speed --lengths 100000 --profile-length 100000 --profile-decode 16   # decode breakdown
    python -m benchmarks.gpu_speed --lengths 32768 --no-full --host-profile-length 100000   # host time by function

Random bf16 weights of the real shape (speed and memory only, never accuracy). Full attention is one
forward of the stock model (SDPA) with a DynamicCache, then single-token decode steps. QuickLLaMA reads
the same tokens through its block memory (chunked prefill), then decodes. Each length reports prefill
seconds, decode ms/token and peak GPU memory, and the ratios against full attention measured in the same
run; `--far-positions ordered shared` times the device pool with each far-position scheme (rows `qllm` and
`qllm_shared`); the offload variant (a `--offload-gb` device pool, blocks beyond it in pinned host memory) reads
each `--offload-lengths` length twice: `qllm_offload`, a first reading, which page-locks its host memory, and
`qllm_offload_again`, a later one, which reuses it (PyTorch keeps freed pinned memory for reuse), as a server
reading one document after another does; `--profile-length` adds a breakdown of GPU time by stage (linear layers,
attention kernel, lookup, copies, other) and the host time the GPU sat idle, of that reading or, with
`--profile-decode N`, of N decode steps after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qllm_runtime.question import Question

QLLM_WINDOWS = dict(n_init=128, n_local=1024, block_size=128, topk=8, repr_topk=4, lookup_chunk=512,
                    prefill_chunk=8192, question_weight=4.0)


def llama3_8b(layers: int, gpus: int = 1):
    """The model on cuda:0, or with its layers split evenly over `gpus` GPUs (accelerate's dispatch_model)."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if gpus > 1:
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": gpus - 1, "lm_head": gpus - 1}
        device_map.update({f"model.layers.{i}": i * gpus // layers for i in range(layers)})
        model = dispatch_model(model, device_map=device_map)
    return model.eval()


def synchronize() -> None:
    for device in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device)


def reset_peaks() -> None:
    torch.cuda.empty_cache()
    for device in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(device)


def peaks_gb() -> list[float]:
    """Peak allocated memory of each GPU since `reset_peaks`."""
    return [torch.cuda.max_memory_allocated(device) / 2**30 for device in range(torch.cuda.device_count())]


def word_tokenizer():
    """A one-word tokenizer: the engine needs one, the benchmark feeds token ids directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def timed(fn):
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - t0


def run_full(model, ids: list[int], decode_steps: int) -> dict:
    from transformers import DynamicCache

    reset_peaks()
    cache = DynamicCache(config=model.config)
    x = torch.tensor([ids], device="cuda")
    with torch.inference_mode():
        _, prefill = timed(lambda: model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1))
        steps = []
        for i in range(decode_steps):
            token = torch.tensor([[ids[i]]], device="cuda")
            pos = torch.tensor([[len(ids) + i]], device="cuda")
            _, dt = timed(lambda t=token, p=pos: model(input_ids=t, position_ids=p, past_key_values=cache,
                                                      use_cache=True, logits_to_keep=1))
            steps.append(dt)
    return {"prefill_s": prefill, "decode_ms": 1000 * statistics.median(steps), "peak_gb": peaks_gb()}


def asking_session(engine, n_tokens: int):
    """A block-memory reading of `n_tokens` tokens as when a question is asked: a random 16-token question after a
    4-token header is set (its vectors bias the reading; its queries choose the evidence, `choose_evidence`)."""
    session = engine._new_session(n_tokens)
    heads, head_dim = engine.model.config.num_attention_heads, engine._head_dim
    devices = [layer.self_attn.o_proj.weight.device for layer in engine.model.model.layers]
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> dict[int, torch.Tensor]:  # on each layer's GPU
        return {i: torch.randn(*shape, generator=generator).to(devices[i]) for i in range(engine._n_layers)}

    session.set_question(Question(random(heads, head_dim), random(heads, 16, head_dim), random(heads, 4, head_dim)))
    return session


def choose_evidence(engine, session) -> None:
    """Fix the evidence every layer attends while answering, as the engine does after reading."""
    if (evidence := engine._evidence_blocks()) is not None:
        session.choose_evidence(evidence)


def run_qllm(engine, ids: list[int], decode_steps: int) -> dict:
    """Prefill, then decode steps as the engine runs them (a replayed CUDA graph where it can), then as many
    steps launched from Python (`decode_eager_ms`: the graph set aside). `prefill_host_s`: when the host had launched
    the whole reading; equal to `prefill_s` when the host is the bottleneck, less when the GPU is (by no more than the
    work the launch queue holds: milliseconds)."""
    reset_peaks()
    session = asking_session(engine, len(ids) + 2 * decode_steps)
    synchronize()
    t0 = time.perf_counter()
    session.feed(ids)
    host = time.perf_counter() - t0  # when the host had launched the reading: = prefill when the GPU waits on it
    synchronize()
    prefill = time.perf_counter() - t0
    choose_evidence(engine, session)
    steps = [timed(lambda t=t: session.feed([t]))[1] for t in ids[:decode_steps]]
    graph, session.decode_graph = session.decode_graph, None
    eager = [timed(lambda t=t: session.feed([t]))[1] for t in ids[decode_steps : 2 * decode_steps]]
    session.decode_graph = graph
    layer = next(iter(session.memory.layers.values()))
    result = {"prefill_s": prefill, "prefill_host_s": host, "decode_ms": 1000 * statistics.median(steps),
              "decode_first_ms": 1000 * steps[0],  # with a graph: the step that records it
              "decode_eager_ms": 1000 * statistics.median(eager), "decode_graph": graph is not None and graph.recorded,
              "peak_gb": peaks_gb(), "blocks_per_layer": layer.n_blocks, "offloaded_per_layer": layer.store.offloaded}
    return result


STAGES = [  # (stage, substrings of CUDA kernel names), first match wins
    ("attention kernel", ("_attn", "_received", "_combine", "attention_kernel", "_local_far")),
    ("lookup (score, top-k)", ("block_score", "_score", "_top_chunk", "_top_merge", "topk", "sort", "radix")),
    ("linear layers (GEMM)", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas")),
    ("copies / gathers", ("copy", "memcpy", "index", "gather", "scatter", "cat", "elementwise_kernel_with_index")),
]


def profile_breakdown(engine, ids: list[int], decode_steps: int = 0) -> dict:
    """GPU time by stage and the host time the GPU sat idle: of reading `ids`, or (decode_steps > 0) of that many
    single-token steps after reading them unprofiled; as `run_qllm` times them (a question set, its evidence chosen)."""
    from torch.profiler import ProfilerActivity, profile

    session = asking_session(engine, len(ids) + decode_steps)
    if decode_steps:
        session.feed(ids)
        choose_evidence(engine, session)
        ids = ids[:decode_steps]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # kernels only: tracing the host slows it down
        if decode_steps:
            _, wall = timed(lambda: [session.feed([t]) for t in ids])
        else:
            _, wall = timed(lambda: session.feed(ids))
    totals: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        gpu_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if gpu_us <= 0 or event.key.startswith("aten::") or event.key.startswith("cuda"):
            continue
        name = event.key.lower()
        stage = next((s for s, keys in STAGES if any(k in name for k in keys)), "other kernels")
        totals[stage] = totals.get(stage, 0.0) + gpu_us / 1e6
        kernels.append({"kernel": event.key[:120], "stage": stage, "calls": event.count, "gpu_s": gpu_us / 1e6})
    busy = sum(totals.values())
    top = sorted(kernels, key=lambda k: -k["gpu_s"])[:20]
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_idle_s": max(wall - busy, 0.0), "stages_s": totals,
            "top_kernels": top}


def host_profile(engine, ids: list[int], lines: int = 25) -> str:
    """cProfile of reading `ids` (a question set, as `run_qllm`): the host functions by their own time."""
    import cProfile
    import io
    import pstats

    session = asking_session(engine, len(ids))
    synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    session.feed(ids)
    synchronize()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 100000])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--offload-gb", type=float, default=2.0, help="device pool budget of the offload variant")
    parser.add_argument("--offload-lengths", type=int, nargs="*", default=[100000])
    parser.add_argument("--profile-length", type=int, default=0, help="profile reading this many tokens")
    parser.add_argument("--profile-decode", type=int, default=0,
                        help="with --profile-length: profile this many decode steps after the reading instead")
    parser.add_argument("--profile-offload", action="store_true",
                        help="profile the offload variant (a --offload-gb pool) instead of the device pool")
    parser.add_argument("--host-profile-length", type=int, default=0,
                        help="cProfile reading this many tokens: host time by function (the --profile-offload variant "
                        "or the device pool)")
    parser.add_argument("--no-full", action="store_true")
    parser.add_argument("--full-max", type=int, default=None, help="full attention only up to this many tokens")
    parser.add_argument("--gpus", type=int, default=1, help="split the layers evenly over this many GPUs")
    parser.add_argument("--kv-dtype", choices=["auto", "float8_e4m3"], default="auto", help="block storage")
    parser.add_argument("--far-positions", choices=["ordered", "shared"], nargs="+", default=["ordered"],
                        help="far-position schemes of the device pool; the first is row `qllm`, others `qllm_NAME`")
    parser.add_argument("--out", default="gpu_speed.json")
    args = parser.parse_args()

    from qllm_runtime import QLLMConfig, QLLMEngine

    model = llama3_8b(args.layers, args.gpus)
    tokenizer = word_tokenizer()
    windows = {**QLLM_WINDOWS, "kv_dtype": args.kv_dtype}
    first = args.far_positions[0]
    pools = {("qllm" if p == first else f"qllm_{p}"): QLLMEngine(
        model, tokenizer, QLLMConfig(offload="device", far_positions=p, **windows)) for p in args.far_positions}
    offloaded = QLLMEngine(model, tokenizer, QLLMConfig(offload="auto", device_pool_gb=args.offload_gb,
                                                        far_positions=first, **windows))
    rng = torch.Generator().manual_seed(0)
    warm = torch.randint(0, 128000, (4096,), generator=rng).tolist()
    for engine in [*pools.values(), offloaded]:
        run_qllm(engine, warm, 2)
    if not args.no_full:
        run_full(model, warm, 2)
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, 128000, (length,), generator=rng).tolist()
        row = {"tokens": length}
        if not args.no_full and length <= (args.full_max or length):
            try:
                row["full"] = run_full(model, ids, args.decode_steps)
            except torch.cuda.OutOfMemoryError:
                row["full"] = {"error": "out of memory"}
        for name, engine in pools.items():
            row[name] = run_qllm(engine, ids, args.decode_steps)
        if length in args.offload_lengths:  # a first reading page-locks its host memory; the next reuses it
            row["qllm_offload"] = run_qllm(offloaded, ids, args.decode_steps)
            row["qllm_offload_again"] = run_qllm(offloaded, ids, args.decode_steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name(), "gpus": args.gpus, "torch": torch.__version__,
              "config": {**windows, "far_positions": args.far_positions},
              "rows": rows}
    if args.profile_length:
        ids = torch.randint(0, 128000, (args.profile_length,), generator=rng).tolist()
        report["profile"] = {"tokens": args.profile_length, "decode_steps": args.profile_decode,
                             "engine": "qllm_offload" if args.profile_offload else "qllm",
                             **profile_breakdown(offloaded if args.profile_offload else pools["qllm"], ids,
                                                 args.profile_decode)}
        print(json.dumps(report["profile"]), flush=True)
    if args.host_profile_length:
        ids = torch.randint(0, 128000, (args.host_profile_length,), generator=rng).tolist()
        report["host_profile"] = host_profile(offloaded if args.profile_offload else pools["qllm"], ids)
        print(report["host_profile"], flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{args.gpus} × {report['device']}, torch {report['torch']}, LLaMA-3-8B shape ({args.layers} layers), bf16")
    print("| tokens | method | prefill s | host done s | decode ms/tok | without graph | peak GB per GPU "
          "| prefill vs full | decode vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        full = row.get("full", {})
        for method in ("full", *pools, "qllm_offload", "qllm_offload_again"):
            r = row.get(method)
            if not r:
                continue
            if "error" in r:
                print(f"| {row['tokens']} | {method} | {r['error']} | | | | | | |")
                continue
            peaks = " / ".join(f"{gb:.1f}" for gb in r["peak_gb"][: args.gpus])
            ratio = (f"{r['prefill_s'] / full['prefill_s']:.2f}× | {r['decode_ms'] / full['decode_ms']:.2f}×"
                     if "prefill_s" in full else "– | –")
            eager = f"{r['decode_eager_ms']:.1f}" if "decode_eager_ms" in r else "–"
            host = f"{r['prefill_host_s']:.2f}" if "prefill_host_s" in r else "–"
            print(f"| {row['tokens']} | {method} | {r['prefill_s']:.2f} | {host} | {r['decode_ms']:.1f} | {eager} "
                  f"| {peaks} | {ratio} |")


if __name__ == "__main__":
    main()
