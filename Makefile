# minigpt developer entry points. Every target that runs Python depends on the
# setup stamp, so `make test` only re-runs scripts/setup.sh when pyproject.toml
# or the script changed (or the venv is missing); otherwise it costs nothing.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Nothing we run should phone home.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.minigpt-setup
PYTEST_ARGS ?=

# Stage commands say `python`: put the venv first so DVC runs ours.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

SWEEP ?= -S data=shakespeare-mini -S train.max_steps=200 -S 'train.lr=1e-3,2e-3'
UI_PORT ?= 5000
# One experiment per line of -S overrides; see the file's header.
RECIPE_SWEEP ?= conf/sweeps/recipe.txt
FINETUNE_SWEEP ?= conf/sweeps/finetune.txt
FINETUNE_SEEDS ?= 123,124,125
# The search file of `make search` (conf/search/*.yaml); OPTUNA_STORAGE=postgresql://... shares its study.
SEARCH ?= conf/search/recipe.yaml

.PHONY: help setup test test-fast run params sweep sweep-recipe sweep-finetune search compare promote ui notebooks notebooks-clear bench bench-quick bench-memory bench-gguf headline stack stack-down stack-status clean distclean

help:
	@echo "make setup      create .venv, install torch (CPU) + minigpt[pipeline,team,interop,dev], cache the tokenizer"
	@echo "make test       full test suite (PYTEST_ARGS='...' to pass options)"
	@echo "make test-fast  tests not marked slow"
	@echo "make run        run the pipeline (dvc repro) on the default corpus"
	@echo "make params     compose conf/ into params.yaml (what dvc exp run does)"
	@echo "make sweep      queue a small hyper-parameter sweep and run it 2 at a time"
	@echo "make sweep-recipe  the sweep that chose make run's recipe, one run at a time (hours)"
	@echo "make sweep-finetune  the sweep that chose the default finetune, 3 seeds a candidate (~25 min)"
	@echo "make search     Optuna search over DVC experiments, with pruning (SEARCH=conf/search/recipe.yaml) -> reports/search/"
	@echo "make compare    the latest sweep's runs: differing params + scores -> reports/compare.{md,png}"
	@echo "make promote    the best FINISHED pretrain run's model -> registered model minigpt, alias @champion"
	@echo "make ui         MLflow UI on the local store at http://127.0.0.1:$(UI_PORT)"
	@echo "make notebooks  run notebooks/*.ipynb in place (after make run); make notebooks-clear before committing"
	@echo "make bench      run the benchmarks (~15 min) -> reports/bench.json"
	@echo "make bench-quick  a ~3-minute smoke of them -> reports/bench-quick.json"
	@echo "make bench-memory  bytes per process for training, DDP vs FSDP, 1 and 2 processes"
	@echo "make bench-gguf  GGUF sizes, llama.cpp vs minigpt decode tokens/s (gpt2-tiny, gpt2-small) -> reports/bench-gguf.json"
	@echo "make headline   make run on a fresh clone: every number the README quotes vs benchmarks/headline.json"
	@echo "make stack      start the team stack: PostgreSQL + S3 (SeaweedFS) + MLflow server, state in .stack/"
	@echo "make stack-status  each service's health;  make stack-down  stop them all"
	@echo "make clean      remove caches and build leftovers (keeps .venv, data, runs)"
	@echo "make distclean  clean + remove .venv"

# The stamp is (re)written by setup.sh; its content is a hash of these inputs.
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

# Explicit `make setup` always runs the script (it is a no-op when up to date,
# and it also re-checks the tokenizer cache).
setup:
	bash scripts/setup.sh

# Two processes, a module each at a time (module fixtures are built once): much of the suite waits
# on subprocesses, servers and sleeps, which the other process fills (tests/conftest.py orders them).
XDIST := -n 2 --dist loadfile

test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

run: $(STAMP)
	dvc repro
	@echo; cat reports/samples.md | head -40; echo
	dvc metrics show

params: $(STAMP)
	$(PY) -m pipeline.compose

# The store is created once, before parallel runs race to create it.
sweep: $(STAMP)
	$(PY) -m pipeline.run
	dvc exp run --queue $(SWEEP)
	MINIGPT_SWEEP=sweep-$$(date +%Y%m%d-%H%M%S) dvc queue start -j 2  # a tag shared by this sweep's runs
	@while dvc queue status | grep -qE 'Queued|Running'; do sleep 10; done
	dvc queue status
	dvc exp show --no-pager --only-changed --drop '.*/.*|checkpoints.*|datasets'  # params and metrics, no dep hashes

# Each line is one experiment (pretrain, evaluate and sample), run one at a time: the
# candidates are compared at equal wall-clock, which two parallel runs would blur.
sweep-recipe: $(STAMP)
	$(PY) -m pipeline.run
	grep -Ev '^[[:space:]]*(#|$$)' $(RECIPE_SWEEP) | while read -r overrides; do \
	  dvc exp run --queue evaluate sample $$overrides || exit 1; done
	MINIGPT_SWEEP=recipe-$$(date +%Y%m%d-%H%M%S) dvc queue start -j 1
	@while dvc queue status | grep -qE 'Queued|Running'; do sleep 30; done
	dvc queue status
	$(PY) -m pipeline.compare

# Each line is one finetune candidate, run once per seed (FINETUNE_SEEDS): a 224-message test
# split moves 0.45% per message, so a candidate is its mean over seeds. The runs are workspace
# experiments, one after the other: a queued one would train the model again, since its temporary
# copy lacks the pretrain stage's uncached reports (reports/mlflow_run.json, train.json).
sweep-finetune: $(STAMP)
	dvc repro finetune_prepare
	export MINIGPT_SWEEP=finetune-$$(date +%Y%m%d-%H%M%S); \
	grep -Ev '^[[:space:]]*(#|$$)' $(FINETUNE_SWEEP) | while read -r overrides; do \
	  for seed in $$(echo $(FINETUNE_SEEDS) | tr , ' '); do \
	    dvc exp run finetune_evaluate $$overrides -S finetune.train.seed=$$seed </dev/null || exit 1; done; done
	$(PY) -m pipeline.compare --stage finetune --mean-over finetune.train.seed

# Each trial a DVC experiment (`dvc exp run --temp`), tracked in MLflow; stopping it and running it
# again continues the study; several machines share one through OPTUNA_STORAGE (pipeline/search.py).
search: $(STAMP)
	$(PY) -m pipeline.search $(SEARCH)

# COMPARE='--all' or COMPARE='RUN_ID RUN_ID' or COMPARE='--stage finetune' (see python -m pipeline.compare -h)
compare: $(STAMP)
	$(PY) -m pipeline.compare $(COMPARE)

# PROMOTE='--metric val_loss' or PROMOTE='--stage finetune' or PROMOTE='--run RUN_ID' (python -m pipeline.promote -h)
promote: $(STAMP)
	$(PY) -m pipeline.promote $(PROMOTE)

ui: $(STAMP)
	@$(PY) -m pipeline.run --ui http://127.0.0.1:$(UI_PORT)
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)  (Ctrl-C to stop); open the training-runs URL above"
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# In place, outputs kept for Jupyter to show; the committed notebooks hold none (a test checks):
# `make notebooks-clear` strips them again. The kernel is the venv's python (no registered kernel needed).
notebooks: $(STAMP)
	$(PY) notebooks/run_notebooks.py

notebooks-clear: $(STAMP)
	$(PY) notebooks/run_notebooks.py --clear

bench: $(STAMP)
	$(PY) -m benchmarks.bench

bench-quick: $(STAMP)
	$(PY) -m benchmarks.bench --quick --out reports/bench-quick.json

# Bytes per process for training (weights, gradients, AdamW moments), DDP and FSDP, 1 and 2 processes.
bench-memory: $(STAMP)
	for preset in gpt2-small gpt2-124M; do \
	  OMP_NUM_THREADS=1 $(PY) benchmarks/memory_per_rank.py $$preset && \
	  OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/memory_per_rank.py $$preset \
	  || exit 1; done

# GGUF sizes and llama.cpp's decode speed beside minigpt's (BENCH_GGUF_ARGS='--checkpoint checkpoints/best.safetensors').
bench-gguf: $(STAMP)
	$(PY) -m benchmarks.gguf $(BENCH_GGUF_ARGS)

# Minutes of training in a fresh clone of HEAD: a benchmark, not a test (see benchmarks/headline.py).
headline: $(STAMP)
	$(PY) -m benchmarks.headline $(HEADLINE_ARGS)

# The team stack (scripts/stack.py; README "Team setup"): STACK_DIR, STACK_PG_PORT, STACK_S3_PORT and
# STACK_MLFLOW_PORT configure it. `make stack` prints what to export; it starts nothing twice.
stack: $(STAMP)
	@$(PY) scripts/stack.py up

stack-down: $(STAMP)
	@$(PY) scripts/stack.py down

stack-status: $(STAMP)
	@$(PY) scripts/stack.py status

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -rf .pytest_cache build src/*.egg-info

distclean: clean
	rm -rf $(VENV)
