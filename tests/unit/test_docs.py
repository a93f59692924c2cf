"""The README is a landing page, the manual in docs/ has tables generated from the code that are
up to date, every relative link leads somewhere, and the examples talk to `$T2I_API_URL`."""

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from shared.settings import _T2ISettings
from tests.support import REPO_ROOT, setting_names

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"(?ms)^ *```.*?^ *```")


def docs_tables() -> ModuleType:
    path = REPO_ROOT / "scripts" / "docs_tables.py"
    spec = importlib.util.spec_from_file_location("docs_tables", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose(text: str) -> str:
    """Markdown without its fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`]+`", "", FENCED.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    headings = re.findall(r"(?m)^#{1,6} (.+)$", FENCED.sub("", path.read_text()))
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_generated_tables_are_up_to_date() -> None:
    diffs = docs_tables().stale_pages()
    assert not diffs, "run `make docs`:\n" + "".join(diffs)


def test_the_settings_table_lists_every_setting_once() -> None:
    page = (REPO_ROOT / "docs" / "settings.md").read_text()
    documented = re.findall(r"^\| `(T2I_[A-Z0-9_]+)`", page, re.M)
    assert len(_T2ISettings.__subclasses__()) >= 6
    assert len(documented) == len(set(documented))
    assert set(documented) == setting_names()


def test_the_request_table_lists_every_field() -> None:
    from shared.schema import GenerationRequest

    page = (REPO_ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)`", page, re.M))
    assert set(GenerationRequest.model_fields) <= documented


def test_the_readme_is_a_landing_page_that_links_every_docs_page() -> None:
    readme = README.read_text()
    assert len(readme.splitlines()) < 300
    linked = {(README.parent / target).resolve() for target in LINK.findall(prose(readme))}
    assert {page.resolve() for page in DOCS} <= linked


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.name)
def test_relative_links_lead_to_files_and_headings_that_exist(page: Path) -> None:
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target}"


def _examples(language: str) -> list[str]:
    pages = [README.read_text(), *(page.read_text() for page in DOCS)]
    return [
        block for text in pages for block in re.findall(rf"```{language}\n(.*?)```", text, re.S)
    ]


def test_examples_talk_to_t2i_api_url() -> None:
    commands = [line.split(" #")[0] for block in _examples("sh") for line in block.splitlines()]
    assert sum("$T2I_API_URL" in command for command in commands) >= 15
    for command in commands:
        # Starting the service on other ports names loopback addresses; talking to it does not.
        if "127.0.0.1" in command and not command.endswith("make run"):
            assert command.startswith("export T2I_API_URL=http://127.0.0.1:8000"), command
    default = 'os.environ.get("T2I_API_URL", "http://127.0.0.1:8000")'
    for block in _examples("python"):
        assert "127.0.0.1" not in block.replace(default, ""), block


def test_example_inputs_exist_and_are_what_the_docs_say() -> None:
    from PIL import Image

    for name in ("photo", "mask"):
        path = REPO_ROOT / "examples" / f"{name}.png"
        assert path.stat().st_size < 150 * 1024
        assert Image.open(path).size == (512, 512)
    text = "".join(page.read_text() for page in [README, *DOCS])
    assert not re.search(r"base64 -w0 (?!examples/)", text)
