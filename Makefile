# One entry point for set-up, tests and the demo. Everything lives in .venv/ at the repo root.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup browser test test-fast lint demo demo-train clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,lite]'
	touch $(STAMP)

setup: $(STAMP)

# The web page is tested in Debian's headless chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# The suite in TEST_JOBS processes of one thread each (a file's tests stay in one process, so its module
# fixtures are built once): many tests are one-thread subprocesses or Python-bound, which a single process
# leaves a core idle for. The memory-heavy tests (marked `alone`) then run by themselves.
TEST_JOBS ?= 2
PARALLEL  := OMP_NUM_THREADS=1 $(OFFLINE) $(BIN)/pytest -n $(TEST_JOBS) --dist loadfile

test: lint browser
	$(PARALLEL) -m "not alone"
	$(OFFLINE) $(BIN)/pytest -m alone

# Everything but the end-to-end tests (marked slow, the `alone` ones among them): what a contributor runs
# between edits.
test-fast: lint
	$(PARALLEL) -m "not slow"

demo: $(STAMP)
	$(OFFLINE) $(BIN)/lgformer demo

demo-train: $(STAMP)
	$(OFFLINE) $(BIN)/lgformer demo --train

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
