"""The book's figure style: one place for sizes, fonts and colours.

Chapters call :func:`use_style` once and :func:`figure` for each figure, so
all figures look alike and stay readable in the HTML theme's dark mode (the
background is opaque white).
"""

from __future__ import annotations

from typing import Any

__all__ = ["COLORS", "PALETTE", "STYLE", "figure", "use_style"]

#: Colours by role, used consistently across chapters.
COLORS: dict[str, str] = {
    "ce": "#1f5fa8",       # cross-entropy / celib / the correct thing
    "torch": "#e07b00",    # PyTorch / the thing compared against
    "mse": "#b8322a",      # alternatives and mistakes
    "accent": "#2a9d5c",   # a third curve, highlights
    "muted": "#7f7f7f",    # guides, references
    "extra": "#7b4fa0",    # a fourth curve
}

#: An ordered palette for several curves (e.g. values of gamma).
PALETTE: list[str] = [COLORS[k] for k in ("ce", "torch", "accent", "mse", "extra", "muted")]

STYLE: dict[str, Any] = {
    "figure.figsize": (6.4, 4.0),
    # 150 dpi: sharp on a phone's 2x screen at its 350 CSS px, and the size the book's pages assume
    # (_static/celib.js keeps at least 55 CSS px per inch on a phone, so 12-point text stays ~9 px tall)
    "figure.dpi": 150,
    "savefig.dpi": 150,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.transparent": False,
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 10.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 2.0,
    "axes.prop_cycle": None,  # filled in by use_style
    "svg.hashsalt": "celib",  # deterministic SVG ids
}


def use_style() -> None:
    """Apply the book's matplotlib style (call once at the top of a chapter)."""
    import matplotlib as mpl
    from cycler import cycler

    style = dict(STYLE, **{"axes.prop_cycle": cycler(color=PALETTE)})
    mpl.rcParams.update(style)


def figure(nrows: int = 1, ncols: int = 1, *, width: float | None = None, height: float | None = None, **kwargs: Any):
    """A new figure and axes in the book's style: ``fig, ax = celib.book.plot.figure()``.

    ``width``/``height`` are in inches; by default 6.4 wide and 4.0 high per row
    (width grows to 4.2 per column for several columns).
    """
    import matplotlib.pyplot as plt

    use_style()
    w = width if width is not None else (6.4 if ncols == 1 else 4.2 * ncols)
    h = height if height is not None else 4.0 * nrows
    return plt.subplots(nrows, ncols, figsize=(w, h), layout="constrained", **kwargs)
