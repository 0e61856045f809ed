"""The public API of ``hf_px``: every name in ``__all__`` resolves, ``dir()`` lists it, ``import hf_px`` stays light."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import hf_px

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_and_is_listed():
    assert sorted(hf_px.__all__) == hf_px.__all__ and len(set(hf_px.__all__)) == len(hf_px.__all__)
    assert set(hf_px.__all__) == set(hf_px._SOURCES)
    listed = dir(hf_px)
    for name in hf_px.__all__:
        value = getattr(hf_px, name)
        assert value is not None and name in listed, name
        assert getattr(importlib.import_module(f"hf_px.{hf_px._SOURCES[name]}"), name) is value
        assert not inspect.ismodule(value), f"hf_px.{name} is a module, not the public object"
    star: dict = {}
    exec("from hf_px import *", star)
    assert set(hf_px.__all__) <= set(star)


def test_type_checkers_see_the_same_names():
    # the TYPE_CHECKING block imports exactly __all__, each from the module __getattr__ loads it from
    tree = ast.parse((ROOT / "hf_px" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert sorted(seen) == hf_px.__all__
    assert seen == hf_px._SOURCES


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        hf_px.not_a_name  # noqa: B018
    assert hf_px.registry is importlib.import_module("hf_px.registry")  # submodules load on attribute access too


def test_import_is_light():
    code = ("import sys, hf_px; heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
