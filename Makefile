# Two set-up commands: `make demo` and `make test`. Each creates .venv when missing and reuses it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WORKDIR ?= workdirs/demo

.PHONY: demo test bench clean

$(VENV)/.runtime: requirements.txt requirements-assets.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -U pip
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -r requirements-assets.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) torch==2.13.0
	$(PIP) -r requirements-dev.txt
	touch $@

# The pipeline on a brief run (20 steps: its scores would mean nothing, so it is not evaluated) and its
# export; then the shipped model, artifacts/demo (configs/demo_long.py), answers fresh RULER samples.
demo: $(VENV)/.runtime
	$(PY) train.py --config=configs/demo.py --workdir=$(WORKDIR) --config.train.steps=20 \
	    --config.train.eval_examples=0 --config.data.ruler_samples=32
	$(PY) -m e2llm_jax.hf.export --workdir=$(WORKDIR) --out=$(WORKDIR)/export --adapters-only \
	    --dtype=bfloat16 --overwrite
	$(PY) -m e2llm_jax.evaluation.showcase --export=artifacts/demo --lengths=4096 --num-samples=4 \
	    --baselines=none,full --out=$(WORKDIR)/showcase

# Two workers, a file each at a time (module fixtures are built once), longest files first (conftest).
test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The CPU benchmarks at settings that finish within 15 minutes on an idle 2-core machine
# (bench/RESULTS.md has the timing and the longer runs): full context at 8k only (32k takes
# 3-5 minutes a side), PyTorch's compiled E2LLM at 32k only, and its training compiled layer by
# layer (about 30 s; compiling the whole loss takes up to 3 minutes).
bench: $(VENV)/.dev
	$(PY) bench/long_context.py --lengths 4096,8192,16384,32768 --full-min 8192 --full-max 8192 --repeats 1 --torch-compile 32768
	$(PY) bench/train_throughput.py --dtypes float32 --steps 2 --compile layers
	$(PY) bench/train_throughput.py --dtypes bfloat16 --steps 2 --compile layers --step-budget 60
	$(PY) bench/roofline.py --steps 2
	$(PY) bench/scaling.py --steps 2
	$(PY) bench/attention_kernel.py --rounds 2

clean:
	rm -rf $(VENV) workdirs
