"""`quickllama-bench`: tasks × context lengths × methods (× swept configs) on one model, as JSON and tables.

    quickllama-bench --preset small                       # CPU, embedded model, ~10 minutes
    quickllama-bench --preset full --device cuda          # GPU box: 4K-128K
    quickllama-bench --tasks niah --lengths 4K,8K --methods qllm,infllm --sweep question_weight=0,1,4
    quickllama-bench --tasks niah,kv,json-kv,table,code --question-style exact,paraphrase,typos,verbose
    quickllama-bench --tasks niah,squad --lengths 16K,32K,64K --same-questions  # one question set, every length
    quickllama-bench --preset full --device cuda --jobs 8 # 8 worker processes share the GPU (small models)
    quickllama-bench report results/A results/B --out results/AB   # merge runs: summary and heat-maps
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import report

if TYPE_CHECKING:
    from benchmarks.runner import Method
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
        "tasks": ["passkey", "niah", "niah-word", "kv", "squad", "json-kv", "table", "code",
                  *(f"babilong-qa{n}" for n in range(1, 6))],
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
                   help="comma list: passkey, niah, niah-word, kv, squad, json-kv, table, code, babilong-qa1..5, "
                   "babilong (= qa1-qa5)")
    p.add_argument("--lengths", type=lambda s: [parse_length(x) for x in _csv(s)],
                   help="context lengths in tokens of the model's tokenizer, e.g. 4K,16K")
    p.add_argument("--methods", type=_csv,
                   help="comma list: full, qllm-read or a lookup policy (qllm, infllm, streaming, random)")
    p.add_argument("--samples", type=int, help="samples per task, length and seed (NIAH: per depth)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (default: 0)")
    p.add_argument("--depths", type=lambda s: [float(x) / 100 for x in _csv(s)],
                   help="NIAH needle depths in percent, e.g. 0,50,100")
    p.add_argument("--questions", type=int, default=1,
                   help="questions per context for kv, squad, json-kv, table and code (default: 1)")
    p.add_argument("--question-style", type=_csv, default=["exact"],
                   help="comma list of wordings to ask each question in, all over the same contexts: exact, "
                   "paraphrase (reworded), typos (a few letters swapped, dropped or doubled, never in the key looked "
                   "up), verbose (irrelevant words around it); a style's rows go by task[style], e.g. niah[typos]; "
                   "squad and babilong are asked exactly only (default: exact)")
    p.add_argument("--same-questions", action="store_true",
                   help="every length asks the same questions: sample i hides the same facts at the same depths, "
                   "only the filler differs (default: drawn per length)")
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
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, each running one (length, task, method) at a time on the same "
                   "device; a small model leaves the GPU idle between its kernels, so 4-8 finish sooner")
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


def _styles(names: Sequence[str]) -> list[str]:
    from benchmarks.tasks import QUESTION_STYLES

    if not names or any(n not in QUESTION_STYLES for n in names):
        raise SystemExit(f"quickllama-bench: --question-style takes a comma list of {', '.join(QUESTION_STYLES)}; "
                         f"got {','.join(names)!r}")
    return list(dict.fromkeys(names))


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


def run(argv: Sequence[str] | None = None, engine: QLLMEngine | None = None) -> int:
    """Run the benchmark; returns 1 if any sample failed (or, with --jobs, a worker ended before writing one), else 0.

    `engine`: an already loaded QLLMEngine whose model and tokenizer to use, and whose config --set
    amends (--model, --device and --dtype are then ignored; with --jobs above 1 each worker loads its own).
    """
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    tasks = _tasks(args.tasks or preset["tasks"], args.book)
    styles = _styles(args.question_style)
    lengths = args.lengths or preset["lengths"]
    samples = args.samples if args.samples is not None else preset["samples"]
    depths = args.depths or preset["depths"]

    from benchmarks import data
    from benchmarks.runner import Runner, expand_methods
    from benchmarks.tasks import generate
    from qllm_runtime import EMBEDDED_MODEL_CONFIG, QLLMConfig

    sets = _key_values(args.set, "--set")
    if args.jobs < 1:
        raise SystemExit(f"quickllama-bench: --jobs takes a count of 1 or more, got {args.jobs}")
    if any(len(v) > 1 for v in sets.values()):
        raise SystemExit("quickllama-bench: --set takes one value per key; use --sweep to try several")
    try:
        start = engine.config if engine else QLLMConfig() if args.model else EMBEDDED_MODEL_CONFIG
        base = QLLMConfig.model_validate({**start.model_dump(), **{k: v[0] for k, v in sets.items()}})
        methods = expand_methods(args.methods or preset["methods"], _key_values(args.sweep, "--sweep"))
        for m in methods:
            m.config(base)  # fail on a bad sweep value before loading anything
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise SystemExit(f"quickllama-bench: {e}") from e
    out = args.out or Path("results") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    if args.jobs > 1:
        units = [(n, t.name, m) for n in sorted(lengths, reverse=True) for t in tasks for m in methods]
        return _run_workers(list(sys.argv[1:] if argv is None else argv), units, args.jobs, out)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    engine = engine or _load(args, base)

    weight = next(engine.model.parameters())
    meta = {
        "argv": list(sys.argv[1:] if argv is None else argv), "preset": args.preset,
        "same_questions": args.same_questions,
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
                     for s in generate(task, counter, length, seed, samples, depths, args.questions, styles,
                                       same_questions=args.same_questions)]
            _say(start, f"{task.name} @ {length}: {len(batch)} contexts in {time.perf_counter() - t0:.1f}s")
            for method in methods:
                new = []
                for row in runner.run(method, task, batch):  # written row by row: a stopped run keeps them
                    new.append(row)
                    rows.append(row)
                    meta["wall_s"] = time.perf_counter() - start
                    report.write(out, meta, rows, maps=False)
                ok = [r["score"] for r in new if r["error"] is None]
                _say(start, f"  {method.label:<24} score {sum(ok):g}/{len(ok)}  errors {len(new) - len(ok)}")
    meta["complete"] = True
    return _finish(out, meta, rows)


def _finish(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    """Write the results, print the summary and what was written; 1 if any row failed."""
    written = report.write(out, meta, rows)
    print(report.summarize(rows) if rows else "no results")
    print("wrote " + ", ".join(map(str, written)) + (f" in {meta['wall_s']:.0f}s" if "wall_s" in meta else ""))
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        print(f"{len(errors)} rows failed; first: {errors[0]}", file=sys.stderr)
    return int(bool(errors))


def _merged(parts: Sequence[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The metas and rows of several results.json files (missing ones skipped); a row of a later file
    replaces an earlier row of the same question, sample, length, task and method (a re-run)."""
    metas, rows = [], {}
    for path in parts:
        if path.is_file():
            result = json.loads(path.read_text(encoding="utf-8"))
            metas.append(result["meta"])
            for r in result["rows"]:
                rows[r["task"], r["length"], r["seed"], r["sample"], r["query"], r["method"]] = r
    return {"merged": metas}, list(rows.values())


def _complete(path: Path, argv: Sequence[str]) -> bool:
    """Whether `path` holds the results of a finished run of the command line `argv`."""
    if not path.is_file():
        return False
    meta = json.loads(path.read_text(encoding="utf-8"))["meta"]
    return meta.get("complete", False) and meta["argv"] == list(argv)


def _without_sweeps(argv: Sequence[str]) -> list[str]:
    """`argv` less its --sweep options."""
    out: list[str] = []
    skip = False
    for token in argv:
        if not skip and token != "--sweep" and not token.startswith("--sweep="):
            out.append(token)
        skip = token == "--sweep" and not skip
    return out


def _run_workers(argv: list[str], units: list[tuple[int, str, Method]], jobs: int, out: Path) -> int:
    """Run each (length, task, method) in its own process, `jobs` at a time, longest first; merge as they go.

    Workers re-read this command line with their unit appended (the last value of an option wins; a
    swept method gets its one combination as its sweep).
    Stopping the parent (Ctrl-C, SIGTERM) stops the workers and still writes what finished; the same
    command with the same --out later skips the units that completed with the same options.
    """
    import signal
    import subprocess

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `timeout` signals the whole group: once is enough
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    start = time.perf_counter()
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    pending, running, results, died = [], {}, [], []
    base_argv = _without_sweeps(argv)
    for length, task, method in units:
        part = parts / re.sub(r"[^A-Za-z0-9._-]+", "_", f"{length}-{task}-{method.label}").strip("_")
        sweeps = [x for k, v in method.overrides for x in ("--sweep", f"{k}={v}")]
        worker_argv = [*base_argv, "--jobs", "1", "--tasks", task, "--lengths", str(length),
                       "--methods", method.kind, *sweeps, "--out", str(part)]
        if _complete(part / "results.json", worker_argv):
            results.append(part / "results.json")
        else:
            pending.append((part, worker_argv))
    _say(start, f"{len(units)} units: {len(results)} already complete, {len(pending)} to run, {jobs} at a time")
    merged_at = 0.0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                part, worker_argv = pending.pop(0)
                part.mkdir(exist_ok=True)
                results.append(part / "results.json")
                cmd = [sys.executable, "-m", "benchmarks.cli", *worker_argv]
                with open(part / "log.txt", "w", encoding="utf-8") as log:
                    running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)] = part.name
                _say(start, f"started {part.name} ({len(pending)} waiting)")
            time.sleep(1)
            finished = [p for p in running if p.poll() is not None]
            for proc in finished:
                name = running.pop(proc)
                _say(start, f"finished {name} (exit {proc.returncode})")
                if proc.returncode and not _merged([parts / name / "results.json"])[1]:  # died before any row
                    died.append(name)
                    _say(start, f"  {name} wrote no rows; the end of its log.txt:\n" + _tail(parts / name / "log.txt"))
            if finished or time.perf_counter() - merged_at > 30:  # keep a current merge on disk
                meta, rows = _merged(results)
                meta["wall_s"] = merged_at = time.perf_counter() - start
                report.write(out, meta, rows, maps=False)
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        _say(start, f"stopped; {len(running)} units cut short, {len(pending)} not started")
    meta, rows = _merged(results)
    meta["wall_s"] = time.perf_counter() - start
    return max(_finish(out, meta, rows), int(bool(died)))


def _tail(path: Path, lines: int = 6) -> str:
    """The last `lines` non-empty lines of a text file (progress bars' carriage returns taken as line ends)."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    kept = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(f"    {line}" for line in kept[-lines:])


def report_command(argv: Sequence[str]) -> int:
    """`quickllama-bench report DIR [DIR ...] [--out DIR]`: merge results; write the summary and heat-maps."""
    parser = argparse.ArgumentParser(prog="quickllama-bench report", description=report_command.__doc__)
    parser.add_argument("results", type=Path, nargs="+", help="results folders (or their results.json)")
    parser.add_argument("--out", type=Path, help="where to write (default: the only input folder)")
    args = parser.parse_args(argv)
    paths = [p / "results.json" if p.is_dir() else p for p in args.results]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or (args.out is None and len(paths) > 1):
        parser.error(f"no results.json at {', '.join(missing)}" if missing else "several inputs need --out")
    meta, rows = _merged(paths)
    return _finish(args.out or paths[0].parent, meta if len(paths) > 1 else meta["merged"][0], rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `quickllama-bench [options]` runs, `quickllama-bench report DIR...` summarises."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return report_command(argv[1:]) if argv[:1] == ["report"] else run(argv)


if __name__ == "__main__":
    sys.exit(main())
