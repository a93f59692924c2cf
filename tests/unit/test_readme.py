"""The README's settings table names every setting there is, and nothing else."""

import re

from shared.settings import _T2ISettings
from tests.support import REPO_ROOT, setting_names


def test_readme_lists_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(T2I_[A-Z0-9_]+)`", readme, re.M))
    assert len(_T2ISettings.__subclasses__()) >= 6
    assert documented == setting_names()


def _examples(language: str) -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", readme, re.S)


def test_examples_talk_to_t2i_api_url() -> None:
    commands = [line.split(" #")[0] for block in _examples("sh") for line in block.splitlines()]
    assert sum("$T2I_API_URL" in command for command in commands) >= 15
    for command in commands:
        if "127.0.0.1" in command:
            assert command.startswith("export T2I_API_URL=http://127.0.0.1:8000"), command
    default = 'os.environ.get("T2I_API_URL", "http://127.0.0.1:8000")'
    for block in _examples("python"):
        assert "127.0.0.1" not in block.replace(default, ""), block
