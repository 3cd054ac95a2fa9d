"""Every chapter is committed executed, in order: otherwise nbval has nothing to compare."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests import toc

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
NOTEBOOKS = [*CHAPTERS, ROOT / "using_celib.ipynb"]  # the chapters and the recipes page


def test_every_chapter_in_the_toc_exists():
    chapters = toc.chapters()
    assert len(chapters) == 9
    assert sorted(f"chapters/{p.stem}" for p in CHAPTERS) == sorted(chapters)
    assert "using_celib" in toc.toc_pages()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_executed_in_order(path: pathlib.Path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, f"{path.name} has no code cells"
    counts = [c["execution_count"] for c in code]
    assert None not in counts, f"{path.name}: a code cell was never executed"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: re-run it top to bottom from a fresh kernel"
    for cell in code:
        source = "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags", [])
        assert "NBVAL_RAISES_EXCEPTION" not in source, f"{path.name}: use the raises-exception cell tag"
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                assert "raises-exception" in tags, f"{path.name}: unexpected error output {out['ename']}"
                shown = "".join(out.get("traceback", [])) + out.get("evalue", "")
                assert str(ROOT) not in shown and "site-packages" not in shown, (
                    f"{path.name}: a traceback shows a path of the machine that ran it")
            if out["output_type"] == "stream" and out["name"] == "stderr":
                raise AssertionError(f"{path.name}: stderr output (a warning?) in a cell: {''.join(out['text'])[:200]}")
    assert sum(c["cell_type"] == "markdown" and "".join(c["source"]).startswith("# ") for c in nb["cells"]) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_drawing_code_is_hidden(path: pathlib.Path):
    """A cell that draws a figure carries the hide-input tag: readers see the figure, not 40 lines of
    Matplotlib (the computation the figure shows lives in a visible cell before it)."""
    nb = json.loads(path.read_text())
    shown = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and "plt.show()" in "".join(c["source"])
             and "hide-input" not in c.get("metadata", {}).get("tags", [])]
    assert not shown, f"{path.name}: cells {shown} draw a figure with their code shown"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_run_in_the_check_cell(path: pathlib.Path):
    """Every chapter with solution code runs it through celib.book.solutions in a code cell."""
    from celib.book import solutions

    nb = json.loads(path.read_text())
    if not solutions.blocks(path):
        return
    calls = [c for c in nb["cells"] if c["cell_type"] == "code"
             and f'solutions.run("{path.name}", globals())' in "".join(c["source"])]
    assert len(calls) == 1, f"{path.name}: its solutions' code is not run by a check cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_machine_paths_in_stored_outputs(path: pathlib.Path):
    """No stored output (printed text, values, tracebacks) shows a path of the machine that ran it."""
    nb = json.loads(path.read_text())
    markers = (str(ROOT), "site-packages", "/.venv/", "/home/", "/root/", "/tmp/")
    for index, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            texts = ["".join(out.get("text", "")), "".join(out.get("traceback", [])), out.get("evalue", "")]
            texts += ["".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
            for text in texts:
                found = [m for m in markers if m in text]
                assert not found, f"{path.name}, cell {index}: an output shows {found}"
