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


def test_readme_gives_the_two_commands_with_measured_times_and_a_generated_table():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert re.search(r"`make test` took \*\*\d+ min \d+ s\*\*", text), "state the measured time of make test"
    assert re.search(r"`make demo` then took \*\*\d+ min \d+ s\*\*", text), \
        "state the measured time of make demo"
    from flowlib.main_job import BEGIN, END

    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert "| Method |" in table, "run `make demo` to generate the results table"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((README.parent / path).is_file() for path in images), images
