"""The README's Python example runs and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_its_comments_are_true():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    promised = [m.group(1).rstrip(" .") for m in re.finditer(r"print\(.*\)\s+# (.*)", blocks[0])]
    assert len(printed) == len(promised) == 3
    for line, comment in zip(printed, promised):
        assert line.startswith(comment), (line, comment)


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make book" in text and "make test" in text
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^book:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
