"""The GPU worker image's lock, requirements-worker-cuda.txt: every package hash-pinned, at the
versions requirements.txt (what CI tests) and requirements-quant.txt (the `quant` extra, which the
tests load from beside the environment) pin, but for torch's CUDA build of the same release;
made for the Python the image installs; and installed by Dockerfile.worker alone, hash-checked,
with nothing resolved at build time."""

import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.test_deploy_files import dockerfile_instructions
from tests.support import REPO_ROOT

CUDA_LOCK = "requirements-worker-cuda.txt"
CPU_LOCK = "requirements.txt"
QUANT_LOCK = "requirements-quant.txt"
TOOLS_LOCK = "requirements-tools.txt"
DOCKERFILE = "Dockerfile.worker"
# What torch's CUDA build brings that its CPU build does not: its CUDA libraries and triton.
CUDA_ONLY = re.compile(r"nvidia-.+|cuda-.+|triton")


@dataclass
class Pin:
    version: Version
    hashes: list[str] = field(default_factory=list)


@dataclass
class Lock:
    pins: dict[str, Pin]
    header: dict[str, str]  # the `# key: value` lines of the opening comment
    problems: list[str]  # what makes it no hash-checked lock of exact pins
    # The annotations: what requires each package (a package, or the file that names it).
    via: dict[str, set[str]]


def parse_lock(text: str) -> Lock:
    """A requirements file as pip reads it: continuation lines joined, comments dropped."""
    header: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if match := re.fullmatch(r"#\s*([a-z-]+):\s*(.+)", line):
            header[match[1]] = match[2]
    pins: dict[str, Pin] = {}
    problems: list[str] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        requirement, *options = re.split(r"\s+(?=--)", line)
        if requirement.startswith("-"):
            problems.append(f"an option line: {line}")
            continue
        req = Requirement(requirement)
        name = canonicalize_name(req.name)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or req.url or req.marker:
            problems.append(f"not an exact pin: {requirement}")
            continue
        hashes = [option.removeprefix("--hash=") for option in options]
        if not hashes or any(not h.startswith("sha256:") for h in hashes):
            problems.append(f"no sha256 hash, or an option other than --hash: {line}")
        if name in pins:
            problems.append(f"pinned twice: {name}")
        pins[name] = Pin(Version(specs[0].version), hashes)
    return Lock(pins, header, problems, parse_via(text))


def parse_via(text: str) -> dict[str, set[str]]:
    """`# via a` or `# via` then `#   a` lines, under each requirement (constraints left out)."""
    via: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"[A-Za-z0-9]", line):
            current = canonicalize_name(re.split(r"[=\[ ;]", line, maxsplit=1)[0])
            via[current] = set()
        elif current and (match := re.fullmatch(r"\s+# (?:via )?\s*(\S.*)", line)):
            via[current].add(match[1])
    for parents in via.values():
        parents -= {parent for parent in parents if parent == "via" or parent.startswith("-c ")}
    return via


def read_lock(path: str) -> Lock:
    return parse_lock((REPO_ROOT / path).read_text())


def version_problems(cuda: Lock, cpu: Lock) -> list[str]:
    """Where the CUDA lock is not requirements.txt with torch's CUDA build in place of its CPU
    build."""
    problems = []
    for name in sorted(cuda.pins.keys() & cpu.pins.keys() - {"torch"}):
        if cuda.pins[name].version != cpu.pins[name].version:
            problems.append(f"{name}: {cuda.pins[name].version} != {cpu.pins[name].version}")
    torch_cpu, torch_cuda = cpu.pins["torch"].version, cuda.pins.get("torch")
    if torch_cuda is None or torch_cuda.version != Version(torch_cpu.public):
        problems.append(f"torch: {torch_cuda and torch_cuda.version}, not {torch_cpu.public}")
    problems += [
        f"{name} is in no other lock and not one of torch's CUDA packages"
        for name in sorted(cuda.pins.keys() - cpu.pins.keys())
        if not CUDA_ONLY.fullmatch(name)
    ]
    return problems


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def makefile_variables() -> dict[str, str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return dict(re.findall(r"^([A-Z_]+)\s*:=\s*(.*?)\s*$", text, re.MULTILINE))


def pip_installs(path: str) -> list[list[str]]:
    """The argv of every `pip install` the Dockerfile's RUN instructions run."""
    found = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction != "RUN":
            continue
        lexer = shlex.shlex(arguments, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", "||", ";"):
                argv.append(token)
                continue
            if argv[:2] == ["pip", "install"]:
                found.append(argv)
            argv = []
    return found


def test_the_cuda_lock_pins_every_package_exactly_with_its_hashes() -> None:
    for path in (CUDA_LOCK, CPU_LOCK, TOOLS_LOCK):
        lock = read_lock(path)
        assert lock.pins and not lock.problems, (path, lock.problems)
    # The parser catches a requirement without hashes, a range, and an index of its own.
    assert parse_lock("torch==2.13.0 \\\n    --hash=sha256:00\n").problems == []
    assert parse_lock("torch==2.13.0\n").problems
    assert parse_lock("torch>=2.4 \\\n    --hash=sha256:00\n").problems
    assert parse_lock("--extra-index-url https://example.com/simple\n").problems


def test_the_cuda_lock_has_requirements_txts_versions_and_torchs_cuda_build() -> None:
    cuda, cpu = read_lock(CUDA_LOCK), read_lock(CPU_LOCK)
    cpu.pins.update(read_lock(QUANT_LOCK).pins)
    assert not version_problems(cuda, cpu)
    torch = cuda.pins["torch"].version
    assert torch.local is None and cpu.pins["torch"].version.local == "cpu"
    (constraint,) = [
        Requirement(line)
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("torch")
    ]
    assert str(constraint.specifier) == f"=={torch}"
    assert any(name.startswith("nvidia-") for name in cuda.pins), "no CUDA libraries"
    # Each disagreement is caught: another version of a shared package, torch's CPU build, and
    # a package that requirements.txt would pin at another version but does not pin at all.
    cuda.pins["diffusers"] = Pin(Version("0.1"), ["sha256:00"])
    cuda.pins["torch"] = Pin(cpu.pins["torch"].version, ["sha256:00"])
    cuda.pins["fastapi-extra"] = Pin(Version("1.0"), ["sha256:00"])
    assert len(version_problems(cuda, cpu)) == 3


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


def test_the_cuda_lock_holds_the_base_and_worker_dependencies_and_the_build_backend() -> None:
    project = pyproject()
    lock = read_lock(CUDA_LOCK)
    runtime = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["worker"],
        *project["project"]["optional-dependencies"]["quant"],
    ]
    build = project["build-system"]["requires"]
    assert len(runtime) >= 15 and build
    for line in runtime + build:
        req = Requirement(line)
        assert not req.marker, f"{line}: a marker this test does not evaluate"
        pin = lock.pins.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name} is not in {CUDA_LOCK}"
        assert req.specifier.contains(pin.version, prereleases=True), (line, pin.version)
    # And nothing else, by the lock's annotations: what the project requires directly is its base
    # and worker dependencies (no api or dev extra), the build backend is the one other root, and
    # every other package is there because a package in the lock requires it.
    direct = {
        name for name, parents in lock.via.items() if "txt2img-service (pyproject.toml)" in parents
    }
    assert direct == names(runtime)
    from_build = {
        name for name, parents in lock.via.items() if any(p.startswith("-r ") for p in parents)
    }
    assert from_build == names(build)
    assert lock.via.keys() == lock.pins.keys()
    for name, parents in lock.via.items():
        assert parents, f"{name}: no annotation says what requires it"
        unknown = {
            p for p in parents if not p.startswith(("txt2img-service ", "-r "))
        } - lock.pins.keys()
        assert not unknown, f"{name} is required by {unknown}, not in {CUDA_LOCK}"


def test_the_lock_is_for_the_python_and_platform_the_image_has() -> None:
    header = read_lock(CUDA_LOCK).header
    make = makefile_variables()
    assert make["CUDA_LOCK"] == CUDA_LOCK
    assert header["python-version"] == make["CUDA_LOCK_PYTHON"]
    assert header["python-platform"].split()[0] == make["CUDA_LOCK_PLATFORM"]
    assert make["CUDA_LOCK_PLATFORM"].startswith("x86_64-manylinux")
    instructions = dockerfile_instructions(DOCKERFILE)
    args = dict(
        arguments.split("=", 1)
        for name, arguments in instructions
        if name == "ARG"
        if "=" in arguments
    )
    assert args["PYTHON_VERSION"] == header["python-version"]
    # The ARG is the Python the image installs and makes its environment with, from the base
    # image's Ubuntu, which the lock's header names.
    run = " ".join(arguments for name, arguments in instructions if name == "RUN")
    assert '"python${PYTHON_VERSION}" -m venv /opt/venv' in run
    assert '"python${PYTHON_VERSION}-venv"' in run
    (base,) = [arguments for name, arguments in instructions if name == "FROM"]
    ubuntu = re.search(r"ubuntu(\d+\.\d+)$", base)
    assert ubuntu and f"Ubuntu {ubuntu[1]}" in header["python-platform"], (base, header)


def test_the_worker_image_installs_the_cuda_lock_alone_hash_checked() -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    copied = [args.split()[:-1] for name, args in instructions if name == "COPY"]
    assert [CUDA_LOCK] in copied
    installs = pip_installs(DOCKERFILE)
    assert len(installs) == 2
    lock_install, project_install = installs
    assert "--require-hashes" in lock_install and "--no-deps" in lock_install
    assert lock_install[lock_install.index("-r") + 1] == CUDA_LOCK
    # Then the project on top, resolving nothing and building with the lock's setuptools.
    assert project_install[2:] == ["--no-deps", "--no-build-isolation", "."]
    # The build refuses a lock made for another Python than the one it installs.
    (check,) = [args for name, args in instructions if name == "RUN" and CUDA_LOCK in args]
    assert f'grep -qx "# python-version: ${{PYTHON_VERSION}}" {CUDA_LOCK}' in check


def test_the_makefile_regenerates_the_cuda_lock_with_a_hash_checked_uv() -> None:
    text = (REPO_ROOT / "Makefile").read_text()
    (recipe,) = re.findall(r"^lock-cuda:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert f"--require-hashes --no-deps --upgrade --target $(VENV)/tools -r {TOOLS_LOCK}" in recipe
    assert "--generate-hashes" in recipe and "$(CUDA_LOCK)" in recipe
    assert "lock-cuda" in re.search(r"^\.PHONY:.*$", text, re.MULTILINE)[0]
    for path in (CUDA_LOCK, TOOLS_LOCK):
        assert "make lock-cuda" in (REPO_ROOT / path).read_text(), path
    assert "uv" in read_lock(TOOLS_LOCK).pins


@pytest.mark.parametrize("path", ["Dockerfile.api", DOCKERFILE])
def test_the_images_copy_every_directory_the_project_is_built_from(path: str) -> None:
    """setuptools refuses to build the project without each package's directory."""
    setuptools = pyproject()["tool"]["setuptools"]
    needed = set()
    for package in setuptools["packages"]:
        top = package.split(".")
        while top and ".".join(top) not in setuptools.get("package-dir", {}):
            top.pop()
        directory = setuptools["package-dir"][".".join(top)] if top else package.replace(".", "/")
        needed.add(directory.split("/")[0])
    copied = {args.split()[-1] for name, args in dockerfile_instructions(path) if name == "COPY"}
    assert {f"./{directory}" for directory in needed} <= copied, needed
