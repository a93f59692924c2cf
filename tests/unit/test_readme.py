"""The README's settings table names every setting there is, and nothing else."""

import re

from txt2img.settings import ClientSettings

from shared.settings import _T2ISettings
from tests.support import REPO_ROOT


def test_readme_lists_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(T2I_[A-Z0-9_]+)`", readme, re.M))
    classes = [*_T2ISettings.__subclasses__(), ClientSettings]
    defined = {f"T2I_{name.upper()}" for settings in classes for name in settings.model_fields}
    assert len(classes) >= 6
    assert documented == defined
