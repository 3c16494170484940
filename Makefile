# The two set-up commands: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (a local wheel on our machines; a plain `torch` would pull CUDA).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv debs study study-wordnet clean gpu-wheels fault-drill plan-check

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian packages of the real data sets (--data emoji needs the Noto font, --data fashion-mnist the
# IDX files, megabatch_train.data.wordnet WordNet 3.0's data files): installed when we are root (CI), else the
# command is printed and their tests skip. --no-install-recommends: wordnet-base recommends the Tk browser.
DEBS := fonts-noto-color-emoji dataset-fashion-mnist wordnet-base
DEB_FILES := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf \
	/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz /usr/share/wordnet/data.noun
debs:
	@if ls $(DEB_FILES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS); \
	else echo "make: the real-data tests need: sudo apt-get install --no-install-recommends $(DEBS)"; fi

test: venv debs
	$(PY) -m pytest -q

# "Why 32k?": CLIP and SigLIP held-out retrieval against batch size on real data, and the losses'
# memory against batch (docs/train.md "Why 32k?", docs/performance.md). Writes benchmarks/study/study.{json,png}.
study: venv debs
	$(VENV)/bin/megabatch study --output benchmarks/study

# The same question for text: WordNet definition->name retrieval against batch, CLIP and SigLIP, at fixed steps
# and at fixed samples (docs/train.md "Why 32k? For text"). Embeds WordNet once with locked MiniLM (cached under
# $$MEGABATCH_CACHE or ~/.cache/megabatch), then trains heads only. Writes benchmarks/study_wordnet/study.{json,png}.
study-wordnet: venv debs
	$(VENV)/bin/megabatch study --data wordnet --threads 2 --output benchmarks/study_wordnet

# The main job: CLIP at a contrastive batch of 4,096 (2 ranks x 2,048, GradCache micro-batches of
# 512, ring loss) on the embedded synthetic data; ~2 minutes on 2 CPU cores. Output in runs/demo/.
demo: venv
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m megabatch_train --preset demo

# The peers' wheels for the GPU check (benchmarks/gpu.md), carried to the device machine in .whl/
# (git-ignored; ~1.7 MB, all pure-Python: the device has Python 3.12, torch, triton and numpy, no network).
GPU_PEERS ?= inf-cl==1.2.1 memeff==0.3.1 siglip-kernel==0.1.2 open-clip-torch==3.3.0
gpu-wheels: venv
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl $(GPU_PEERS)

# Longer fault and planner drills (minutes; not part of `make test`): SIGKILL a rank of a
# `torchrun --max-restarts 1` run 5 times, and check `megabatch plan` against the allocator, W = 1..8.
fault-drill: venv
	$(PY) benchmarks/restart_drill.py --tries 5 --kill-rank 1
	$(PY) benchmarks/restart_drill.py --tries 3 --kill-rank 0

plan-check: venv
	$(PY) benchmarks/plan_check.py --world 1 2 3 4 8 --batch 128 1000 4096 8192

clean:
	rm -rf $(VENV) build src/*.egg-info
