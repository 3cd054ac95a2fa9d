"""The API reference (api.md) documents every public name, and its examples run (make test: doctest)."""

from __future__ import annotations

import pathlib
import re
import types

import celib
import celib.distributed
import celib.integrations.transformers
import celib.kernels
import celib.kernels.tools
import celib.linear
import celib.nn
import celib.ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _documented() -> set[str]:
    return set(re.findall(r"^\.\. auto(?:function|class|exception|data):: (\S+)", (ROOT / "api.md").read_text(), re.M))


def test_every_public_name_is_documented():
    documented = _documented()
    expected = {f"celib.{n}" for n in celib.__all__ if not isinstance(getattr(celib, n), types.ModuleType)}
    for module in (celib.nn, celib.ref, celib.distributed, celib.kernels, celib.kernels.tools,
                   celib.linear, celib.integrations.transformers):
        expected |= {f"{module.__name__}.{n}" for n in module.__all__
                     if getattr(celib, n, None) is not getattr(module, n)}  # re-exported: documented as celib.n
    assert expected - documented == set(), f"public names missing from api.md: {sorted(expected - documented)}"


def test_submodules_declare_their_public_names():
    for module in (celib.nn, celib.ref, celib.distributed, celib.kernels, celib.kernels.tools,
                   celib.linear, celib.integrations.transformers):
        public = {n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", "").startswith(module.__name__)}
        assert public <= set(module.__all__), f"{module.__name__}: public but not in __all__: {public - set(module.__all__)}"


def test_napoleon_reads_each_parameter_and_the_returns_as_written():
    """Google-style sections as the API page's napoleon parses them: a line 'a, b, c: text' in Args gives
    every one of them the whole text (a description that belongs to one), and a colon in the first line of
    Returns makes its start a return *type* (the page then shows the rest cut off)."""
    import inspect

    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    config = Config(napoleon_use_param=True, napoleon_use_rtype=True)
    for module in (celib, celib.nn, celib.ref, celib.distributed, celib.kernels, celib.kernels.tools,
                   celib.integrations.transformers):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            assert not re.search(r"^    \w+(, \w+)+: ", doc.split("Returns:")[0], re.M), f"{name}: grouped Args"
            rendered = str(GoogleDocstring(doc, config, what="function"))
            assert ":rtype:" not in rendered, f"{module.__name__}.{name}: Returns parsed as a type"
