"""The Lua scripts in shared/lua/: each one used, documented, and accepted by a real Redis."""

import re
from pathlib import Path

import pytest
from redis import Redis

from shared.jobscripts import fair_scripts
from shared.scripts import FRAGMENT_DIR, LUA_DIR, ScriptError, load_script

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = sorted(path.stem for path in LUA_DIR.glob("*.lua"))
FRAGMENTS = sorted(path.stem for path in FRAGMENT_DIR.glob("*.lua"))
# The header every command file opens with, one label per line.
HEADER_LABELS = ("KEYS", "ARGV", "Other keys:", "Returns:")


def _python_sources() -> str:
    return "\n".join(
        path.read_text()
        for part in ("api", "shared", "worker")
        for path in (ROOT / part).rglob("*.py")
    )


def _rendered() -> dict[str, str]:
    """Every command script as the code renders it: the fair-share ones from the job store, the
    rest, which take no constants, as they are."""
    scripts = fair_scripts(12.5)
    for name in COMMANDS:
        if name not in scripts:
            scripts[name] = load_script(name)
    return scripts


def _header(name: str) -> list[str]:
    lines = (LUA_DIR / f"{name}.lua").read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("--") or line.startswith("--#include"):
            break
        header.append(line)
    return header


def test_every_command_file_is_loaded_by_the_code() -> None:
    sources = _python_sources()
    assert COMMANDS
    unused = [name for name in COMMANDS if f'"{name}"' not in sources]
    assert not unused, f"no code loads {unused}"


def test_every_fragment_is_included_and_every_include_exists() -> None:
    included = set()
    for path in [*LUA_DIR.glob("*.lua"), *FRAGMENT_DIR.glob("*.lua")]:
        included.update(re.findall(r"^--#include (\S+)", path.read_text(), re.MULTILINE))
    assert included == set(FRAGMENTS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_file_header_names_keys_argv_and_reply(name: str) -> None:
    header = _header(name)
    assert len(header) > 1, f"{name}.lua opens with no header"
    for label in HEADER_LABELS:
        assert any(line.startswith(f"-- {label}") for line in header), f"{name}.lua: no {label}"


def test_rendered_scripts_cover_every_command_and_fill_every_placeholder() -> None:
    rendered = _rendered()
    assert sorted(rendered) == COMMANDS
    for name, text in rendered.items():
        assert "{{" not in text, name
        assert "--#include" not in text, name


def test_an_unfilled_placeholder_is_refused() -> None:
    with pytest.raises(ScriptError, match="CANCEL_CHANNEL"):
        load_script("compare_and_set")
    # A fragment's placeholders count as the script's own.
    with pytest.raises(ScriptError, match="FAIR_PREFIX"):
        load_script("requeue")


def test_an_unknown_constant_is_refused() -> None:
    with pytest.raises(ScriptError, match="NOT_IN_THE_SCRIPT"):
        load_script("rewrite_end", NOT_IN_THE_SCRIPT="x")


def test_a_missing_script_is_refused() -> None:
    with pytest.raises(ScriptError):
        load_script("no_such_script")


def test_every_script_compiles_on_redis(redis_client: Redis) -> None:
    for name, text in _rendered().items():
        sha = redis_client.script_load(text)
        assert redis_client.script_exists(sha) == [True], name
