"""The public InfLLM code (github.com/thunlp/InfLLM, transformers 4.40.1) on the samples our benchmark asks.

Three steps; the middle one runs in an environment of its own (InfLLM patches transformers 4.40.1's
Llama / Qwen2 modules, which transformers 5 no longer has). This file imports nothing of ours at module level,
so one file serves both environments.

1. Our environment: the samples, as `quickllama-bench` generates them (same task, length, seed, index), with the
   prompt token ids our engine feeds (`PromptBuilder.ask_parts`: context, then the question, in one user turn of
   the chat template) and its stop ids; prints the HF copy of a GGUF model (in ~/.cache/quickllama)::

       python -m benchmarks.infllm_reference --write-samples /tmp/ref/samples.jsonl --model /tmp/q/model.gguf \\
           --lengths 32K --samples 2 --depths 10,30,50,70,90 --tasks niah

2. The reference environment: InfLLM's `patch_hf` with its Qwen config (config/qwen-inf-llm.yaml: n_init 128,
   n_local 4096, topk 16, block_size 128, repr_topk 4, chunk_size 2048; `--config small`: n_local 512, topk 8,
   block_size 64) and its `GreedySearch`, on the same prompt ids; scored with our task's scorer::

       python -m benchmarks.infllm_reference --run-reference /tmp/ref/samples.jsonl --infllm-repo /tmp/InfLLM \\
           --config qwen --out /tmp/ref/reference.jsonl      # --hf-model DIR: default, the one step 1 printed

3. Either environment: reference vs our `quickllama-bench` rows (results.json of a run with the same --tasks,
   --lengths, --samples, --depths and --seed, so the samples are the same), per (task, length)::

       python -m benchmarks.infllm_reference --compare results/X/results.json --out /tmp/ref/reference.jsonl

On the GPU box (python 3.12, torch 2.11, transformers 5.17, no internet), from the repo root, after carrying
`.whl-ref` and `.dev/infllm.tar.gz` (both git-ignored; run's carry=[".whl-ref", ".dev/infllm.tar.gz"]).
The wheels were fetched with::

    pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 -d .whl-ref \\
        transformers==4.40.1 tokenizers==0.19.1 huggingface-hub==0.23.4 safetensors requests urllib3 idna \\
        certifi charset-normalizer

and the checkout (thunlp/InfLLM 12b7079, 2024-04-20) with ``git archive --format=tar.gz HEAD > .dev/infllm.tar.gz``.
Then (the --target folder shadows the box's transformers, tokenizers and huggingface-hub only where PYTHONPATH
names it)::

    pip install --no-deps --no-index --target /tmp/ref-site .whl-ref/*.whl
    mkdir -p /tmp/InfLLM && tar -xzf .dev/infllm.tar.gz -C /tmp/InfLLM
    python -m benchmarks.infllm_reference --write-samples /tmp/ref/samples.jsonl --model /tmp/q/model.gguf \\
        --lengths 32K --samples 2 --depths 10,30,50,70,90 --tasks niah
    PYTHONPATH=/tmp/ref-site python -m benchmarks.infllm_reference --run-reference /tmp/ref/samples.jsonl \\
        --infllm-repo /tmp/InfLLM --config qwen --out /tmp/ref/reference.jsonl
    python -m benchmarks.infllm_reference --compare results/X/results.json --out /tmp/ref/reference.jsonl

InfLLM's torch attention is used (the yaml's fattn: false), so Triton is not needed. Without CUDA (smoke tests)
its hard-coded CUDA calls are redirected at run time (`_redirect_cuda`); the checkout is never edited.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

SMALL = {"n_local": 512, "topk": 8, "block_size": 64}  # `--config small`: the qwen yaml with these
KEY = ("task", "length", "seed", "sample", "query")


def write_samples(args: argparse.Namespace) -> None:
    """Our environment: one JSONL line per (sample, query), with the prompt ids our engine would feed."""
    from transformers import AutoTokenizer, GenerationConfig

    from benchmarks import data
    from benchmarks.cli import _tasks, parse_length
    from benchmarks.tasks import generate
    from qllm_runtime import loading
    from qllm_runtime.prompt import PromptBuilder

    source = Path(args.model) if args.model else loading.default_gguf_path()
    hf_dir = loading._converted_gguf(source) if source.is_file() else source  # the engine's cached HF copy
    print(f"HF copy of the model: {hf_dir.resolve()}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    try:
        generation = GenerationConfig.from_pretrained(hf_dir)
    except OSError:
        generation = None
    prompts, counter = PromptBuilder(tokenizer), data.TokenCounter(tokenizer)
    stop_ids = sorted(prompts.stop_token_ids(generation))
    depths = [float(d) / 100 for d in args.depths.split(",")]
    out = Path(args.write_samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for length in map(parse_length, args.lengths.split(",")):
            for task in _tasks(args.tasks.split(","), None):
                for seed in args.seed:
                    for s in generate(task, counter, length, seed, args.samples, depths,
                                      same_questions=args.same_questions):
                        for q_index, q in enumerate(s.queries):
                            parts = prompts.ask_parts(s.context, q.question)
                            f.write(json.dumps({
                                "task": s.task, "length": s.length, "seed": s.seed, "sample": s.index,
                                "query": q_index, "depth": q.depth, "subject": q.subject, "expected": list(q.answers),
                                "question": q.question, "context": s.context, "context_tokens": s.context_tokens,
                                "max_new_tokens": task.max_new_tokens, "stop_ids": stop_ids,
                                "prompt_ids": parts.context.ids + parts.turn_ids, "hf_model": str(hf_dir.resolve()),
                            }) + "\n")
                print(f"{task.name} @ {length}: written", flush=True)
    print(f"wrote {out}")


class _NoStream:
    """A CUDA stream or event with nothing to wait for (one CPU device)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass


class _CpuCuda:
    Stream = Event = _NoStream

    @staticmethod
    def stream(_stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def current_stream() -> _NoStream:
        return _NoStream()


class _CpuTorch:
    """`torch` as InfLLM's context manager and RoPE see it on CPU: device="cuda" allocations land on the CPU."""

    cuda = _CpuCuda

    def __init__(self, torch: Any) -> None:
        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._torch, name)
        if name not in ("empty", "zeros", "arange"):
            return value

        def on_cpu(*args: Any, device: Any = None, **kwargs: Any) -> Any:
            return value(*args, device="cpu" if device == "cuda" else device, **kwargs)

        return on_cpu


def _redirect_cuda() -> None:
    """Run InfLLM without CUDA: it allocates on "cuda" (context_manager.CudaCache, VectorTensor; rope.py),
    uses torch.cuda streams and events (context_manager), asserts `is_cuda` (ContextManager.init) and moves the
    input with `.cuda()` (greedy_search.py). Only for smoke tests; never used where CUDA exists."""
    import torch

    shim = _CpuTorch(torch)
    manager = importlib.import_module("inf_llm.attention.context_manager")
    for module in (manager, importlib.import_module("inf_llm.attention.rope")):
        module.torch = shim
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    init = manager.ContextManager.init

    def init_on_cpu(self: Any, *args: Any) -> Any:
        torch.Tensor.is_cuda = property(lambda _t: True)
        try:
            return init(self, *args)
        finally:
            del torch.Tensor.is_cuda

    manager.ContextManager.init = init_on_cpu


def _load_reference(hf_dir: Path, device: str, dtype: Any) -> tuple[Any, Any]:
    """Model and tokenizer for transformers 4.40.1 from an HF folder saved by transformers 5: its RoPE base moved
    into `rope_parameters`, its tokenizer class is new and tokenizers 0.19 reads merges only as "a b" strings."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    raw = json.loads((hf_dir / "config.json").read_text())
    rope = raw.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"RoPE scaling {rope} is not supported by this shim")
    if "rope_theta" in rope:
        raw["rope_theta"] = rope["rope_theta"]
    raw.pop("dtype", None)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=config, torch_dtype=dtype, attn_implementation="eager")
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    merges = spec["model"].get("merges") or []
    if merges and isinstance(merges[0], list):
        if any(" " in part for pair in merges for part in pair):
            raise SystemExit("a merge holds a space: cannot write it in tokenizers 0.19's format")
        spec["model"]["merges"] = [" ".join(pair) for pair in merges]
    special = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        **{k: v for k, v in special.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")
           and isinstance(v, str)},
    )
    return model.to(device).eval(), tokenizer


def run_reference(args: argparse.Namespace) -> list[dict]:
    """The reference environment: InfLLM's patch_hf + GreedySearch over every sample, rows appended to --out."""
    import torch
    import yaml

    repo = Path(args.infllm_repo).resolve()
    sys.path.insert(0, str(repo))
    from inf_llm.utils import GreedySearch, patch_hf

    from benchmarks.tasks import Query, registry  # pure Python: our scorers, without transformers or torch

    conf = yaml.safe_load((repo / "config" / "qwen-inf-llm.yaml").read_text())
    infllm = {**conf["model"], **(SMALL if args.config == "small" else {})}
    for k in ("path", "base"):  # base: Qwen1.5's RoPE theta; patch_hf reads the model's own without it
        infllm.pop(k)
    samples = _read_jsonl(Path(args.run_reference))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        _redirect_cuda()
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf_dir = Path(args.hf_model or samples[0]["hf_model"])
    model, tokenizer = _load_reference(hf_dir, device, dtype)
    model = patch_hf(model, infllm.pop("type"), attn_kwargs={}, **infllm)
    print(f"InfLLM {args.config}: {infllm}, chunk_size {conf['chunk_size']}, RoPE base "
          f"{model.model.position_bias.base}, {device} {dtype}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    method = f"infllm-ref[{args.config}]"
    done = {_key(r) for r in _read_jsonl(out) if r["method"] == method}
    tasks, search = registry(), GreedySearch(model, tokenizer)
    with out.open("a") as f:
        for s in samples:
            if _key(s) in done:
                continue
            t0 = time.perf_counter()
            ids = torch.tensor(s["prompt_ids"], device=device)
            text = search.generate(input_ids=ids, max_length=s["max_new_tokens"], chunk_size=conf["chunk_size"],
                                   extra_end_token_ids=list(s["stop_ids"]))[0]
            search.clear()
            query = Query(s["question"], tuple(s["expected"]), s["subject"], (), s["depth"])
            score = tasks[s["task"].split("[")[0]].score(text, query)
            row = {**{k: s[k] for k in (*KEY, "depth", "subject", "expected")}, "method": method,
                   "prediction": text, "score": score, "prompt_tokens": len(s["prompt_ids"]),
                   "wall_s": time.perf_counter() - t0, "error": None}
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{s['task']} {s['length']} #{s['sample']} depth {s['depth']}: {score:g} {text!r:.80} "
                  f"({row['wall_s']:.1f}s)", flush=True)
    return _read_jsonl(out)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _pct(scores: list[float]) -> str:
    return f"{100 * sum(scores) / len(scores):.0f} ({len(scores)})" if scores else "–"


def summary(rows: list[dict]) -> str:
    """Accuracy per (task, length) of the reference rows, as Markdown: percent (samples)."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        cells[r["method"], r["task"], r["length"]].append(r["score"])
    lines = ["| method | task | length | accuracy % (n) |", "|---|---|---:|---:|"]
    lines += [f"| {m} | {t} | {n} | {_pct(v)} |" for (m, t, n), v in sorted(cells.items())]
    return "\n".join(lines)


def compare(ours_path: Path, ref_rows: list[dict]) -> str:
    """Per (task, length), on the samples both runs scored: each reference config's accuracy and our methods'."""
    ours = [r for r in json.loads(ours_path.read_text())["rows"] if r.get("error") is None]
    ref = [r for r in ref_rows if r["score"] is not None]
    common = {_key(r) for r in ref} & {_key(r) for r in ours}
    columns = list(dict.fromkeys(r["method"] for r in ref + ours))
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ref + ours:
        if _key(r) in common:
            cells[r["task"], r["length"]][r["method"]].append(r["score"])
    lines = ["| task | length | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for (task, length), by in sorted(cells.items()):
        lines.append(f"| {task} | {length} | " + " | ".join(_pct(by.get(c, [])) for c in columns) + " |")
    return "\n".join(lines) + f"\n\naccuracy % (samples) on the {len(common)} (sample, query) pairs both runs scored"


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write-samples", metavar="FILE", help="our env: write the samples as JSONL")
    mode.add_argument("--run-reference", metavar="SAMPLES", help="reference env: run InfLLM over the samples")
    mode.add_argument("--compare", metavar="OURS_JSON", help="results.json of quickllama-bench vs --out")
    p.add_argument("--model", help="GGUF file or HF directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--tasks", default="niah")
    p.add_argument("--lengths", default="32K")
    p.add_argument("--samples", type=int, default=2, help="per seed (NIAH: per depth), as quickllama-bench")
    p.add_argument("--depths", default="10,30,50,70,90", help="NIAH needle depths in percent")
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--same-questions", action="store_true",
                   help="the same questions at every length, as quickllama-bench")
    p.add_argument("--infllm-repo", help="a checkout of thunlp/InfLLM")
    p.add_argument("--hf-model", help="HF directory (default: the one the samples name)")
    p.add_argument("--config", choices=["qwen", "small"], default="qwen")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (no CUDA only)")
    p.add_argument("--out", help="reference rows (JSONL); an existing file is resumed")
    args = p.parse_args(argv)
    if args.write_samples:
        write_samples(args)
        return
    if not args.out:
        p.error("--run-reference and --compare need --out")
    if args.run_reference:
        if not args.infllm_repo:
            p.error("--run-reference needs --infllm-repo")
        print(summary(run_reference(args)))
    else:
        print(compare(Path(args.compare), _read_jsonl(Path(args.out))))


if __name__ == "__main__":
    main()
