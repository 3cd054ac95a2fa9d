"""celib/_versions.py: the version bounds, and the import-order trap a user meets first."""

from __future__ import annotations

import os
import re
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import celib
from celib import _backend, _versions, kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_bounds_name_the_minimum():
    assert _versions.parse("2.13.0+cpu") == (2, 13) and _versions.parse("3.4.0.dev2025") == (3, 4)
    _versions.require("torch", "2.9.1", (2, 9))
    with pytest.raises(ImportError, match=r"celib needs torch >= 2\.9, found torch 2\.8\.0"):
        _versions.require("torch", "2.8.0", (2, 9))
    with pytest.raises(ImportError, match=r"triton >= 3\.6"):
        _versions.require("triton", "3.5.1", _versions.MIN_TRITON)
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.9' in text and "triton>=3.6" in text  # the same bounds as the code
    readme = (ROOT / "README.md").read_text()
    assert "torch >= 2.9 and triton >= 3.6" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert "OLDEST_TRITON := 3.6.0" in makefile  # the bound is the version make test runs the kernels on


def test_interpreter_refused_where_triton_and_numpy_cannot_run_it():
    with pytest.raises(ImportError, match=r"Install numpy<2\.4, or triton>=3\.8"):
        _versions.check_interpreter("3.6.0", "2.4.6")
    _versions.check_interpreter("3.6.0", "2.3.5")
    _versions.check_interpreter("3.8.0", "2.4.6")
    _versions.check_interpreter("3.9.0", "2.5.2")


IMPORT_ORDER = """
import {first}
import torch, celib
x = torch.randn(4, 10) * 3
t = torch.randint(0, 10, (4,))
try:
    a = celib.cross_entropy(x, t, backend="triton")
except celib.InputError as err:
    print("InputError:", err)
else:
    assert abs(float(a) - float(celib.cross_entropy(x, t, backend="torch"))) < 1e-5
    print("ok")
"""


def _run(first: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", IMPORT_ORDER.format(first=first)], capture_output=True, text=True,
                         env=dict(base, **env), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the trap is a CPU-only machine's")
@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_import_order_on_a_cpu_machine():
    """torch._dynamo (which transformers imports) imports triton in compiled mode, and Triton cannot switch
    its own library to the interpreter afterwards: celib says so and gives the one-line fix; with the fix,
    or with celib imported first, the kernel runs."""
    assert _run("os") == "ok"  # celib imported before triton: it selects the interpreter itself
    message = _run("torch._dynamo")
    assert message.startswith("InputError:") and "imported in compiled mode before celib" in message
    assert "TRITON_INTERPRET=1" in message
    assert _run("torch._dynamo", TRITON_INTERPRET="1") == "ok"
    assert _run("celib; import torch._dynamo") == "ok"


def test_extras_install_what_their_features_need():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = lambda extra: {re.split(r"[<>=;\[ ]", r)[0] for r in extras[extra]}  # noqa: E731
    assert names("transformers") == {"transformers", "accelerate"}  # Trainer needs accelerate
    assert names("triton") == {"triton"}


def test_no_advice_to_install_celib_by_name_from_the_package_index():
    """'celib' on the package index is another project: every install line names the source tree."""
    texts = [p.read_text() for p in [ROOT / "README.md", ROOT / "intro.md", ROOT / "using_celib.ipynb",
                                     *ROOT.glob("celib/**/*.py"), *ROOT.glob("chapters/*.ipynb")]]
    for text in texts:
        assert not re.search(r"pip install[^\n]*['\"]?celib\[", text)
        assert not re.search(r"pip install celib\b", text)
    message = ""
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "_TRITON", False)
            _backend.require_triton()
    except ImportError as err:
        message = str(err)
    assert "pip install '.[triton]'" in message and "another project" in message


def test_import_celib_loads_no_instrument_no_triton_and_no_compiler():
    """The runtime never imports the measuring tools; triton and torch._dynamo load only when used."""
    code = ("import sys, celib; "
            "print(sorted(m for m in ('triton', 'torch._dynamo', 'celib.kernels.tools', "
            "'celib.kernels.tools.meter', 'celib.kernels.tools.resources') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
