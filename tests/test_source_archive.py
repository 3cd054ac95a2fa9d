"""The book's source download (_ext/celib_book.py): what it holds, and that celib imports from it."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ext():
    spec = importlib.util.spec_from_file_location("celib_book_ext", ROOT / "_ext" / "celib_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_archive_unpacks_and_celib_imports_from_it(tmp_path):
    ext = _ext()
    archive = tmp_path / ext.SOURCE_ARCHIVE
    size = ext.write_source_archive(ROOT, archive)
    assert 0 < size < 20 * 2**20
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(n.split("/", 1)[1] for n in names) == sorted(t for t in tracked if (ROOT / t).is_file())
    assert not any(part in n.split("/") for n in names for part in (".venv", "_build", ".git"))
    tree = tmp_path / "unpacked" / ext.SOURCE_PREFIX
    for needed in ("Makefile", "pyproject.toml", "constraints.txt", "README.md", "_config.yml",
                   "chapters/01_definition.ipynb", "celib/__init__.py"):
        assert (tree / needed).is_file(), needed
    out = subprocess.run([sys.executable, "-c", "import celib, sys; print(celib.__file__)"], cwd=tmp_path,
                         env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         check=True)
    assert pathlib.Path(out.stdout.strip()).resolve() == (tree / "celib" / "__init__.py").resolve()
    # built again from the unpacked tree (no .git; other file times): the same bytes
    for path in tree.rglob("*"):
        os.utime(path, (1e9, 1e9))
    again = tmp_path / "again.tar.gz"
    ext.write_source_archive(tree, again)
    assert again.read_bytes() == archive.read_bytes()
