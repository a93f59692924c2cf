# The README's two commands: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test lint format redis browser venv clean bench lock lock-cuda docs dev-credentials

PIP := $(PY) -m pip --quiet --disable-pip-version-check

# Every dependency comes from the lock file, hash-checked; the project itself and, beside it, the
# thin client distribution (client/, its `txt2img` command) are installed on top.
$(INSTALLED): pyproject.toml client/pyproject.toml requirements.txt requirements-quant.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --require-hashes --no-deps -r requirements.txt
	$(PIP) install --no-deps --no-build-isolation -e . -e ./client
	$(PIP) install --require-hashes --no-deps --upgrade --target $(VENV)/quant -r requirements-quant.txt
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
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

# The GPU pipeline benchmark (bench/README.md); on a machine without CUDA, the smoke mode of
# every GPU benchmark (each proves its code runs; its figures mean nothing).
BENCH_ARGS ?= $(shell $(PY) -c 'import torch; print("" if torch.cuda.is_available() else "--smoke")')
bench: venv
	$(PY) -m bench.gpu_pipeline $(BENCH_ARGS)
ifeq ($(BENCH_ARGS),--smoke)
	$(PY) -m bench.gpu_pipeline --smoke --family sdxl
	$(PY) -m bench.gpu_pipeline --smoke --mixed
	$(PY) -m bench.gpu_pipeline --smoke --vae
	PYTHONPATH=$(VENV)/quant $(PY) -m bench.gpu_pipeline --smoke --levers int8,fp8,deepcache3
	$(PY) -m bench.gpu_service --smoke
endif

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# A development C2PA signing chain and key in data/c2pa/, for a trial with docker compose (.env);
# never for production (docs/provenance.md).
dev-credentials: venv
	$(PY) -c 'import pathlib, shared.content_credentials as c; print(*c.make_development_credentials(pathlib.Path("data/c2pa")), sep="\n")'

# The docs' tables of settings and of the request, rewritten from the code (--check: compare only).
docs: venv
	$(PY) scripts/docs_tables.py

# Re-resolve every dependency after a change to pyproject.toml (torch stays at constraints.txt).
lock: venv
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra api,worker,dev \
		--build-deps-for editable -c constraints.txt -o requirements.txt pyproject.toml \
		client/pyproject.toml
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links -c constraints.txt -o requirements-quant.txt requirements-quant.in

# The GPU worker image's lock (Dockerfile.worker installs it alone): the base dependencies, the
# `worker` extra and the build backend, at requirements.txt's versions, with PyPI's torch of the
# same release (on Linux a CUDA build, which brings the nvidia-* and triton packages) instead of the
# CPU build, resolved for the image's Python and platform. pip-compile resolves only for the Python
# that runs it, so uv does this: pinned with its hashes in requirements-tools.txt and installed,
# hash-checked, into $(VENV)/tools, outside the environment that requirements.txt alone makes.
CUDA_LOCK := requirements-worker-cuda.txt
CUDA_LOCK_PYTHON := 3.12
CUDA_LOCK_PLATFORM := x86_64-manylinux_2_28
CUDA_LOCK_WORK := $(VENV)/lock-cuda
lock-cuda: venv
	$(PIP) install --require-hashes --no-deps --upgrade --target $(VENV)/tools -r requirements-tools.txt
	mkdir -p $(CUDA_LOCK_WORK)
	grep -E '^[A-Za-z0-9._-]+==' requirements.txt | grep -v '^torch==' | cut -d' ' -f1 \
		>$(CUDA_LOCK_WORK)/requirements-pins.txt
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		>$(CUDA_LOCK_WORK)/build-system.txt
	$(VENV)/tools/bin/uv pip compile --quiet --no-config --generate-hashes \
		--python-version $(CUDA_LOCK_PYTHON) --python-platform $(CUDA_LOCK_PLATFORM) \
		--custom-compile-command "make lock-cuda" --extra worker --extra quant -c constraints.txt \
		-c $(CUDA_LOCK_WORK)/requirements-pins.txt -o $(CUDA_LOCK_WORK)/lock.txt pyproject.toml \
		$(CUDA_LOCK_WORK)/build-system.txt
	{ printf '%s\n' \
		"# The GPU worker image's dependencies (Dockerfile.worker), each pinned with its hashes: the" \
		"# base ones, the worker extra's and the build backend, at requirements.txt's versions, with" \
		"# PyPI's CUDA build of torch in place of the CPU build. Regenerate with: make lock-cuda" \
		"# python-version: $(CUDA_LOCK_PYTHON)" \
		"# python-platform: $(CUDA_LOCK_PLATFORM) (wheels that Ubuntu 24.04's glibc 2.39 runs)"; \
		cat $(CUDA_LOCK_WORK)/lock.txt; } >$(CUDA_LOCK)

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
