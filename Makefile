# The two set-up commands: `make run` and `make test`. Both create .venv when missing.
# GPU users pick another PyTorch build, e.g.
#   make run TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
RUN_DIR ?= runs/default
RUN_ARGS ?=
# One pytest worker per core (tests use one torch thread each); idle workers take tests from busy ones.
PYTEST_ARGS ?= -n auto --dist worksteal

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: run test bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# PyTorch first, then pinned through a constraints file so that no dependency swaps it for
# another (multi-GB) build.
$(VENV)/.torch: $(BIN)/python
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -c $(VENV)/constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Default experiment: VPP on cooperative navigation with 6 agents (PIC coop_nav_n6). Writes curves
# (metrics.csv, curve.png), a checkpoint, summary.json and an episode GIF into $(RUN_DIR), then
# prints one line: the final return beside uniform random actions and the oracle on the same episodes.
run: $(VENV)/.installed
	rm -rf $(RUN_DIR)  # the default experiment starts afresh each time
	$(BIN)/vimarl train vpp coop_nav_n6 out=$(RUN_DIR) $(RUN_ARGS)
	$(BIN)/vimarl eval $(RUN_DIR) --episodes 20 --gif $(RUN_DIR)/episode.gif --fps 8
	$(BIN)/vimarl summary $(RUN_DIR)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Speed tables (not tests): env throughput against mpe2 and VMAS, VPP scaling, traffic against
# SUMO and MASAC training against BenchMARL (which sets up its own .venv-benchmarl on first use),
# written to docs/benchmarks_latest.md. BENCH_ARGS=--quick for a smoke run, --only NAME for one part.
BENCH_ARGS ?=
bench: $(VENV)/.installed-dev
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-benchmarl runs .pytest_cache
