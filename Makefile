# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv themselves (CPU torch pinned as the design notes require).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test test-fast install clean browser lint

$(STAMP): pyproject.toml setup.py $(wildcard proto/mesh_llm/v1/*.proto)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mesh demo

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q -rs

# ruff over the code, mypy --strict over the pure maths (mixing/, wire.py): settings in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check src tests experiments
	$(BIN)/mypy

# the console test drives Debian's Chromium; without root or apt it skips and says why
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || echo "chromium missing: tests/test_console.py will skip"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build src/mesh_llm/pb *.egg-info src/*.egg-info
