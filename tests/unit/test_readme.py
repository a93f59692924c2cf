"""The README's settings table names every setting there is, and nothing else."""

import re

from shared.settings import _T2ISettings
from tests.support import REPO_ROOT, setting_names


def test_readme_lists_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(T2I_[A-Z0-9_]+)`", readme, re.M))
    assert len(_T2ISettings.__subclasses__()) >= 6
    assert documented == setting_names()
