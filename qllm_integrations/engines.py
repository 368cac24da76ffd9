"""The engines both adapters share: one per (model source, config, device) in this process.

`ChatQLLM(model=X)` and `QLLM(model_name=X)` get the same engine, and an engine with another config over
the same source shares its loaded model, so a model is loaded once whichever adapters use it.
"""

from __future__ import annotations

import threading

from qllm_runtime import EMBEDDED_MODEL_CONFIG, QLLMConfig, QLLMEngine

__all__ = ["DEFAULT_MODEL_NAME", "shared_engine", "with_config"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The embedded model's name, reported before it is loaded."""

_LOCK = threading.Lock()
_ENGINES: dict[tuple[str | None, QLLMConfig, str | None], QLLMEngine] = {}


def shared_engine(source: str | None = None, config: QLLMConfig | None = None,
                  device: str | None = None) -> QLLMEngine:
    """The process's engine for `source` (local directory, hub id or .gguf; None: the embedded model) with
    `config` (None: the defaults) on `device` (None: the runtime's choice), loading the model on first use."""
    if config is None:
        config = EMBEDDED_MODEL_CONFIG if source is None else QLLMConfig()
    with _LOCK:  # held while loading, so concurrent first calls load the model once
        engine = _ENGINES.get((source, config, device))
        if engine is None:
            loaded = next((e for (s, _, d), e in _ENGINES.items() if (s, d) == (source, device)), None)
            if loaded is not None:
                engine = with_config(loaded, config)
            elif source is None:
                engine = QLLMEngine.default(config, device=device)
            else:
                engine = QLLMEngine.from_pretrained(source, config, device=device)
            _ENGINES[source, config, device] = engine
        return engine


def with_config(engine: QLLMEngine, config: QLLMConfig | None) -> QLLMEngine:
    """`engine` itself, or with another `config` a new engine over the same model and tokenizer."""
    if config is None or config == engine.config:
        return engine
    return QLLMEngine(engine.model, engine.tokenizer, config, model_name=engine.model_name)
