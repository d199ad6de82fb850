# metaflow-ray-serve: `make demo` (train, deploy, predict) and `make test` (the whole suite).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# "-e" for an editable install (development); CI sets EDITABLE= to test a regular install.
EDITABLE ?= -e
# Metaflow refuses to run without a user name.
export USERNAME ?= $(or $(USER),$(LOGNAME),ci)

.PHONY: install demo test unit integration lint format cluster-down clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q $(EDITABLE) ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) flows/train_flow.py --no-pylint run
	@echo
	@echo "The run has ended; the model still answers:"
	$(PY) flows/predict_sample.py 3
	@echo
	@echo "Every hop from the serving app back to the training data, checked:"
	$(VENV)/bin/ray-deploy lineage cancer
	@echo
	@echo "Try: curl -s -H 'Content-Type: application/json' http://127.0.0.1:8000/cancer   (GET describes the app)"
	@echo "     $(VENV)/bin/ray-deploy status      |  make cluster-down   (stops the local Ray head)"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest-xdist workers, each with a Ray head of its own (tests/conftest.py): one process keeps a
# 2-core machine only ~1 core busy (the suite waits on replicas, rollout steps and timeouts), two
# measured 1.46x (18 min instead of 27 on 2 cores). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lint
	@# KServe's REST client runs from a venv of its own (its pins do not fit ours): built once, cached.
	$(PY) tests/integration/kserve_venv.py
	$(VENV)/bin/pytest tests --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

unit: install
	$(VENV)/bin/pytest tests/unit

integration: install
	$(VENV)/bin/pytest tests/integration

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

cluster-down: install
	$(VENV)/bin/ray-deploy cluster down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
