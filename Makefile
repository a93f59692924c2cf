# The README's two commands: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test lint format redis venv clean bench

# The service and, beside it, the thin client distribution (client/) with its `txt2img` command.
$(INSTALLED): pyproject.toml client/pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[api,worker,dev]" -e ./client
	touch $@

venv: $(INSTALLED)

redis:
	@scripts/ensure-redis.sh

run: venv redis
	@scripts/run.sh

test: venv redis lint
	$(PY) -m pytest -q -p no:cacheprovider

# The GPU pipeline benchmark (bench/README.md); on a machine without CUDA, its CPU smoke mode.
BENCH_ARGS ?= $(shell $(PY) -c 'import torch; print("" if torch.cuda.is_available() else "--smoke")')
bench: venv
	$(PY) -m bench.gpu_pipeline $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
