"""Saved memories: a reading written to one `.qmem` file and loaded without reading the document again.

The file is a safetensors file (no pickle). Tensors: `context.text` (utf-8 bytes), `context.ids` (n,),
`context.offsets` (n, 2) with -1 for template tokens, and per layer `layers.<i>.<name>` for every entry of
the session's `state()` (block modes: init, tail, representative keys, blocks, pinned; full: the cache's
keys and values). `__metadata__` holds `manifest` (JSON) and `checksum` = sha256 over the manifest and
every tensor's bytes in name order, so an altered byte anywhere is caught. Manifest:

  format, quickllama      file format version, package version that wrote it
  model                   config (dict, without paths and dtype), weights (sha256 of names and shapes),
                          weight_sample (sha256 of a fixed sample of weight values)
  tokenizer, chat_template  sha256 of the vocabulary and special tokens, of the chat template
  config                  the QLLMConfig fields that shape a reading (`memory_fields`; a reading held with full
                          attention, in mode full or within the model's window, records mode "full")
  dtype                   the model's dtype (the memory's)
  document                sha256 and token count of the text read

Loading checks the file (MemoryFileError), then config, dtype, model and tokenizer against the loading
engine (MemoryMismatchError naming what differs); blocks are placed by the loading engine's config.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import QLLMConfig
from .errors import MemoryFileError, MemoryMismatchError
from .prompt import ContextTokens
from .session import FullSession

if TYPE_CHECKING:
    from .engine import Memory, QLLMEngine

FORMAT = 1
SUFFIX = ".qmem"
# Fields that act only when answering (the question term), only on where blocks live, or only on whether a reading
# is held with full attention: a block memory read under one value answers under any other. Every other field
# changes what a block reading stores.
ANSWER_OR_PLACEMENT_FIELDS = frozenset({"question_weight", "question_topk", "question_scale", "evidence_tokens",
                                        "evidence_neighbors", "evidence_order", "offload", "device_pool_gb",
                                        "max_context_tokens", "full_within_window", "decode_graphs"})
_SAMPLES_PER_WEIGHT = 64


def memory_fields(config: QLLMConfig, full: bool = False) -> dict:
    """The config fields a saved reading depends on; a full-attention reading (`full`, or mode full): mode "full"
    and prefill_chunk."""
    values = config.model_dump()
    if full or config.mode == "full":
        return {"mode": "full", "prefill_chunk": values["prefill_chunk"]}
    return {k: v for k, v in values.items() if k not in ANSWER_OR_PLACEMENT_FIELDS}


def save_memory(memory: Memory, path: str | os.PathLike) -> Path:
    """Write `memory` to `path` atomically (a temporary file in the same folder, then renamed); the path."""
    path = Path(path)
    tensors = _context_tensors(memory.tokens)
    for idx, state in memory.session.state().items():
        tensors.update({f"layers.{idx}.{name}": t.detach().cpu().contiguous() for name, t in state.items()})
    engine = memory.engine
    manifest = {
        "format": FORMAT, "quickllama": _package_version(), **_fingerprint(engine),
        "config": memory_fields(engine.config, full=isinstance(memory.session, FullSession)),
        "document": {"sha256": hashlib.sha256(memory.tokens.text.encode()).hexdigest(), "tokens": memory.n_tokens},
    }
    text = json.dumps(manifest, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"manifest": text, "checksum": _checksum(text, tensors)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_memory(engine: QLLMEngine, path: str | os.PathLike) -> Memory:
    """The memory saved in `path`, checked against `engine` and placed by its config."""
    from .engine import Memory

    path = Path(path)
    manifest, tensors = _read(path)
    _check_match(manifest, engine, path)
    n_tokens = manifest["document"]["tokens"]
    engine._check_capacity(n_tokens, f"the memory in {path.name}")
    states: dict[int, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("layers."):
            _, idx, key = name.split(".", 2)
            states.setdefault(int(idx), {})[key] = tensor
    session = engine._new_session(n_tokens, full=manifest["config"].get("mode") == "full")
    session.load_state(states)
    offsets = [None if a < 0 else (a, b) for a, b in tensors["context.offsets"].tolist()]
    text = bytes(tensors["context.text"].numpy()).decode()
    return Memory(engine, session, ContextTokens(text, tensors["context.ids"].tolist(), offsets))


def _read(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """(manifest, tensors) of a saved memory whose checksum holds, else MemoryFileError."""
    metadata = _metadata(path)
    try:
        tensors = load_file(path)
        manifest = json.loads(metadata["manifest"])
    except (SafetensorError, ValueError) as e:
        raise _damaged(path, e) from e
    if _checksum(metadata["manifest"], tensors) != metadata["checksum"]:
        raise MemoryFileError(f"{path} was altered or damaged since it was saved (checksum mismatch); save it again")
    if manifest.get("format") != FORMAT:
        raise MemoryFileError(f"{path} has memory format {manifest.get('format')}, this QuickLLaMA reads format "
                              f"{FORMAT}: read the document again")
    return manifest, tensors


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a saved memory, from its header only (not verified: `load_memory` does that)."""
    try:
        return json.loads(_metadata(Path(path))["manifest"])
    except ValueError as e:
        raise _damaged(Path(path), e) from e


def _metadata(path: Path) -> dict[str, str]:
    """The safetensors `__metadata__` of a saved memory (manifest, checksum), else MemoryFileError."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > os.fstat(f.fileno()).st_size:
                raise ValueError(f"its header length {size} runs past the end of the file")
            parsed = json.loads(f.read(size))
    except ValueError as e:
        raise _damaged(path, e) from e
    metadata = (parsed.get("__metadata__") if isinstance(parsed, dict) else None) or {}
    if "manifest" not in metadata or "checksum" not in metadata:
        raise MemoryFileError(f"{path} is not a saved memory (no QuickLLaMA manifest); make one with "
                              "memory.save(path) or quickllama read FILE -o OUT.qmem")
    return metadata


def _damaged(path: Path, error: Exception) -> MemoryFileError:
    return MemoryFileError(f"{path} is not a saved memory or is cut short ({error}); save it again with "
                           "memory.save(path) or quickllama read FILE -o OUT.qmem")


def is_memory_file(path: str | os.PathLike) -> bool:
    """Whether `path` is named like a saved memory or starts like one (a safetensors header with a manifest)."""
    path = Path(path)
    if path.suffix == SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(8 + 4096)
    except OSError:
        return False
    return head[8:10] == b'{"' and b'"__metadata__"' in head and b'"manifest"' in head


def _check_match(manifest: dict, engine: QLLMEngine, path: Path) -> None:
    """MemoryMismatchError naming the first thing that differs between the file and `engine`."""
    ours = _fingerprint(engine)
    saved_cfg = manifest["config"]
    our_cfg = memory_fields(engine.config, full=saved_cfg.get("mode") == "full")  # any engine holds a full reading
    if saved_cfg.get("mode") != our_cfg["mode"] and "full" in (saved_cfg.get("mode"), our_cfg["mode"]):
        diffs = [f"mode: saved {saved_cfg.get('mode')!r}, this engine {our_cfg['mode']!r}"]
    else:
        diffs = [f"{k}: saved {saved_cfg.get(k)!r}, this engine {our_cfg[k]!r}"
                 for k in our_cfg if saved_cfg.get(k) != our_cfg[k]]
    if diffs:
        raise MemoryMismatchError(f"{path} was read with another config ({'; '.join(diffs)}): load it with "
                                  "an engine of the saved values, or read the document again")
    if manifest["dtype"] != ours["dtype"]:  # before the weights: their sampled values differ by dtype too
        raise MemoryMismatchError(f"{path} holds a {manifest['dtype']} memory, this engine's model is "
                                  f"{ours['dtype']}: load the model as {manifest['dtype']}, or read the document again")
    if manifest["model"] != ours["model"]:
        config_diff = sorted(k for k in {*manifest["model"]["config"], *ours["model"]["config"]}
                             if manifest["model"]["config"].get(k) != ours["model"]["config"].get(k))
        what = (f"model config differs in {', '.join(config_diff)}" if config_diff
                else "weight names or shapes differ" if manifest["model"]["weights"] != ours["model"]["weights"]
                else "same architecture, different weight values")
        raise MemoryMismatchError(f"{path} was read by another model ({what}): load it with the model that "
                                  "read it, or read the document again with this one")
    for key, what in (("tokenizer", "tokenizer"), ("chat_template", "chat template")):
        if manifest[key] != ours[key]:
            raise MemoryMismatchError(f"{path} was read with another {what}: load it with the tokenizer that "
                                      "read it, or read the document again")


def _fingerprint(engine: QLLMEngine) -> dict:
    """Model, dtype, tokenizer and chat-template identity of `engine`."""
    model, tokenizer = engine.model, engine.tokenizer
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("name_or_path", "transformers_version", "dtype", "torch_dtype")}
    names, sample = hashlib.sha256(), hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            names.update(f"{name}:{tuple(param.shape)};".encode())
            flat = param.detach().reshape(-1)
            n = min(_SAMPLES_PER_WEIGHT, flat.numel())
            picks = torch.arange(n) * (flat.numel() - 1) // max(n - 1, 1)  # evenly spaced, first and last
            sample.update(flat[picks.to(flat.device)].float().cpu().numpy().tobytes())
    vocab = sorted(tokenizer.get_vocab().items())
    specials = [str(getattr(tokenizer, "all_special_tokens", "")), type(tokenizer).__name__]
    return {
        "model": {"config": json.loads(json.dumps(config, sort_keys=True, default=str)),
                  "weights": names.hexdigest(), "weight_sample": sample.hexdigest()},
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer": _sha256(json.dumps([vocab, specials])),
        "chat_template": _sha256(str(getattr(tokenizer, "chat_template", None) or "")),
    }


def _context_tensors(tokens: ContextTokens) -> dict[str, Tensor]:
    offsets = [(-1, -1) if o is None else o for o in tokens.offsets]
    return {
        "context.text": torch.frombuffer(bytearray(tokens.text.encode()), dtype=torch.uint8),
        "context.ids": torch.tensor(tokens.ids, dtype=torch.int64),
        "context.offsets": torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2),
    }


def _checksum(manifest: str, tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256(manifest.encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _package_version() -> str:
    """This package's version, or "source" when it runs from a checkout that was never installed."""
    try:
        return version("quickllama")
    except PackageNotFoundError:
        return "source"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
