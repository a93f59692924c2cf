"""The Lua scripts the service runs in Redis, kept as files in shared/lua/.

A command file (`shared/lua/<name>.lua`) is one script a command runs; it opens with a header
naming its KEYS, ARGV, the keys it touches that are not in KEYS, and what it returns. Functions
several scripts share are fragments (`shared/lua/fragments/<name>.lua`), pasted in place of an
`--#include <name>` line. Values that come from Python (key names, limits) are written `{{NAME}}`
and filled from the constants a script is loaded with.
"""

import re
from functools import lru_cache
from pathlib import Path

LUA_DIR = Path(__file__).parent / "lua"
FRAGMENT_DIR = LUA_DIR / "fragments"

_INCLUDE = re.compile(r"^--#include (\S+)[ \t]*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class ScriptError(ValueError):
    """A script that cannot be rendered: a placeholder left unfilled, a constant it does not use,
    or an include that does not resolve."""


def load_script(name: str, **constants: str | int | float) -> str:
    """The text of command file `name` with its fragments pasted in and every `{{NAME}}` filled
    from `constants`, each of which the script must use."""
    text = _expand(LUA_DIR / f"{name}.lua", ())
    wanted = set(_PLACEHOLDER.findall(text))
    missing = sorted(wanted - constants.keys())
    unused = sorted(constants.keys() - wanted)
    if missing:
        raise ScriptError(f"{name}.lua: no value for {', '.join(missing)}")
    if unused:
        raise ScriptError(f"{name}.lua does not use {', '.join(unused)}")
    # One pass: a value is never searched for placeholders (the Celery message template has braces).
    return _PLACEHOLDER.sub(lambda match: str(constants[match[1]]), text)


def _expand(path: Path, including: tuple[Path, ...]) -> str:
    if path in including:
        chain = " -> ".join(p.stem for p in (*including, path))
        raise ScriptError(f"include cycle: {chain}")

    def fragment(match: re.Match[str]) -> str:
        return _expand(FRAGMENT_DIR / f"{match[1]}.lua", (*including, path))

    return _INCLUDE.sub(fragment, _read(path))


@lru_cache
def _read(path: Path) -> str:
    if not path.is_file():
        raise ScriptError(f"no Lua script {path.relative_to(LUA_DIR.parent)}")
    return path.read_text()
