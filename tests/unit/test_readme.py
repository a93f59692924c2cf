"""The README's settings table names every setting there is, and nothing else."""

import re

from shared.settings import (
    ApiSettings,
    ClientSettings,
    CoreSettings,
    StorageSettings,
    WorkerSettings,
)
from tests.support import REPO_ROOT


def test_readme_lists_every_setting() -> None:
    documented = set(
        re.findall(r"^\| `(T2I_[A-Z0-9_]+)`", (REPO_ROOT / "README.md").read_text(), re.M)
    )
    defined = {
        f"T2I_{name.upper()}"
        for settings in (CoreSettings, StorageSettings, ApiSettings, WorkerSettings, ClientSettings)
        for name in settings.model_fields
    }
    assert documented == defined
