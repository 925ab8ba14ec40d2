# Set-up and the two commands of the README. Everything installs from this file and pyproject.toml.
#   make run   - set up, train the default MoD model for a few CPU minutes, save it, print a sample;
#                run it again to train RUN_STEPS more (--more-steps)
#   make test  - set up, lint (ruff check + format --check), run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel lies on disk on our machines; GPU users: `make install TORCH=torch` keeps your CUDA build.
TORCH ?= torch==2.13.0
RUN_DIR ?= runs/default
RUN_SECONDS ?= 300
RUN_STEPS ?= 250

.PHONY: install run test bench clean

$(VENV)/.installed: pyproject.toml setup.py modlm/kernels/csrc/fewrow.c Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# The default corpus: the Wikipedia sample inside gensim's wheel; modlm reads the file and never
	# imports gensim, so its dependencies are not installed (installed last: no resolver warning).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gensim==4.4.0
	touch $@

install: $(VENV)/.installed

# The first `make run` trains RUN_STEPS steps; each later one continues the finished run for RUN_STEPS
# more (a new warmup and cosine), or first finishes a run the time budget stopped early.
run: install
	$(VENV)/bin/modlm train --model small --out-dir $(RUN_DIR) --resume --more-steps $(RUN_STEPS) \
		--max-time-s $(RUN_SECONDS) --batch-size 8 --seq-len 256 --max-steps $(RUN_STEPS) --warmup-steps 25 \
		--eval-interval 50 --ckpt-interval 50
	$(VENV)/bin/modlm generate --ckpt $(RUN_DIR) --prompt "The history of " --max-new-tokens 200 --temperature 0.8 --show-routing

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) build *.egg-info modlm/kernels/_fewrow*.so
