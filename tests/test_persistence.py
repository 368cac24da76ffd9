"""Saved memories: a loaded memory answers exactly as the one saved; damaged or foreign files are refused."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError

import pytest
import torch
from safetensors.torch import save_file

from qllm_runtime import MemoryFileError, MemoryMismatchError, QLLMConfig, QLLMEngine, cli, persist
from qllm_runtime.cli import haystack
from tests.conftest import SMALL_WINDOWS, TINY_WINDOWS, tiny_model
from tests.test_cli import run

QUESTION = "What did the harbor pilot repair?"
TEXT = " ".join(haystack(60, seed=5))  # ~700 tokens: many blocks with TINY_WINDOWS


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return tiny_model("llama", len(tokenizer))


def engine_of(model, tokenizer, **config) -> QLLMEngine:
    return QLLMEngine(model, tokenizer, QLLMConfig(**config))


def same_answers(a, b) -> None:
    """Greedy answers of two memories: same text, looked-up passages and usage."""
    first, second = a.ask(QUESTION, max_new_tokens=8), b.ask(QUESTION, max_new_tokens=8)
    assert (first.text, first.blocks, first.usage) == (second.text, second.blocks, second.usage)


@pytest.fixture(scope="module")
def saved(tiny_llama, tokenizer, tmp_path_factory):
    """(engine, memory, path) of a tiny-model block memory saved once."""
    engine = engine_of(tiny_llama, tokenizer, **TINY_WINDOWS)
    memory = engine.read(TEXT)
    return engine, memory, memory.save(tmp_path_factory.mktemp("saved") / "doc.qmem")


@pytest.mark.parametrize("mode", ["qllm", "infllm", "streaming", "full", "qllm-fp8"])
def test_loaded_memory_answers_as_saved_twice_over(tiny_llama, tokenizer, tmp_path, mode):
    configs = {"full": {"mode": "full"}, "qllm-fp8": {**TINY_WINDOWS, "kv_dtype": "float8_e4m3"}}
    config = configs.get(mode, {**TINY_WINDOWS, "mode": mode})
    engine = engine_of(tiny_llama, tokenizer, **config)
    memory = engine.read(TEXT)
    once = engine.load_memory(memory.save(tmp_path / "a.qmem"))
    twice = engine.load_memory(once.save(tmp_path / "b.qmem"))
    assert twice.context == memory.context and twice.tokens.ids == memory.tokens.ids
    assert twice.tokens.offsets == memory.tokens.offsets
    same_answers(memory, twice)
    same_answers(memory, once)  # asking left both unchanged
    if mode in ("qllm", "infllm", "qllm-fp8"):
        assert memory.ask(QUESTION, max_new_tokens=1).blocks  # the test looks blocks up
    more = " " + " ".join(haystack(10, seed=6))
    memory.extend(more)
    twice.extend(more)  # the whole reading state came back: reading on continues identically
    same_answers(memory, twice)


def test_blocks_are_placed_by_the_loading_engine(saved, tiny_llama, tokenizer):
    engine, memory, path = saved
    offloaded = engine_of(tiny_llama, tokenizer, **TINY_WINDOWS, offload="cpu")
    loaded = offloaded.load_memory(path)
    layer = next(iter(loaded.session.memory.layers.values()))
    assert layer.store.offloaded == layer.n_blocks > 0
    same_answers(memory, loaded)
    resaved = loaded.save(path.with_name("offloaded.qmem"))  # offloaded blocks are saved as well
    same_answers(memory, engine.load_memory(resaved))


def test_embedded_model_round_trip(default_engine, tmp_path):
    memory = default_engine.read(" ".join(haystack(150, seed=2)))  # ~1.8K tokens: blocks looked up
    same_answers(memory, default_engine.load_memory(memory.save(tmp_path / "doc.qmem")))


@pytest.mark.parametrize("damage", ["flip a data byte", "flip a header byte", "truncate", "text file",
                                    "other safetensors"])
def test_damaged_or_foreign_files_are_refused(saved, tmp_path, damage):
    engine, _, path = saved
    data = bytearray(path.read_bytes())
    target = tmp_path / "bad.qmem"
    if damage == "flip a data byte":  # the data region ends the file
        data[-5] ^= 0x01
    elif damage == "flip a header byte":
        data[8 + data[8:].index(b"checksum") + 20] ^= 0x01  # inside the checksum's hex digits
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "text file":
        data = bytearray(b"just some notes\n")
    else:
        save_file({"x": torch.zeros(3)}, target)
        data = bytearray(target.read_bytes())
    target.write_bytes(data)
    with pytest.raises(MemoryFileError, match=r"bad\.qmem"):
        engine.load_memory(target)


def test_another_model_is_refused(saved, tokenizer):
    _, _, path = saved
    other = engine_of(tiny_model("llama", len(tokenizer), seed=1), tokenizer, **TINY_WINDOWS)
    with pytest.raises(MemoryMismatchError, match=r"another model .*different weight values"):
        other.load_memory(path)
    wider = engine_of(tiny_model("llama", len(tokenizer), hidden_size=128), tokenizer, **TINY_WINDOWS)
    with pytest.raises(MemoryMismatchError, match=r"another model .*hidden_size"):
        wider.load_memory(path)
    half = engine_of(tiny_model("llama", len(tokenizer)).to(torch.bfloat16), tokenizer, **TINY_WINDOWS)
    with pytest.raises(MemoryMismatchError, match="holds a float32 memory, this engine's model is bfloat16"):
        half.load_memory(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"block_size": 16}, "block_size: saved 8, this engine 16"),
    ({"mode": "full"}, "mode: saved 'qllm', this engine 'full'"),
    ({"far_positions": "shared"}, "far_positions: saved 'ordered', this engine 'shared'"),
])
def test_another_config_is_refused(saved, tiny_llama, tokenizer, change, message):
    _, _, path = saved
    with pytest.raises(MemoryMismatchError, match=message):
        engine_of(tiny_llama, tokenizer, **{**TINY_WINDOWS, **change}).load_memory(path)


def test_answer_time_fields_may_differ(saved, tiny_llama, tokenizer):
    _, memory, path = saved
    other = engine_of(tiny_llama, tokenizer, **TINY_WINDOWS, question_weight=0.5, device_pool_gb=0.5,
                      evidence_tokens=None, evidence_neighbors=0, evidence_order="relevance", decode_graphs=False)
    assert other.load_memory(path).context == memory.context


def test_another_tokenizer_is_refused(saved, tiny_llama, tokenizer):
    _, _, path = saved
    engine = engine_of(tiny_llama, tokenizer, **TINY_WINDOWS)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original + "{# changed #}"
        with pytest.raises(MemoryMismatchError, match="another chat template"):
            engine.load_memory(path)
    finally:
        tokenizer.chat_template = original


def test_a_failed_write_leaves_no_file(saved, tmp_path, monkeypatch):
    _, memory, _ = saved
    target = tmp_path / "doc.qmem"
    target.write_bytes(b"the previous version")

    def half_written(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(persist, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        memory.save(target)
    assert os.listdir(tmp_path) == ["doc.qmem"] and target.read_bytes() == b"the previous version"


def test_a_checkout_that_was_never_installed_saves_too(saved, tmp_path, monkeypatch):
    """Run from a source tree (no package metadata), a memory still saves and loads (seen on the GPU box)."""
    engine, memory, _ = saved

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(persist, "version", not_installed)
    path = memory.save(tmp_path / "source.qmem")
    assert persist.read_manifest(path)["quickllama"] == "source"
    same_answers(engine.load_memory(path), memory)


def test_memory_files_are_recognised(saved, tmp_path):
    _, _, path = saved
    copy = tmp_path / "doc.bin"
    copy.write_bytes(path.read_bytes())
    (tmp_path / "notes.txt").write_text("plain text")
    assert persist.is_memory_file(path) and persist.is_memory_file(copy)
    assert not persist.is_memory_file(tmp_path / "notes.txt")


# ---- CLI and adapters, on the embedded model -------------------------------------------------------------
class NoReading(QLLMEngine):
    """An engine that must not read: answers have to come from a saved memory."""

    def read(self, *args, **kwargs):
        raise AssertionError("the document was read again")


def test_cli_reads_once_then_asks_the_saved_memory(default_model, tmp_path, capsys, monkeypatch):
    model, tokenizer = default_model
    monkeypatch.setattr(cli, "_engine", lambda args, config: QLLMEngine(model, tokenizer, config))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.txt").write_text(TEXT, encoding="utf-8")
    assert run(["read", "report.txt", "-o", "report.qmem", "--n-local", "128"], capsys)[0] == 0
    direct = QLLMEngine(model, tokenizer, QLLMConfig(**{**persist.memory_fields(cli.EMBEDDED_MODEL_CONFIG),
                                                          "n_local": 128, "full_within_window": False}))
    expected = direct.read(TEXT).ask(QUESTION, max_new_tokens=6).text
    capsys.readouterr()
    monkeypatch.setattr(cli, "_engine", lambda args, config: NoReading(model, tokenizer, config))
    assert cli.main(["ask", "report.qmem", QUESTION, "--max-new-tokens", "6"]) == 0  # the saved n_local applies
    assert capsys.readouterr().out.strip() == expected.strip()
    code, err = run(["ask", "report.qmem", QUESTION, "--n-local", "256"], capsys)
    assert code == 2 and err.count("\n") == 1 and "n_local: saved 128, this engine 256" in err
    (tmp_path / "cut.qmem").write_bytes((tmp_path / "report.qmem").read_bytes()[:1000])
    code, err = run(["ask", "cut.qmem", QUESTION], capsys)
    assert code == 2 and err.count("\n") == 1 and "cut.qmem is not a saved memory or is cut short" in err


def test_llama_index_persists_its_memory(default_model, default_engine, tmp_path):
    from llama_index.core import Document, StorageContext

    from qllm_integrations.llama_index import QLLMIndex

    index = QLLMIndex.from_documents([Document(text=TEXT)], engine=default_engine)
    expected = index.as_query_engine(max_new_tokens=6).query(QUESTION)
    index.persist(tmp_path)
    assert (tmp_path / f"{index.index_id}.qmem").exists()
    storage = StorageContext.from_defaults(persist_dir=str(tmp_path))
    loaded = QLLMIndex.from_storage(storage, persist_dir=tmp_path, engine=NoReading(*default_model, SMALL_WINDOWS))
    answer = loaded.as_query_engine(max_new_tokens=6).query(QUESTION)
    assert str(answer) == str(expected)
    assert [(n.node_id, n.score) for n in answer.source_nodes] == [(n.node_id, n.score) for n in expected.source_nodes]


def test_langchain_answers_from_a_saved_memory(default_engine, tmp_path):
    from qllm_integrations import ChatQLLM

    memory = default_engine.read(TEXT)
    path = memory.save(tmp_path / "doc.qmem")
    expected = ChatQLLM(memory=memory, max_tokens=6).invoke(QUESTION)
    answer = ChatQLLM(memory=str(path), engine=default_engine, max_tokens=6).invoke(QUESTION)
    assert answer.content == expected.content
    assert answer.response_metadata["passages"] == expected.response_metadata["passages"]
