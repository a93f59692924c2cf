"""The OpenAI and AUTOMATIC1111 examples of docs/integrations.md, run as written against a real API
and worker."""

import io
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.support import REPO_ROOT, Stack, service_env

SECTION = "## OpenAI and AUTOMATIC1111 APIs"


def section_examples() -> list[tuple[str, str]]:
    """The (language, code) of every fenced example in the docs' compatibility section."""
    page = (REPO_ROOT / "docs" / "integrations.md").read_text()
    section = page.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|sh)\n(.*?)```", section, re.S)


def test_the_compatibility_examples_work_as_written(local_stack: Stack, tmp_path: Path) -> None:
    examples = section_examples()
    assert [language for language, _ in examples] == ["python", "sh", "python"]
    env = service_env(T2I_API_URL=local_stack.base_url, T2I_API_KEY=local_stack.api_key)
    for language, code in examples:
        command = [sys.executable, "-c", code] if language == "python" else ["bash", "-c", code]
        for old in tmp_path.glob("*.png"):
            old.unlink()
        result = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, code + result.stdout + result.stderr
        written = sorted(tmp_path.glob("*.png"))
        assert written, code
        for path in written:
            image = Image.open(io.BytesIO(path.read_bytes()))
            assert (image.format, image.size) == ("PNG", (512, 512))
            assert image.info["parameters"].startswith("a lighthouse at dusk")
