"""The whole-book PDF built by `make pdf` (Jupyter Book's LaTeX builder, Debian's TeX Live).

Run by `make pdf` after the build, not by `make test` (TeX Live is a large install): every chapter is in
it, in order, with numbered figures and equations and the references; the code the HTML book hides is
left out; no page is empty; and a few pages are rendered to PNG with pdftoppm for a look.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import pytest
from tests import toc

ROOT = pathlib.Path(__file__).resolve().parents[2]
PDF = ROOT / "_build" / "latex" / "book.pdf"
PAGES_OUT = ROOT / "_build" / "pdf-pages"


def _chapter_titles() -> list[str]:
    titles = []
    for chapter in toc.chapters():
        cells = json.loads((ROOT / (chapter + ".ipynb")).read_text())["cells"]
        first = next(c for c in cells if c["cell_type"] == "markdown")
        titles.append("".join(first["source"]).splitlines()[0].lstrip("# ").strip())
    return titles


@pytest.fixture(scope="module")
def text() -> str:
    assert PDF.is_file(), f"{PDF} is missing: run `make pdf`"
    out = subprocess.run(["pdftotext", "-layout", str(PDF), "-"], capture_output=True, text=True, check=True)
    return out.stdout


def _pages() -> int:
    info = subprocess.run(["pdfinfo", str(PDF)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))


NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_every_chapter_in_order(text):
    """Each chapter opens with its heading, "CHAPTER <number> <TITLE>" (Sphinx's manual class), with the
    number the book gives it, and the headings come in the book's order."""
    flat = re.sub(r"\s+", " ", text).lower()
    titles = [t.lower() for t in _chapter_titles()]
    assert len(titles) == 9
    starts = []
    for number, title in zip(NUMBERS, titles):
        heading = re.search(rf"chapter {number} " + re.escape(title).replace(r"\ ", r"\s*"), flat)
        assert heading, f"no heading 'Chapter {number}: {title}' in the PDF"
        starts.append(heading.start())
    assert starts == sorted(starts), "chapters out of order"


def test_numbered_figures_equations_and_references(text):
    assert re.search(r"Fig\.\s*1\.1", text), "figures are not numbered"
    assert re.search(r"\(1\.1\)", text), "equations are not numbered"
    assert "Cover and Thomas, 2006" in text and "doi" in text.lower()


def test_hidden_code_left_out(text):
    for hidden in ("FancyBboxPatch((0, y0)", "ax.set_title(\"A literal softmax", "plt.show()"):
        assert hidden not in text, f"code hidden in the HTML book is printed in the PDF: {hidden!r}"
    assert "by_hand_losses" in text, "the visible code is missing"


def test_pages_are_not_empty_and_render():
    pages = _pages()
    assert 80 < pages < 600, pages
    shutil.rmtree(PAGES_OUT, ignore_errors=True)
    PAGES_OUT.mkdir(parents=True)
    # every page at a low resolution: each has ink (an empty page is almost all white)
    subprocess.run(["pdftoppm", "-r", "12", "-gray", str(PDF), str(PAGES_OUT / "p")], check=True)
    empty = []
    for png in sorted(PAGES_OUT.glob("p-*.pgm")):
        data = png.read_bytes()
        header_end = data.index(b"255\n") + 4
        pixels = data[header_end:]
        dark = sum(1 for b in pixels if b < 200)
        if dark < 0.002 * len(pixels):
            empty.append(png.name)
    assert empty == [], f"empty pages: {empty}"
    # the first pages of the book, at a readable resolution, to look at
    subprocess.run(["pdftoppm", "-r", "60", "-png", "-f", "1", "-l", "12", str(PDF), str(PAGES_OUT / "look")],
                   check=True)
    assert len(list(PAGES_OUT.glob("look-*.png"))) == 12


def test_no_unresolved_reference(text):
    """LaTeX prints ?? for a reference it could not resolve (an exercise of another chapter was one)."""
    assert "??" not in text
