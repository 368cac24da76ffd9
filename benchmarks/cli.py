"""`quickllama-bench`: tasks × context lengths × methods (× swept configs) on one model, as JSON and tables.

    quickllama-bench --preset small                       # CPU, embedded model, ~10 minutes
    quickllama-bench --preset full --device cuda          # GPU box: 4K-128K
    quickllama-bench --tasks niah --lengths 4K,8K --methods qllm,infllm --sweep question_weight=0,1,4
    quickllama-bench plot results/DIR                     # NIAH heat-map from a results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.tasks import Task
    from qllm_runtime import QLLMConfig, QLLMEngine

PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "tasks": ["passkey", "niah"],
        "lengths": [2048, 8192],
        "methods": ["full", "streaming", "infllm", "qllm", "qllm-read"],
        "samples": 1,
        "depths": [0.5],
    },
    "full": {
        "tasks": ["passkey", "niah", "kv", "squad", *(f"babilong-qa{n}" for n in range(1, 6))],
        "lengths": [4096, 16384, 32768, 65536, 131072],
        "methods": ["full", "streaming", "infllm", "qllm", "qllm-read"],
        "samples": 3,
        "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    },
}


def parse_length(text: str) -> int:
    """'4K' -> 4096, '1000' -> 1000."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def parse_value(text: str) -> Any:
    """A config value from the command line: int, float, bool, None or string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _key_values(items: Sequence[str], flag: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"quickllama-bench: {flag} takes key=value[,value...], got {item!r}")
        out[key.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    return out


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="quickllama-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="defaults for everything below (default: small)")
    p.add_argument("--tasks", type=_csv,
                   help="comma list: passkey, niah, kv, squad, babilong-qa1..5, babilong (= qa1-qa5)")
    p.add_argument("--lengths", type=lambda s: [parse_length(x) for x in _csv(s)],
                   help="context lengths in tokens of the model's tokenizer, e.g. 4K,16K")
    p.add_argument("--methods", type=_csv, help="comma list: full, streaming, infllm, qllm, qllm-read")
    p.add_argument("--samples", type=int, help="samples per task, length and seed (NIAH: per depth)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (default: 0)")
    p.add_argument("--depths", type=lambda s: [float(x) / 100 for x in _csv(s)],
                   help="NIAH needle depths in percent, e.g. 0,50,100")
    p.add_argument("--questions", type=int, default=1,
                   help="questions per context for kv and squad (default: 1)")
    p.add_argument("--model", help="HF directory, GGUF file or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default: cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype (auto: bfloat16 on CUDA, as loaded elsewhere)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's; 1 is far faster on a busy machine)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="QLLMConfig override for every method, e.g. --set n_local=1024")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="QLLMConfig values to sweep, e.g. --sweep question_weight=0,1,4")
    p.add_argument("--book", help="plain-text book for BABILong filler (default: the Paul Graham essays)")
    p.add_argument("--out", type=Path, help="results folder (default: results/<preset>-<time>)")
    return p


def _tasks(names: Sequence[str], book: str | None) -> list[Task]:
    from benchmarks.tasks import registry

    known = registry(book)
    babilong = [f"babilong-qa{i}" for i in range(1, 6)]
    expanded = [n for name in names for n in (babilong if name == "babilong" else [name])]
    unknown = [n for n in expanded if n not in known]
    if unknown:
        choices = ", ".join([*known, "babilong"])
        raise SystemExit(f"quickllama-bench: unknown tasks {unknown}; choose from {choices}")
    return [known[n] for n in expanded]


def _load(args: argparse.Namespace, base: QLLMConfig) -> QLLMEngine:
    """The engine whose model and tokenizer every method shares, on the asked device and dtype."""
    import torch

    from qllm_runtime import QLLMEngine

    engine = (QLLMEngine.from_pretrained(args.model, config=base) if args.model
              else QLLMEngine.default(config=base))
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if args.dtype == "auto" and device.type == "cuda":
        dtype = torch.bfloat16
    engine.model.to(device=device, dtype=dtype)
    return engine


def _say(start: float, text: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {text}", file=sys.stderr, flush=True)


def _write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    tmp.replace(out / "results.json")


def run(argv: Sequence[str] | None = None, engine: QLLMEngine | None = None) -> int:
    """Run the benchmark; returns 1 if any sample failed, else 0.

    `engine`: an already loaded QLLMEngine whose model and tokenizer to use, and whose config --set
    amends (--model, --device and --dtype are then ignored).
    """
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    tasks = _tasks(args.tasks or preset["tasks"], args.book)
    lengths = args.lengths or preset["lengths"]
    samples = args.samples if args.samples is not None else preset["samples"]
    depths = args.depths or preset["depths"]

    from benchmarks import data, report
    from benchmarks.runner import Runner, expand_methods
    from benchmarks.tasks import generate
    from qllm_runtime import QLLMConfig

    sets = _key_values(args.set, "--set")
    if any(len(v) > 1 for v in sets.values()):
        raise SystemExit("quickllama-bench: --set takes one value per key; use --sweep to try several")
    try:
        base = QLLMConfig.model_validate({**(engine.config.model_dump() if engine else {}),
                                         **{k: v[0] for k, v in sets.items()}})
        methods = expand_methods(args.methods or preset["methods"], _key_values(args.sweep, "--sweep"))
        for m in methods:
            m.config(base)  # fail on a bad sweep value before loading anything
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise SystemExit(f"quickllama-bench: {e}") from e
    out = args.out or Path("results") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    engine = engine or _load(args, base)

    weight = next(engine.model.parameters())
    meta = {
        "argv": list(sys.argv[1:] if argv is None else argv), "preset": args.preset,
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "device": str(weight.device), "dtype": str(weight.dtype), "base_config": base.model_dump(),
        "methods": [m.label for m in methods], "torch": torch.__version__,
        "transformers": transformers.__version__, "host": platform.node(), "threads": torch.get_num_threads(),
        "load_s": time.perf_counter() - start,
    }
    runner = Runner(engine.model, engine.tokenizer, base)
    counter = data.TokenCounter(engine.tokenizer)
    rows: list[dict[str, Any]] = []
    for length in sorted(lengths):
        for task in tasks:
            t0 = time.perf_counter()
            batch = [s for seed in args.seed
                     for s in generate(task, counter, length, seed, samples, depths, args.questions)]
            _say(start, f"{task.name} @ {length}: {len(batch)} contexts in {time.perf_counter() - t0:.1f}s")
            for method in methods:
                new = list(runner.run(method, task, batch))
                rows += new
                ok = [r["score"] for r in new if r["error"] is None]
                _say(start, f"  {method.label:<24} score {sum(ok):g}/{len(ok)}  errors {len(new) - len(ok)}")
                meta["wall_s"] = time.perf_counter() - start
                _write(out, meta, rows)
    summary = report.summarize(rows)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    heatmap = report.plot_niah(rows, out / "niah_heatmap.png")
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'}" + (f", {heatmap}" if heatmap else "")
          + f" in {meta['wall_s']:.0f}s")
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        print(f"{len(errors)} rows failed; first: {errors[0]}", file=sys.stderr)
    return int(bool(errors))


def plot(argv: Sequence[str]) -> int:
    """`quickllama-bench plot DIR`: draw DIR/niah_heatmap.png from DIR/results.json."""
    from benchmarks import report

    parser = argparse.ArgumentParser(prog="quickllama-bench plot", description=plot.__doc__)
    parser.add_argument("results", type=Path, help="a results folder (or its results.json)")
    args = parser.parse_args(argv)
    path = args.results / "results.json" if args.results.is_dir() else args.results
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    png = report.plot_niah(rows, path.parent / "niah_heatmap.png")
    print(png or f"no NIAH rows in {path}")
    return 0 if png else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `quickllama-bench [options]` runs, `quickllama-bench plot DIR` draws."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return plot(argv[1:]) if argv[:1] == ["plot"] else run(argv)


if __name__ == "__main__":
    sys.exit(main())
