"""The API reference (api.md) documents every public name, and its examples run (make test: doctest)."""

from __future__ import annotations

import pathlib
import re
import types

import celib
import celib.distributed
import celib.integrations.transformers
import celib.kernels
import celib.nn
import celib.ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _documented() -> set[str]:
    return set(re.findall(r"^\.\. auto(?:function|class|exception|data):: (\S+)", (ROOT / "api.md").read_text(), re.M))


def test_every_public_name_is_documented():
    documented = _documented()
    expected = {f"celib.{n}" for n in celib.__all__ if not isinstance(getattr(celib, n), types.ModuleType)}
    for module in (celib.nn, celib.ref, celib.distributed, celib.kernels, celib.integrations.transformers):
        expected |= {f"{module.__name__}.{n}" for n in module.__all__}
    assert expected - documented == set(), f"public names missing from api.md: {sorted(expected - documented)}"


def test_submodules_declare_their_public_names():
    for module in (celib.nn, celib.ref, celib.distributed, celib.kernels, celib.integrations.transformers):
        public = {n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", "").startswith(module.__name__)}
        assert public <= set(module.__all__), f"{module.__name__}: public but not in __all__: {public - set(module.__all__)}"
