"""Run the code of a chapter's exercise solutions, so that it cannot rot.

A solution is a ``{solution}`` block in a markdown cell; its code is every
fenced ```` ```python ```` block inside it. :func:`run` executes each block,
as printed, in a fresh copy of the chapter's namespace (so one solution can
neither rebind a name another solution needs nor change the chapter's state)
and returns how many it ran: a chapter's check cell asserts that number, so a
solution that is deleted or loses its fence is noticed too.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re

__all__ = ["blocks", "run"]

_FENCE = re.compile(r"```python\n(.*?)```", re.S)


def blocks(notebook: str | pathlib.Path) -> list[str]:
    """The ```` ```python ```` blocks of every solution of ``notebook``, in order."""
    cells = json.loads(pathlib.Path(notebook).read_text())["cells"]
    found: list[str] = []
    for cell in cells:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and "{solution}" in text:
            found.extend(_FENCE.findall(text))
    return found


def run(notebook: str | pathlib.Path, namespace: dict) -> int:
    """Execute every solution block of ``notebook`` in a copy of ``namespace``.

    What a block prints is discarded (the book shows the code, not its output);
    an exception propagates with the block's own traceback. Returns the number
    of blocks run.
    """
    found = blocks(notebook)
    for block in found:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block, f"<solution of {pathlib.Path(notebook).name}>", "exec"), dict(namespace))
    return len(found)
