# RobustDEQ Serve: the two newcomer commands are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: kserve-env setup serve stop archives demo test lint format bench gpu-check loadtest loadtest-batching train-shipped evaluate-shipped clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install the package with its pinned dependencies

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

serve: setup  ## the main job: TorchServe on 127.0.0.1 with the shipped default models (deq-small, lyadeq-small, plain + defended)
	$(VENV)/bin/robustdeq serve

stop:  ## stop the server started by make serve
	$(VENV)/bin/robustdeq stop

archives: setup  ## rebuild model_store/*.mar from the shipped checkpoints (byte-for-byte identical)
	$(VENV)/bin/robustdeq archive --shipped

demo: setup  ## classify test images in-process, show the dynamics and the defense
	$(VENV)/bin/robustdeq demo

KSERVE_VENV := .cache/kserve-venv
KSERVE_STAMP := $(KSERVE_VENV)/.installed

kserve-env: $(KSERVE_STAMP)  ## the second runtime's environment: kserve + tritonclient (pyproject extra 'kserve') layered over .venv

$(KSERVE_STAMP): pyproject.toml $(STAMP)
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KSERVE_VENV)/bin/python -m pip install --quiet $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['kserve']))")
	$(PY) -c "import site; print(site.getsitepackages()[0])" > "$$($(KSERVE_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/robustdeq-main-venv.pth"
	@touch $@

test: setup kserve-env  ## lint and run the test suite (TorchServe and the KServe runtime)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

lint: setup  ## ruff, and the package's layering (lint-imports, contracts in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

format: setup  ## auto-format with ruff
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup  ## in-process speed benchmark (the served default deq-small: plain, ONNX, T_f x R grid, stages, gate, trials, training step)
	$(VENV)/bin/robustdeq bench --trials --train --repeats 5 --out runs/bench/deq-small.json

gpu-check: setup  ## everything a GPU must confirm, in one run (~3 min on a GPU; CPU machines: GPU parts skipped)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet nvidia-ml-py || echo "nvidia-ml-py did not install: no GPU series on /metrics"; \
	  $(PY) -m pip install --quiet --no-deps --target .cache/ort-gpu onnxruntime-gpu \
	    || echo "onnxruntime-gpu did not install: the onnx section compares the CPU provider"; \
	fi
	PYTHONPATH="$$( [ -d .cache/ort-gpu ] && echo $$PWD/.cache/ort-gpu )" $(VENV)/bin/robustdeq gpu-check --out runs/gpu-check

loadtest: setup  ## Locust against its own server: saturation, defended, isolation, 5-min soak (~12 min)
	$(VENV)/bin/robustdeq loadtest --scenario full --out runs/loadtest/deq-small

loadtest-batching: setup  ## saturation per plain-lane batching configuration (~8 min)
	$(VENV)/bin/robustdeq loadtest --scenario batching --users 8 32 64 --stage-seconds 15 --out runs/loadtest/batching

train-shipped: setup  ## train (or resume) the shipped checkpoints into training/shipped/ (CPU-hours; TIME_LIMIT=150 JOBS=2 for chunks)
	bash training/train_shipped.sh

evaluate-shipped: setup  ## the robustness figures (docs/results.md): evaluate the shipped checkpoints (about 1.5 h on 2 cores)
	bash training/evaluate_shipped.sh

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache runs .serve *.egg-info
