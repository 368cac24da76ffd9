"""`quickllama`: a user error is one line on stderr and exit code 2, never a traceback; bugs still show one."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qllm_runtime import cli

from .test_loading import write_gguf


@pytest.fixture
def files(tmp_path, monkeypatch) -> Path:
    """A folder of inputs: good text, binary, empty, and model files that are not models."""
    monkeypatch.setenv("QUICKLLAMA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "report.txt").write_text("The auditor signed the report on Monday.\n", encoding="utf-8")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")
    (tmp_path / "utf16.txt").write_bytes("plain words".encode("utf-16-le"))
    (tmp_path / "empty.txt").write_bytes(b"  \n")
    (tmp_path / "notes.gguf").write_text("just some notes\n", encoding="utf-8")
    model = write_gguf(tmp_path / "model.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(model[: len(model) // 2])
    return tmp_path


def run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `quickllama argv`, in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def stdin_of(monkeypatch, data: bytes | None) -> None:
    """Replace stdin by `data` (None: closed, as with `quickllama ask - Q <&-`)."""
    monkeypatch.setattr(sys, "stdin", None if data is None else io.TextIOWrapper(io.BytesIO(data)))


CASES = {
    "binary file": (["ask", "photo.png", "Q?"], None, ["photo.png is not UTF-8 text", "iconv"]),
    "utf-16 file": (["ask", "utf16.txt", "Q?"], None, ["utf16.txt", "binary"]),
    "empty file": (["ask", "empty.txt", "Q?"], None, ["empty.txt is empty"]),
    "missing file": (["ask", "absent.txt", "Q?"], None, ["absent.txt"]),
    "a folder": (["ask", ".", "Q?"], None, ["directory"]),
    "closed stdin": (["ask", "-", "Q?"], None, ["stdin is closed", "< FILE"]),
    "empty stdin": (["ask", "-", "Q?"], b"", ["stdin is empty"]),
    "binary stdin": (["ask", "-", "Q?"], b"\xff\xfe\x00a", ["stdin is not UTF-8 text"]),
    "zero window": (["ask", "report.txt", "Q?", "--n-local", "0"], None, ["--n-local", "greater than or equal to 1"]),
    "negative beta": (["demo", "--question-weight", "-1"], None, ["--question-weight", "greater than or equal to 0"]),
    "inconsistent": (["ask", "report.txt", "Q?", "--block-size", "2"], None, ["repr_topk (4) must be <= block_size"]),
    "not a number": (["ask", "report.txt", "Q?", "--topk", "many"], None, ["--topk", "invalid int value: 'many'"]),
    "unknown mode": (["ask", "report.txt", "Q?", "--mode", "turbo"], None, ["--mode", "'turbo'", "'qllm'"]),
    "unknown offload": (["demo", "--offload", "disk"], None, ["--offload", "'disk'", "'device'"]),
    "bad evidence": (["ask", "report.txt", "Q?", "--evidence-tokens", "0"], None, ["--evidence-tokens", "auto or off"]),
    "truncated model": (["ask", "report.txt", "Q?", "--model", "cut.gguf"], None, ["cut.gguf is truncated"]),
    "not a model": (["ask", "report.txt", "Q?", "--model", "notes.gguf"], None, ["notes.gguf is not a GGUF file"]),
    "missing model": (["ask", "report.txt", "Q?", "--model", "absent.gguf"], None, ["GGUF file not found"]),
    "no command": ([], None, ["required"]),
}


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_and_exit_code_2(files, capsys, monkeypatch, case):
    argv, stdin, fragments = CASES[case]
    monkeypatch.chdir(files)
    stdin_of(monkeypatch, stdin)
    code, err = run(argv, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("quickllama") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_a_bug_still_shows_its_traceback(files, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_engine", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["ask", str(files / "report.txt"), "Q?"])


def test_closed_stdin_in_a_real_process():
    """The console script's real process: fd 0 closed makes sys.stdin None."""
    result = subprocess.run([sys.executable, "-m", "qllm_runtime.cli", "ask", "-", "Q?"], capture_output=True,
                            text=True, timeout=300, preexec_fn=lambda: os.close(0), check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["quickllama: stdin is closed: pipe the text in, e.g. quickllama ask - "
                                          "'question' < FILE"]


@pytest.mark.parametrize(("given", "expected"), [("off", None), ("auto", "auto"), ("2048", 2048), (None, "auto")])
def test_evidence_tokens_option(given, expected):
    argv = ["ask", "report.txt", "Q?", "--model", "m.gguf"] + (["--evidence-tokens", given] if given else [])
    args = cli.build_parser().parse_args(argv)
    assert cli._config(args).evidence_tokens == expected


@pytest.mark.parametrize(("given", "expected"), [(None, "document"), ("relevance", "relevance")])
def test_evidence_order_option(given, expected):
    argv = ["ask", "report.txt", "Q?", "--model", "m.gguf"] + (["--evidence-order", given] if given else [])
    assert cli._config(cli.build_parser().parse_args(argv)).evidence_order == expected


def test_an_unknown_or_ineffective_evidence_order_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["ask", "report.txt", "Q?", "--evidence-order", "newest"])
    assert exit_.value.code == 2
    assert "--evidence-order: invalid choice: 'newest'" in capsys.readouterr().err
    embedded = cli.build_parser().parse_args(["ask", "report.txt", "Q?", "--evidence-order", "relevance"])
    with pytest.raises(SystemExit) as exit_:  # the embedded model's config has shared far positions
        cli._config(embedded)
    assert exit_.value.code == 2
    assert "far_positions='ordered'" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-full-within-window"], False),
                                                (["--full-within-window"], True)])
def test_full_within_window_option(flag, expected):
    args = cli.build_parser().parse_args(["ask", "report.txt", "Q?", "--model", "m.gguf", *flag])
    assert cli._config(args).full_within_window is expected
    embedded = cli.build_parser().parse_args(["ask", "report.txt", "Q?", *flag])
    assert cli._config(embedded).full_within_window is (expected if flag else False)

