"""`quickllama`: ask questions about long files from the shell (or read them once into a saved memory), serve an
OpenAI-compatible API, or run the needle demo."""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path
from typing import Literal, NoReturn, get_args, get_origin

from pydantic import ValidationError

from .config import EMBEDDED_MODEL_CONFIG, QLLMConfig
from .engine import QLLMEngine
from .errors import InvalidInputError, QLLMError
from .persist import is_memory_file, read_manifest
from .results import Answer, GenerationSettings

_CONFIG_FLAGS = ("mode", "n_init", "n_local", "block_size", "topk", "question_weight", "prefill_chunk", "offload",
                 "kv_dtype", "evidence_order")
DEMO_CONFIG = dict(n_init=128, n_local=256, block_size=64, topk=8, lookup_chunk=128, prefill_chunk=2048)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line on stderr (exit code 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF directory, hub id or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--max-new-tokens", type=int, default=GenerationSettings.max_new_tokens)
    fields = QLLMConfig.model_fields
    for name in _CONFIG_FLAGS:
        field = fields[name]
        kind = {int: int, float: float}.get(field.annotation, str)
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, choices=choices,
                            help=f"{field.description or name} (default: {field.default})")
    parser.add_argument("--evidence-tokens", type=_evidence_tokens, default=None, metavar="N|auto|off",
                        help="evidence every layer attends while answering, in tokens; off: per-token lookups "
                        "(default: auto, half the model's window, at most 4K)")
    parser.add_argument("--full-within-window", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{QLLMConfig.model_fields['full_within_window'].description} (default: on; off for "
                        "the embedded model)")


def _evidence_tokens(text: str) -> int | str:
    """`--evidence-tokens`: a count, `auto`, or `off` (QLLMConfig's None)."""
    if text in ("auto", "off"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of tokens (1 or more), auto or off, got {text!r}")
    return int(text)


def _config(args: argparse.Namespace, saved: dict | None = None) -> QLLMConfig:
    """The command's config defaults, then a saved memory's `saved` fields, overridden by the options given;
    an invalid value is a usage error."""
    values = {name: getattr(args, name) for name in _CONFIG_FLAGS if getattr(args, name) is not None}
    if args.evidence_tokens is not None:
        values["evidence_tokens"] = None if args.evidence_tokens == "off" else args.evidence_tokens
    if args.full_within_window is not None:
        values["full_within_window"] = args.full_within_window
    try:
        base = QLLMConfig() if args.model else EMBEDDED_MODEL_CONFIG
        return QLLMConfig(**{**base.model_dump(), **args.config_defaults, **(saved or {}), **values})
    except ValidationError as error:
        args.parser.error(_one_line(error))


def _one_line(error: ValidationError) -> str:
    """Pydantic's messages on one line, each naming its command-line option and the value given."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["loc"]:  # a field's error; a check across fields (loc ()) names its fields itself
            given = repr(item["input"])
            message = f"argument --{str(item['loc'][0]).replace('_', '-')}: {message}"
            message += "" if given in message else f" (got {given})"
        parts.append(message)
    return "; ".join(parts)


def _read_text(file: str) -> str:
    """The UTF-8 text of `file` ('-': stdin), refused with an InvalidInputError if closed, binary or empty."""
    if file == "-" and (sys.stdin is None or sys.stdin.closed):
        raise InvalidInputError("stdin is closed: pipe the text in, e.g. quickllama ask - 'question' < FILE")
    name = "stdin" if file == "-" else file
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"{name} is not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); give a text file, "
            "converted if needed, e.g. iconv -f latin1 -t utf-8 FILE"
        ) from error
    if "\x00" in text:
        raise InvalidInputError(f"{name} looks binary (it has NUL bytes; UTF-16?); give UTF-8 text")
    if not text.strip():
        raise InvalidInputError(f"{name} is empty: give it the text to read")
    return text


def _engine(args: argparse.Namespace, config: QLLMConfig) -> QLLMEngine:
    if args.model:
        return QLLMEngine.from_pretrained(args.model, config, device=args.device)
    return QLLMEngine.default(config, device=args.device)


class _ProgressBar:
    """A tqdm bar on stderr for reading long input (only when it takes more than one chunk)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None and done < total:
            self.bar = tqdm(total=total, unit="tok", desc="reading", file=sys.stderr, leave=False)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
                self.bar = None


def _stream_answer(stream) -> Answer:
    for delta in stream:
        print(delta, end="", flush=True)
    print()
    return stream.answer


def cmd_ask(args: argparse.Namespace, config: QLLMConfig) -> int:
    if args.file != "-" and is_memory_file(args.file):  # a saved memory: its config unless options override it
        saved = read_manifest(args.file)["config"]
        if saved.get("mode") == "full":  # a full-attention reading loads into an engine of any mode
            saved = {"prefill_chunk": saved["prefill_chunk"]}
        config = _config(args, saved)
        stream = _engine(args, config).load_memory(args.file).stream(args.question, max_new_tokens=args.max_new_tokens)
    else:
        text = _read_text(args.file)
        stream = _engine(args, config).stream(
            text, args.question, max_new_tokens=args.max_new_tokens, progress=_ProgressBar()
        )
    answer = _stream_answer(stream)
    if args.show_passages:
        _print_passages(answer, limit=args.show_passages)
    u, t = answer.usage, answer.timings
    print(f"[{u.context_tokens} context + {u.question_tokens} question tokens read in "
          f"{t.read_s + t.question_s:.1f} s; {u.generated_tokens} generated in {t.generate_s:.1f} s]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace, config: QLLMConfig) -> int:
    for option, value in (("--cached-documents", args.cached_documents), ("--replicas", args.replicas)):
        if value is not None and value < 1:
            args.parser.error(f"argument {option}: must be at least 1 (got {value})")
    if args.replicas is not None and not args.ray:
        args.parser.error("argument --replicas: needs --ray")
    options = dict(host=args.host, port=args.port, max_new_tokens=args.max_new_tokens,
                   cached_documents=args.cached_documents, **({"store": args.store} if args.store else {}))
    if args.ray:
        from functools import partial

        try:
            from qllm_integrations.engines import shared_engine
            from qllm_integrations.ray_serve import serve_ray
        except ImportError as error:
            raise InvalidInputError(f"serve --ray needs Ray Serve ({error}): pip install 'quickllama[ray]'") from error
        serve_ray(partial(shared_engine, args.model, config, args.device), replicas=args.replicas,
                  device=args.device, **options)
        return 0
    try:
        from qllm_integrations.server import serve
    except ImportError as error:
        raise InvalidInputError(f"serve needs FastAPI and uvicorn ({error}): pip install 'quickllama[server]'"
                                ) from error
    serve(_engine(args, config), **options)
    return 0


def cmd_read(args: argparse.Namespace, config: QLLMConfig) -> int:
    text = _read_text(args.file)
    engine = _engine(args, config)
    t0 = time.perf_counter()
    memory = engine.read(text, progress=_ProgressBar())
    path = memory.save(args.output)
    print(f"[{memory.n_tokens} tokens read in {time.perf_counter() - t0:.1f} s; saved to {path} "
          f"({path.stat().st_size / 2**20:.1f} MiB): quickllama ask {path} QUESTION]", file=sys.stderr)
    return 0


# ---- demo ------------------------------------------------------------------------------------------------

_SUBJECTS = ["The committee", "A harbor pilot", "The old librarian", "Our neighbour", "The night train",
             "A young engineer", "The village baker", "The river ferry", "A travelling painter", "The mayor"]
_VERBS = ["reviewed", "repaired", "described", "carried", "measured", "painted", "ignored", "counted",
          "visited", "questioned"]
_OBJECTS = ["the winter budget", "a crate of lemons", "the northern lighthouse", "two broken clocks",
            "the market square", "a stack of letters", "the stone bridge", "the harvest records",
            "a faded map", "the choir's new songs"]
_ANIMALS = ["giraffe", "penguin", "kangaroo", "flamingo", "tortoise", "octopus", "hedgehog", "zebra"]
_TAILS = ["before noon.", "after the storm.", "with great care.", "for the third time.", "in silence.",
          "without a word.", "at dawn.", "on Tuesday.", "despite the rain.", "while it snowed."]


def haystack(n_sentences: int, seed: int) -> list[str]:
    """Varied synthetic filler sentences (seeded), nothing that could answer the demo question."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n_sentences)]


DEMO_QUESTION = "What is the secret animal of the blue vault?"


def demo_document(n_sentences: int, depth: float, seed: int) -> tuple[str, str, str]:
    """(context, needle, animal): the demo's needle at `depth` of `n_sentences` filler sentences."""
    code = random.Random(seed).choice(_ANIMALS)  # a word: the 135M model copies words from far blocks
    needle = f"The secret animal of the blue vault is a {code}."
    sentences = haystack(n_sentences, seed)
    at = int(len(sentences) * depth)
    return " ".join([*sentences[:at], needle, *sentences[at:]]), needle, code


def cmd_demo(args: argparse.Namespace, config: QLLMConfig) -> int:
    engine = _engine(args, config)
    context, needle, code = demo_document(args.sentences, args.depth, args.seed)
    start = context.index(needle)
    question = DEMO_QUESTION
    n_tokens = engine.count_tokens(context)
    needle_token = engine.count_tokens(context[:start])
    print(f"Document: {n_tokens} tokens of filler (the model was trained on 8K). Needle at token {needle_token} "
          f"({n_tokens - needle_token} tokens before the question), characters {start}-{start + len(needle)}:")
    print(f"  {needle}")
    evidence = engine._evidence_blocks() if engine.config.mode == "qllm" else None
    answering = f"evidence of {evidence} blocks while answering" if evidence else "per-token lookups while answering"
    print(f"Mode {engine.config.mode}: local window {engine.config.n_local}, blocks of {engine.config.block_size}, "
          f"top-{engine.config.topk} while reading, {answering}.")
    print(f"Q: {question}\nA: ", end="", flush=True)
    t0 = time.perf_counter()
    answer = _stream_answer(engine.stream(context, question, max_new_tokens=24, progress=_ProgressBar()))
    found = code in answer.text.lower()
    print(f"{'correct' if found else 'WRONG'} (expected {code}); {time.perf_counter() - t0:.1f} s on {engine.device}")
    hit = any(b.start <= start < b.end or start <= b.start < start + len(needle) for b in answer.blocks[:4])
    where = "among the top 4" if hit else "not in the top 4"
    print(f"Looked-up passages (most favoured first; the needle's is {where}):")
    _print_passages(answer, limit=4, mark=(start, start + len(needle)))
    return 0 if found else 1


def _print_passages(answer: Answer, limit: int, mark: tuple[int, int] | None = None) -> None:
    for span in answer.blocks[:limit]:
        flag = " <- needle" if mark and span.start < mark[1] and mark[0] < span.end else ""
        text = " ".join(span.text.split())
        print(f"  [{span.start:>7}-{span.end:<7}] x{span.hits:<4} {text[:90]}{'...' if len(text) > 90 else ''}{flag}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quickllama", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log lookups and timings")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer a question about a long text file ('-' reads stdin) or a saved memory")
    ask.add_argument("file", help="a text file, '-' (stdin), or a memory saved by `quickllama read` (.qmem)")
    ask.add_argument("question")
    ask.add_argument("--show-passages", type=int, default=0, metavar="N", help="print the N most looked-up passages")
    _add_engine_options(ask)
    ask.set_defaults(run=cmd_ask, parser=ask, config_defaults={})
    read = sub.add_parser("read", help="read a long text file once and save its memory, for `ask` later")
    read.add_argument("file", help="a text file, or '-' (stdin)")
    read.add_argument("-o", "--output", required=True, help="where to save the memory, e.g. doc.qmem")
    _add_engine_options(read)
    read.set_defaults(run=cmd_read, parser=read, config_defaults={})
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (chat completions, stored documents)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--store", help="folder of the documents' memories (default: ~/.cache/quickllama/documents)")
    serve.add_argument("--cached-documents", type=int, default=4, metavar="N",
                       help="memories kept loaded, per replica with --ray (default: 4)")
    serve.add_argument("--ray", action="store_true",
                       help="serve engine replicas with Ray Serve, each document's requests on one that holds it")
    serve.add_argument("--replicas", type=int, metavar="N",
                       help="engines with --ray (default: one per GPU, else 1)")
    _add_engine_options(serve)
    serve.set_defaults(run=cmd_serve, parser=serve, config_defaults={})
    demo = sub.add_parser("demo", help="hide a needle in ~9.4K tokens and find it with the default model")
    demo.add_argument("--sentences", type=int, default=850, help="filler sentences (~11 tokens each)")
    demo.add_argument("--depth", type=float, default=0.3, help="where the needle goes, 0 = start, 1 = end")
    demo.add_argument("--seed", type=int, default=3)
    _add_engine_options(demo)
    demo.set_defaults(run=cmd_demo, parser=demo, config_defaults=DEMO_CONFIG)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (bad option, input or model file) is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    config = _config(args)
    try:
        return args.run(args, config)
    except (QLLMError, OSError) as error:
        print("quickllama: " + " ".join(str(error).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
