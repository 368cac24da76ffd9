"""Loading: a damaged or foreign model file gets a specific error; the conversion cache heals itself."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qllm_runtime import ModelNotFoundError, loading
from qllm_runtime.errors import InvalidInputError, InvalidModelFileError


def write_gguf(path: Path) -> Path:
    """A tiny but complete GGUF file: some metadata and two float32 tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("a", np.arange(256, dtype=np.float32))
    writer.add_tensor("b", np.ones((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model_and_tokenizer():
    """A 1-layer random Llama and a 3-word tokenizer: what a conversion returns, in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    config = LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty conversion cache for the test ($QUICKLLAMA_CACHE)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("QUICKLLAMA_CACHE", str(folder))
    return folder


@pytest.fixture
def conversions(cache, monkeypatch) -> list[Path]:
    """Replaces reading a GGUF (25 s for the default model) by a tiny model; lists the files converted."""
    converted: list[Path] = []

    def convert(gguf: Path):
        converted.append(gguf)
        return tiny_model_and_tokenizer()

    monkeypatch.setattr(loading, "_convert", convert)
    return converted


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


def _cut(source: Path, n_bytes: int, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[:n_bytes])
    return target


@pytest.mark.parametrize("keep", [10, 30, -100], ids=["header", "metadata", "tensor-data"])
def test_truncated_gguf_names_the_file_and_the_fix(cache, gguf_file, keep):
    cut = _cut(gguf_file, keep, gguf_file.with_name("cut.gguf"))
    with pytest.raises(InvalidModelFileError, match=r"cut\.gguf is truncated or damaged.*again"):
        loading.load(cut, device="cpu")
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize(("content", "name"), [(b"", "empty.gguf"), (b"hello, not a model", "notes.gguf"),
                                               (b"{\"a\": 1}", "config.json")])
def test_a_file_that_is_not_gguf_names_the_file_and_the_fix(cache, tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidModelFileError, match=rf"{name} is not a GGUF file.*HF model directory"):
        loading.load(path, device="cpu")


def test_missing_model_file(cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        loading.load(tmp_path / "absent.gguf", device="cpu")


def test_a_complete_gguf_passes_the_check(gguf_file):
    loading.check_gguf(gguf_file)


def test_a_gguf_without_the_suffix_is_converted(conversions, gguf_file):
    renamed = gguf_file.rename(gguf_file.with_name("model.bin"))
    loading.load(renamed, device="cpu")
    assert conversions == [renamed]


def test_conversion_is_cached(conversions, cache, gguf_file):
    model, tokenizer = loading.load(gguf_file, device="cpu")
    assert model.config.num_hidden_layers == 1 and tokenizer("hello world")["input_ids"] == [1, 2]
    loading.load(gguf_file, device="cpu")
    assert conversions == [gguf_file]
    assert [p.name for p in cache.iterdir()] == [loading.converted_path(gguf_file).name]


def test_concurrent_loads_convert_once(cache, gguf_file, monkeypatch):
    """Loads of one GGUF at once (quickllama-bench --jobs workers) convert it one at a time: the first writes the
    copy, the others wait for it and read it (each converting would need the disk space of every copy)."""
    converted, started = [], threading.Event()

    def slow_convert(gguf: Path):
        converted.append(gguf)
        started.set()
        time.sleep(0.5)  # the others arrive while this one converts
        return tiny_model_and_tokenizer()

    monkeypatch.setattr(loading, "_convert", slow_convert)
    folders = []  # each thread's conversion step (a whole load in threads would race transformers' init patches)
    first = threading.Thread(target=lambda: folders.append(loading._converted_gguf(gguf_file)))
    first.start()
    started.wait(10)
    others = [threading.Thread(target=lambda: folders.append(loading._converted_gguf(gguf_file))) for _ in range(3)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(30)
    target = loading.converted_path(gguf_file)
    assert converted == [gguf_file] and folders == [target] * 4
    assert [p.name for p in cache.iterdir()] == [target.name]
    assert loading.load(gguf_file, device="cpu")[0].config.num_hidden_layers == 1 and converted == [gguf_file]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated weights": lambda d: _truncate(d / "model.safetensors"),
    "missing weights": lambda d: (d / "model.safetensors").unlink(),
    "garbage config": lambda d: (d / "config.json").write_bytes(b"\x00\x01"),
    "missing config": lambda d: (d / "config.json").unlink(),
    "truncated tokenizer": lambda d: _truncate(d / "tokenizer.json"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cached_conversion_is_converted_again(conversions, gguf_file, caplog, damage):
    loading.load(gguf_file, device="cpu")
    target = loading.converted_path(gguf_file)
    DAMAGES[damage](target)
    with caplog.at_level(logging.WARNING, logger="quickllama"):
        model, _ = loading.load(gguf_file, device="cpu")
    assert len(conversions) == 2 and model.config.num_hidden_layers == 1
    assert "damaged" in caplog.text and str(target) in caplog.text
    loading.load(gguf_file, device="cpu")
    assert len(conversions) == 2  # healed: read from the cache again


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError, RuntimeError])
def test_a_failed_conversion_leaves_nothing_in_the_cache(cache, gguf_file, monkeypatch, failure):
    model, tokenizer = tiny_model_and_tokenizer()

    def save_half(folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise failure("interrupted while saving")

    monkeypatch.setattr(model, "save_pretrained", save_half)
    monkeypatch.setattr(loading, "_convert", lambda gguf: (model, tokenizer))
    with pytest.raises(failure):
        loading.load(gguf_file, device="cpu")
    assert list(cache.iterdir()) == []


def test_partials_of_dead_processes_are_removed(conversions, cache, gguf_file):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    name = loading.converted_path(gguf_file).name
    partials = {
        "dead": cache / f".partial-{name}-{dead}-x1y2",
        "alive": cache / f".partial-{name}-{os.getppid()}-x1y2",  # another process converting right now
        "other model": cache / f".partial-other-0123456789abcdef-{dead}-x1y2",
    }
    for folder in partials.values():
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    loading.load(gguf_file, device="cpu")
    assert [k for k, folder in partials.items() if folder.exists()] == ["alive", "other model"]
    assert (cache / name / "config.json").is_file()


def test_device_map_places_the_model_with_accelerate():
    """`device_map` loads through accelerate (here everything on the CPU) and skips the move to `device`;
    giving both is refused."""
    model, _ = loading.load(loading.default_gguf_path(), device_map={"": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
    with pytest.raises(InvalidInputError, match="device or device_map"):
        loading.load(loading.default_gguf_path(), device="cpu", device_map="auto")
