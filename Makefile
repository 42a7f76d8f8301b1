# The few targets people use. `make run` and `make test` each install what they need first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .venv-installed.stamp

.PHONY: install run test test-fast faults lint format bench reliability clean

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
	$(PYTHON) -m pytest -m "not gpu and not faults" -q

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

clean:
	rm -rf $(STAMP) build dist .pytest_cache inpo-run inpo-game.png
