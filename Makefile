# `make run` takes a fresh clone to a serving gateway; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/gateway.yaml

.PHONY: run test lint typecheck format check-config bench fuzz-deep soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

config/keys/demo.public.pem: | $(STAMP)
	$(BIN)/gateway keygen --out-dir config/keys --name demo

# The sample tracking API runs beside the gateway and stops with it.
run: $(STAMP) config/keys/demo.public.pem
	@$(BIN)/gateway sample-upstream --listen 127.0.0.1:8000 & upstream=$$!; \
	trap 'kill $$upstream 2>/dev/null' EXIT INT TERM; \
	$(BIN)/gateway run -c $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy --strict gateway tests
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered

lint: $(STAMP)
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests

typecheck: $(STAMP)
	$(BIN)/mypy --strict gateway tests

format: $(STAMP)
	$(BIN)/ruff format gateway tests
	$(BIN)/ruff check --fix gateway tests

# Side by side in one run: bare nginx, HAProxy jwt_verify, the gateway in every mode.
# Needs Debian's wrk, nginx-light, haproxy and redis-server (see README "Performance").
bench: $(STAMP)
	$(BIN)/python -m tests.bench.run

# Minutes of steady mixed, hostile load on a real `gateway run`: memory, descriptors, accounting.
# SOAK_SECONDS (120 per backend), SOAK_RPS (300), SOAK_BACKENDS (memory,redis).
soak: $(STAMP)
	$(BIN)/python -m tests.soak.run

# The hypothesis properties with thousands of examples each (a few minutes); `make test` runs
# the fast profile.
fuzz-deep: $(STAMP)
	GATEWAY_FUZZ=deep $(BIN)/pytest tests/test_fuzz.py -p no:cacheprovider

check-config: $(STAMP) config/keys/demo.public.pem
	$(BIN)/gateway check-config -c $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
