"""The README's code example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_reuse_example_runs():
    text = README.read_text()
    marker = "<!-- readme-example: this block is run by tests/test_readme.py -->"
    assert marker in text
    block = re.search(r"```python\n(.*?)```", text.split(marker, 1)[1], re.S).group(1)
    assert 5 <= len(block.strip().splitlines()) <= 14
    exec(compile(block, "README example", "exec"), {})
