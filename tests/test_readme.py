"""The README's Python code blocks run as written (in a temporary folder with a small catalogue)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from imagegen import make_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_shows_the_two_setup_commands_first() -> None:
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block is not None
    assert "make demo" in first_block.group(1) and "make test" in first_block.group(1)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path / "catalogue", n_classes=3, per_class=6, size=32)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(_python_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.strip(), "the block printed nothing"
