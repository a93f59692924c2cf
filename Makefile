# The README's two commands: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test lint format redis browser venv clean bench lock

PIP := $(PY) -m pip --quiet --disable-pip-version-check

# Every dependency comes from the lock file, hash-checked; the project itself and, beside it, the
# thin client distribution (client/, its `txt2img` command) are installed on top.
$(INSTALLED): pyproject.toml client/pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --require-hashes --no-deps -r requirements.txt
	$(PIP) install --no-deps --no-build-isolation -e . -e ./client
	touch $@

venv: $(INSTALLED)

redis:
	@scripts/ensure-redis.sh

# The headless chromium and chromedriver the playground's test drives.
browser:
	@scripts/ensure-browser.sh

run: venv redis
	@scripts/run.sh

test: venv redis browser lint
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

# Re-resolve every dependency after a change to pyproject.toml (torch stays at constraints.txt).
lock: venv
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra api,worker,dev \
		--build-deps-for editable -c constraints.txt -o requirements.txt pyproject.toml \
		client/pyproject.toml

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
