# The two set-up commands: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (a local wheel on our machines; a plain `torch` would pull CUDA).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/megabatch bench --loss clip siglip --backend torch dense --batch 1024 2048 4096 --dim 64 \
		--dtype float32 --json benchmarks/demo_cpu.json

clean:
	rm -rf $(VENV) build src/*.egg-info
