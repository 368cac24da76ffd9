"""Check and time the Triton kernels against their torch references and SDPA, at LLaMA-3-8B head shapes.

    python benchmarks/kernel_bench.py              # on the GPU box: bf16, 32 heads / 8 kv heads, d=128
    python benchmarks/kernel_bench.py --sweep      # ... and the attention kernels' launch shapes tried one by one
    python benchmarks/kernel_bench.py --cpu-smoke  # tiny shapes in Triton's CPU interpreter: is it broken?

Every case is first checked against the qllm_runtime reference evaluated in fp32 on the same inputs;
times are the median of `--reps` runs after `--warmup` runs, synchronised. SDPA runs dense attention
over the same number of keys (K/V repeated to all heads beforehand, so it can use its fastest kernel).
The table comes last; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _import_project():
    """(qllm_kernels, attend_reference, block_scores_reference, select_blocks), installed or from ROOT."""
    sys.path.append(str(ROOT))  # qllm_runtime when the project is not installed
    try:
        import qllm_kernels
    except ImportError:  # not installed: map kernels/ to qllm_kernels as pyproject's package-dir does
        folder = ROOT / "kernels"
        spec = importlib.util.spec_from_file_location(
            "qllm_kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        qllm_kernels = importlib.util.module_from_spec(spec)
        sys.modules["qllm_kernels"] = qllm_kernels
        spec.loader.exec_module(qllm_kernels)
    from qllm_runtime.attention import attend_reference
    from qllm_runtime.lookup import block_scores_reference, select_blocks

    return qllm_kernels, attend_reference, block_scores_reference, select_blocks


def _timer(device, warmup: int, reps: int) -> Callable[[Callable[[], object]], float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def median_ms(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return median_ms


def _rope_tables(n_pos, head_dim, device, base=500000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def _device_ms(device, fn: Callable[[], object], reps: int = 20) -> float:
    """GPU time of the kernels one call of `fn` launches (torch profiler, kernels only: the host's launch time, which
    the synchronised `median_ms` includes, is left out); nan off CUDA."""
    if device.type != "cuda":
        return math.nan
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
    kernels_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                     for e in prof.key_averages() if not e.key.startswith(("aten::", "cuda")))
    return kernels_us / reps / 1e3


def attention_case(heads, kv_heads, head_dim, n_q, n_local, n_far, dtype, device, gen, ordered=False):
    """One lookup group: n_local local keys behind each query; far keys: init + blocks, then a remainder;
    ordered: packed in document order against the remainder's end (the engine's default far positions)."""
    n_loc = n_local + n_q - 1
    q_start = 4 * n_far + n_loc
    local_start = q_start + n_q - n_loc
    n_rem = n_far // 10  # remainder straddling the far threshold of the group's queries
    rem_end = q_start + n_q - n_local
    far_pos = torch.cat([torch.arange(n_far - n_rem), torch.arange(rem_end - n_rem, rem_end)])

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    cos, sin = _rope_tables(max(n_local, n_loc) + n_far + 1, head_dim, device)
    return dict(
        query=randn(heads, n_q, head_dim), q_start=q_start, local_start=local_start,
        local_k=randn(kv_heads, n_loc, head_dim), local_v=randn(kv_heads, n_loc, head_dim),
        far_k=randn(kv_heads, n_far, head_dim), far_v=randn(kv_heads, n_far, head_dim),
        far_pos=far_pos.to(device), cos=cos, sin=sin, n_local=n_local, scaling=head_dim**-0.5,
        far_origin=rem_end - n_far if ordered else None,
        received=torch.zeros(heads, n_loc, dtype=torch.float32, device=device),  # as the engine reads: summed into
    )  # fmt: skip


def _close(qk, attend_reference, case) -> tuple[float, bool]:
    """(max abs error, within bf16 tolerance) of the kernel against the fp32 reference on `case`."""
    exact = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in case.items()}
    received, ref_received = (torch.zeros_like(case["received"]) for _ in range(2))
    out = qk.attention(**{**case, "received": received})
    ref_out = attend_reference(**{**exact, "received": ref_received})
    err = max((out.float() - ref_out).abs().max().item(), (received - ref_received).abs().max().item())
    ok = torch.allclose(out.float(), ref_out, rtol=2e-2, atol=2e-2) and torch.allclose(
        received, ref_received, rtol=2e-2, atol=2e-2
    )
    return err, ok


def sweep(qk, attend_reference, cases, median_ms, out: str | None = None) -> int:
    """Time `attention` (both kernels) on each case under each launch shape of `qllm_kernels.attention.LAUNCH`,
    one kernel's shapes at a time (the other at its best so far), each checked against the reference; prints each
    shape's times as it goes, then per kernel the fastest, and the best shapes (also written to `out` as JSON after
    each kernel). Returns 1 if a checked shape was wrong."""
    launch = sys.modules["qllm_kernels.attention"].LAUNCH
    default = {name: dict(shape) for name, shape in launch.items()}
    grid = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
            for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
    failed = 0
    print(f"sweep over {', '.join(cases)}; ms, the whole attention call; defaults {default}")
    for name in ("forward", "received"):
        timed = []
        for shape in grid:
            launch[name] = shape
            try:
                ok = all(_close(qk, attend_reference, c)[1] for c in cases.values())
                times = [median_ms(lambda c=c: qk.attention(**c)) for c in cases.values()]
            except Exception as e:  # a shape the compiler refuses (e.g. out of shared memory)
                print(f"  {name} {shape}: {type(e).__name__}: {str(e)[:120]}")
                continue
            failed |= not ok
            timed.append((sum(times), shape, ok))
            print(f"  {name} {' '.join(f'{t:7.3f}' for t in times)}  {shape}{'' if ok else '  WRONG'}", flush=True)
        timed.sort(key=lambda row: row[0])
        launch[name] = next((shape for _, shape, ok in timed if ok), default[name])
        print(f"{name}: fastest {[(round(total, 3), shape) for total, shape, _ in timed[:3]]}")
        if out:
            Path(out).write_text(json.dumps(launch))
    print(f"best: LAUNCH = {launch}")
    return failed


def run(args) -> int:
    qk, attend_reference, block_scores_reference, select_blocks = _import_project()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if not qk.triton_available(device):
        sys.exit(f"Triton cannot run on {device} here (no CUDA device?); try --cpu-smoke")
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    median_ms = _timer(device, args.warmup, args.reps)
    # heads, kv_heads, head_dim, n_local, n_far, queries per prefill group, blocks, lookup groups
    shapes = (32, 8, 128, 1024, 1200, 512, 800, (1, 8, 64, 200))
    if args.cpu_smoke:
        shapes = (4, 2, 64, 16, 20, 8, 30, (1, 3))
    heads, kv_heads, head_dim, n_local, n_far, prefill, n_blocks, groups = shapes
    rows, failed = [], False

    cases = {f"{kind} n_q={n_q}": attention_case(heads, kv_heads, head_dim, n_q, n_local, n_far, dtype, device, gen,
                                                   ordered=kind == "ordered")
             for n_q in (prefill, 1) for kind in ("ordered", "shared")}
    if args.sweep:  # on the prefill groups, where the time goes (decode rows take BLOCK_M 16 whatever is set)
        prefill_cases = {label: case for label, case in cases.items() if case["query"].shape[1] > 1}
        failed |= sweep(qk, attend_reference, prefill_cases, median_ms, args.launch_out)
    split = sys.modules["qllm_kernels.attention"].SPLIT
    runs = split["max_splits"]
    for kind in ("ordered", "shared"):  # decode once more with its key tiles unsplit: the split's GPU time vs none
        cases[f"{kind} n_q=1 unsplit"] = cases[f"{kind} n_q=1"]
    for label, case in cases.items():
        split["max_splits"] = 1 if label.endswith("unsplit") else runs
        err, ok = _close(qk, attend_reference, case)
        group = heads // kv_heads
        n_keys = case["local_k"].shape[1] + n_far
        q4 = case["query"][None]
        k4 = torch.cat([case["local_k"], case["far_k"]], 1).repeat_interleave(group, 0)[None]
        v4 = torch.cat([case["local_v"], case["far_v"]], 1).repeat_interleave(group, 0)[None]
        rows.append((
            "attention", f"{label} keys={n_keys}", median_ms(lambda c=case: qk.attention(**c)),
            _device_ms(device, lambda c=case: qk.attention(**c)), median_ms(lambda c=case: attend_reference(**c)),
            median_ms(lambda q=q4, k=k4, v=v4: F.scaled_dot_product_attention(q, k, v)), err, ok,
        ))  # fmt: skip
        failed |= not ok
    split["max_splits"] = runs

    repr_keys = torch.randn(n_blocks, heads, head_dim, generator=gen).to(device, dtype)
    question = torch.randn(n_blocks, generator=gen).to(device)

    def reference_scores(group_queries):
        return block_scores_reference(group_queries, repr_keys, question, 4.0)

    for n_groups in groups:
        group_queries = torch.randn(n_groups, heads, head_dim, generator=gen).to(device, dtype)
        scores, indices = qk.block_score(group_queries, repr_keys, question, 4.0, 8)
        ref = reference_scores(group_queries)
        err = (scores - ref).abs().max().item()
        best = ref.gather(1, select_blocks(ref, 8))  # tie-robust: the chosen blocks score as well as the best
        ok = torch.allclose(scores, ref, rtol=1e-3, atol=1e-2) and torch.allclose(
            ref.gather(1, indices), best, rtol=1e-3, atol=1e-2
        )
        t_kernel = median_ms(lambda g=group_queries: qk.block_score(g, repr_keys, question, 4.0, 8))
        t_gpu = _device_ms(device, lambda g=group_queries: qk.block_score(g, repr_keys, question, 4.0, 8))
        t_ref = median_ms(lambda g=group_queries: select_blocks(reference_scores(g), 8))
        shape = f"groups={n_groups} blocks={n_blocks}"
        rows.append(("block_score", shape, t_kernel, t_gpu, t_ref, math.nan, err, ok))
        failed |= not ok
    for row in _model_step_rows(qk, device, dtype, gen, median_ms, small=args.cpu_smoke):
        rows.append(row)
        failed |= not row[-1]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    versions = f"torch {torch.__version__}, triton {sys.modules['triton'].__version__}"
    print(f"\n{name}, {versions}, {dtype}, heads {heads}/{kv_heads}, head_dim {head_dim}, "
          f"n_local {n_local}, n_far {n_far}; median of {args.reps} synchronised calls from the host, ms; "
          "triton gpu: its kernels' GPU time a call")  # fmt: skip
    header = ("op", "shape", "triton", "triton gpu", "torch ref", "sdpa", "x ref", "x sdpa", "max err")
    print("{:<12}{:<36}{:>9}{:>11}{:>11}{:>9}{:>8}{:>8}{:>10}  ok".format(*header))
    for op, shape, t_kernel, t_gpu, t_ref, t_sdpa, err, ok in rows:
        print(f"{op:<12}{shape:<36}{t_kernel:>9.3f}{t_gpu:>11.3f}{t_ref:>11.3f}{t_sdpa:>9.3f}{t_ref / t_kernel:>8.2f}"
              f"{t_sdpa / t_kernel:>8.2f}{err:>10.2e}  {'yes' if ok else 'NO'}")  # fmt: skip
    return int(failed)


def _model_step_rows(qk, device, dtype, gen, median_ms, small: bool) -> list[tuple]:
    """The block store (a prefill group's 4 blocks into float8) and the model's RMSNorm (a prefill chunk's rows),
    checked against their references and timed as the attention rows."""
    from qllm_runtime.blocks import Planes, store_reference
    from qllm_runtime.norms import rms_norm_reference

    kv_heads, block_size, head_dim, count, rows, hidden = (2, 16, 64, 2, 8, 64) if small else (8, 128, 128, 4, 8192,
                                                                                              4096)
    tail = torch.randn(2, kv_heads, count * block_size, head_dim, generator=gen).to(device, dtype)
    k, v = (t.unflatten(1, (count, block_size)).transpose(0, 1) for t in tail)  # views, as the engine passes them

    def planes():
        bits = [torch.empty((count, kv_heads, block_size, head_dim), dtype=torch.uint8, device=device) for _ in "kv"]
        return Planes(*bits, *[torch.empty((count, kv_heads), device=device) for _ in "kv"])

    got, want = planes(), planes()
    qk.store_blocks(k, v, got.held())
    store_reference(k, v, want)
    ok = all(torch.equal(a, b) for a, b in zip(got.tensors(), want.tensors(), strict=True))
    def store():
        qk.store_blocks(k, v, got.held())

    store_rows = [("store", f"fp8 blocks={count} bs={block_size}", median_ms(store), _device_ms(device, store),
                   median_ms(lambda: store_reference(k, v, want)), math.nan, 0.0 if ok else math.inf, ok)]
    x = (3 * torch.randn(rows, hidden, generator=gen)).to(device, dtype)
    weight = (1 + torch.randn(hidden, generator=gen)).to(device, dtype)
    want_x = rms_norm_reference(x, weight, 1e-5)
    got_x = qk.rms_norm(x, weight, 1e-5)
    err = (got_x.float() - want_x.float()).abs().max().item()
    ok = torch.allclose(got_x.float(), want_x.float(), rtol=2 * 2**-7, atol=1e-6)  # kernel tests' bound, bf16
    return [*store_rows, ("rms_norm", f"rows={rows} hidden={hidden}", median_ms(lambda: qk.rms_norm(x, weight, 1e-5)),
                          _device_ms(device, lambda: qk.rms_norm(x, weight, 1e-5)),
                          median_ms(lambda: rms_norm_reference(x, weight, 1e-5)), math.nan, err, ok)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, CPU, TRITON_INTERPRET=1")
    parser.add_argument("--sweep", action="store_true", help="time the attention kernels' launch shapes first")
    parser.add_argument("--launch-out", help="--sweep: write the best launch shapes here (JSON)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10, smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default 50, smoke 2)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 10)
    args.reps = args.reps if args.reps is not None else (2 if args.cpu_smoke else 50)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported (in run)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
