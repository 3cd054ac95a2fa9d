"""Sphinx glue for the book: offline MathJax and celib's interactive figures.

- MathJax 3 is served from the built site itself (copied from the
  ``django-static-mathjax`` package installed from PyPI), so math renders with
  no network.
- Thebe's scripts are dropped (no live kernels here).
- The ``{penalty-of-confidence}`` directive inserts the self-contained widget
  from :func:`celib.book.widgets.penalty_of_confidence_html`, computed at build time.
"""

from __future__ import annotations

import pathlib
import shutil

from docutils import nodes
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


class PenaltyOfConfidence(SphinxDirective):
    """``{penalty-of-confidence}``: the interactive loss-vs-probability figure."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from celib.book.widgets import penalty_of_confidence_html

        return [nodes.raw("", penalty_of_confidence_html(), format="html")]


def setup(app: Sphinx) -> dict:
    _mathjax_source()  # fail early, with a clear message, if MathJax is missing
    app.connect("config-inited", lambda app, config: setattr(config, "mathjax_path", f"{MATHJAX_DIR}/tex-svg.js"))
    app.connect("build-finished", _copy_mathjax)
    app.connect("html-page-context", _drop_thebe)
    app.add_directive("penalty-of-confidence", PenaltyOfConfidence)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
