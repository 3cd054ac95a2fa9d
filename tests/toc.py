"""The book's pages in reading order, from _toc.yml (the browser, PDF and notebook tests read it here)."""

from __future__ import annotations

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def toc_pages() -> list[str]:
    """Page paths (without extension) in reading order: the root, then every part's files."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]


def chapters() -> list[str]:
    """The numbered chapters' paths (``chapters/...``), in order; not the front or back matter."""
    return [p for p in toc_pages() if p.startswith("chapters/")]
