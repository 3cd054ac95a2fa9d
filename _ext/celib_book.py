"""Sphinx glue for the book: offline MathJax and celib's interactive figures.

- MathJax 3 is served from the built site itself (copied from the
  ``django-static-mathjax`` package installed from PyPI), so math renders with
  no network.
- Thebe's scripts are dropped (no live kernels here).
- The ``{penalty-of-confidence}`` directive inserts the self-contained widget
  from :func:`celib.book.widgets.penalty_of_confidence_html`, computed at build time.
- The book carries its own source: ``_static/crossentropy-book-src.tar.gz``, made
  at build time from the checkout (the files git tracks, or, built from an
  unpacked archive, the same files found on disk), so a reader can run it.
- The front page's title is the book's title once, not "title — title".
- In the PDF (the LaTeX builder) the code of cells tagged ``hide-input`` is left out, as the HTML
  book folds it away: the figure stays, the forty lines of Matplotlib go.
- The reference list is labelled author-year, as the citations in the text are
  ("[Cover and Thomas, 2006]" in both), with each entry's DOI, arXiv id or URL.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import shutil
import subprocess
import tarfile

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

MATHJAX_DIR = "mathjax"


def _mathjax_source() -> pathlib.Path:
    import mathjax  # the django-static-mathjax distribution's package

    source = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (source / "tex-svg.js").is_file():
        raise RuntimeError(f"MathJax's tex-svg.js not found under {source}; reinstall django-static-mathjax.")
    return source


def _copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        target = pathlib.Path(app.outdir) / "_static" / MATHJAX_DIR
        shutil.copytree(_mathjax_source(), target, dirs_exist_ok=True)


def _drop_thebe(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Remove Thebe's scripts: the book has no live kernels, and Jupyter Book 1 adds its
    configuration twice, which is a JavaScript error on every page."""
    if "script_files" in context:
        context["script_files"] = [
            js for js in context["script_files"]
            if "thebe" not in (getattr(js, "filename", None) or str(js)) and "THEBE_JS_URL" not in js.attributes.get("body", "")
        ]


def _register_author_year_style() -> None:
    """A pybtex style ``celib_author_year``: the unsrt formatting (which prints DOIs, arXiv ids and
    URLs), sorted by author and year, with labels written the way sphinxcontrib-bibtex's author_year
    citations are: "Last", "Last and Other", "Last et al." (three or more), then ", year"."""
    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.unsrt import Style as Unsrt
    from pybtex.style.labels import BaseLabelStyle

    import codecs

    import latexcodec  # noqa: F401  (pybtex's dependency; registers the "ulatex" codec)

    def last(person) -> str:  # M{\\"u}ller -> Müller, {Hugging Face} -> Hugging Face
        return codecs.decode(" ".join(person.last_names), "ulatex").replace("{", "").replace("}", "")

    class AuthorYearLabels(BaseLabelStyle):
        def format_labels(self, sorted_entries):
            for entry in sorted_entries:
                people = entry.persons.get("author") or entry.persons.get("editor") or []
                listed = [p for p in people if last(p) != "others"]  # "and others" in the .bib
                if len(listed) < len(people):
                    people = listed + [None, None]  # et al.
                if len(people) >= 3:
                    names = f"{last(people[0])} et al."
                elif len(people) == 2:
                    names = f"{last(people[0])} and {last(people[1])}"
                elif people:
                    names = last(people[0])
                else:
                    names = entry.fields.get("key", entry.key)
                yield f"{names}, {entry.fields.get('year', 'n.d.')}"

    class AuthorYearStyle(Unsrt):
        default_label_style = "celib_author_year"
        default_sorting_style = "author_year_title"

    register_plugin("pybtex.style.labels", "celib_author_year", AuthorYearLabels, force=True)
    register_plugin("pybtex.style.formatting", "celib_author_year", AuthorYearStyle, force=True)


SOURCE_ARCHIVE = "crossentropy-book-src.tar.gz"
SOURCE_PREFIX = "crossentropy-book"
# What an unpacked archive holds besides what git tracks: nothing generated, no environment.
_NOT_SOURCE = {".git", ".venv", "_build", "__pycache__", ".ipynb_checkpoints", ".pytest_cache", "node_modules"}


def source_files(root: pathlib.Path) -> list[str]:
    """The book's source files, relative to ``root``: what git tracks in a checkout, or every file
    outside the generated folders when ``root`` is an unpacked archive (no ``.git``)."""
    if (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
        return sorted(f for f in out.stdout.decode().split("\0") if f and (root / f).is_file())
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and not _NOT_SOURCE.intersection(p.relative_to(root).parts)
        and not p.name.endswith((".pyc", ".egg-info"))
    )


def write_source_archive(root: pathlib.Path, target: pathlib.Path) -> int:
    """Write the gzipped tar of :func:`source_files` under ``crossentropy-book/``; returns its size.
    Entries carry fixed times, modes and owners, and the gzip header no time, so the same files give
    the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in source_files(root):
            info = tar.gettarinfo(str(root / name), arcname=f"{SOURCE_PREFIX}/{name}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if info.mode & 0o100 else 0o644
            with open(root / name, "rb") as handle:
                tar.addfile(info, handle)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return target.stat().st_size


def _write_source(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        write_source_archive(pathlib.Path(app.srcdir), pathlib.Path(app.outdir) / "_static" / SOURCE_ARCHIVE)


BOOK_PDF = "crossentropy-book.pdf"


def _latex_pdf(app: Sphinx) -> pathlib.Path:
    """Where `make pdf` leaves the LaTeX builder's PDF."""
    return pathlib.Path(app.srcdir) / "_build" / "latex" / "book.pdf"


def _mark_pdf(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if app.builder.format == "html" and _latex_pdf(app).is_file():
        context["metatags"] = context.get("metatags", "") + '<meta name="celib-book-pdf" content="yes">\n'


def _copy_or_unlink_pdf(app: Sphinx, exception: Exception | None) -> None:
    """Copy the PDF next to the pages; where there is none, the intro's link becomes plain text (no dead
    link in a book built without TeX Live)."""
    if exception is not None or app.builder.format != "html":
        return
    out = pathlib.Path(app.outdir)
    if _latex_pdf(app).is_file():
        (out / "_static").mkdir(exist_ok=True)
        shutil.copyfile(_latex_pdf(app), out / "_static" / BOOK_PDF)
        return
    _replace_in_pages(out, f'<a class="celib-pdf" href="_static/{BOOK_PDF}">{BOOK_PDF}</a>',
                      f"{BOOK_PDF} (not built with this copy of the book: <code>make pdf</code> makes it)")


def _replace_in_pages(out: pathlib.Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in the written top-level pages that contain it."""
    for page in out.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        if old in text:
            page.write_text(text.replace(old, new), encoding="utf-8")


def _title_once(app: Sphinx, exception: Exception | None) -> None:
    """A page titled like the book (the front page) is not titled "book — book": Sphinx's layout adds
    " — <book title>" in the template itself, so the written page is corrected."""
    if exception is not None or app.builder.format != "html":
        return
    book = app.config.html_title
    _replace_in_pages(pathlib.Path(app.outdir), f"<title>{book} &#8212; {book}</title>", f"<title>{book}</title>")


def _latex_stand_ins(app: Sphinx, config) -> None:
    stand_in = str(pathlib.Path(__file__).parent / "latex" / "bbm.sty")
    if stand_in not in config.latex_additional_files:
        config.latex_additional_files = [*config.latex_additional_files, stand_in]


def _drop_hidden_input(app: Sphinx, doctree, docname: str) -> None:
    """LaTeX only: remove the input of every cell tagged hide-input (myst-nb leaves remove-input's out)."""
    if app.builder.format != "latex":
        return
    for cell in list(doctree.findall(nodes.container)):
        classes = cell.get("classes", [])
        if "cell" in classes and "tag_hide-input" in classes:
            for child in list(cell.children):
                if isinstance(child, nodes.container) and "cell_input" in child.get("classes", []):
                    cell.remove(child)


def _exercise_refs_across_chapters(app: Sphinx, doctree, docname: str) -> None:
    """LaTeX only: a reference to an exercise of another chapter points at the label sphinx-exercise
    writes (``exercise:<label>``), as its own references within a chapter do; left as they are, they
    point at ``<docname>:<label>``, which no page defines, and print "Exercise ??"."""
    if app.builder.format != "latex":
        return
    from sphinx_exercise.nodes import exercise_enumerable_node, exercise_latex_number_reference

    registry = getattr(app.env, "sphinx_exercise_registry", {})
    for ref in list(doctree.findall(addnodes.number_reference)):  # "Exercise N": digits, nothing to escape
        page, _, label = ref.get("refuri", "").partition("#")
        target = registry.get(label, {}).get("node")
        if page.startswith("%") and isinstance(target, exercise_enumerable_node):
            new = exercise_latex_number_reference(refid=label)
            new += ref.children
            ref.replace_self(new)


class PenaltyOfConfidence(SphinxDirective):
    """``{penalty-of-confidence}``: the interactive loss-vs-probability figure."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from celib.book.widgets import penalty_of_confidence_html

        return [nodes.raw("", penalty_of_confidence_html(), format="html")]


def setup(app: Sphinx) -> dict:
    _mathjax_source()  # fail early, with a clear message, if MathJax is missing
    _register_author_year_style()
    app.connect("config-inited", lambda app, config: setattr(config, "mathjax_path", f"{MATHJAX_DIR}/tex-svg.js"))
    app.connect("build-finished", _copy_mathjax)
    app.connect("build-finished", _write_source)
    app.connect("html-page-context", _drop_thebe)
    app.connect("build-finished", _title_once)
    app.connect("build-finished", _copy_or_unlink_pdf)
    app.connect("html-page-context", _mark_pdf)
    app.connect("doctree-resolved", _drop_hidden_input)
    app.connect("doctree-resolved", _exercise_refs_across_chapters)
    # Jupyter Book's LaTeX class loads bbm, a package only in TeX Live's 1.4 GB fonts-extra, for macros the
    # book never uses: a three-line stand-in (_ext/latex/bbm.sty) travels with the LaTeX sources.
    app.connect("config-inited", _latex_stand_ins)
    app.add_directive("penalty-of-confidence", PenaltyOfConfidence)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
