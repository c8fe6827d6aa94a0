"""Every import the README, the docs, ``examples/`` and the package's docstrings show keeps working, and every
module or name that moved answers at its old path with a DeprecationWarning (the README's migration table)."""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest

from dsdkit._moved import MOVED, RENAMED

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("dsdkit", "runtime", "train", "export")
_FENCE = re.compile(r"```(?:python|py)\n(.*?)```", re.S)
_INLINE = re.compile(r"`((?:from dsdkit[\w.]* import [\w, ]+)|(?:import dsdkit[\w.]*))`")
#: Sphinx-style cross references in docstrings: :func:`dsdkit.x.y`, :class:`~dsdkit.x.Y`.
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):`~?(dsdkit(?:\.\w+)+)`")


def _imports_in_code(code: str, where: str) -> list[tuple[str, str, str | None]]:
    """(where, module, name or None) of each dsdkit import in ``code``; code that does not parse is skipped here
    (the docs' own tests check every block's syntax)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(where, a.name, None) for a in node.names if a.name.split(".")[0] == "dsdkit"]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "dsdkit":
            found += [(where, node.module, a.name) for a in node.names if a.name != "*"]
    return found


def shown_imports() -> list[tuple[str, str, str | None]]:
    found = []
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text("utf-8")
        name = page.relative_to(ROOT).as_posix()
        for block in _FENCE.findall(text):
            found += _imports_in_code(block, name)
        for inline in _INLINE.findall(text):
            found += _imports_in_code(inline, name)
    for script in sorted((ROOT / "examples").rglob("*.py")):
        found += _imports_in_code(script.read_text("utf-8"), script.relative_to(ROOT).as_posix())
    return sorted(set(found), key=lambda item: (item[0], item[1], item[2] or ""))


def docstring_references() -> list[tuple[str, str]]:
    found = set()
    for folder in PACKAGE_DIRS:
        for source in sorted((ROOT / folder).rglob("*.py")):
            for reference in _ROLE.findall(source.read_text("utf-8")):
                found.add((source.relative_to(ROOT).as_posix(), reference))
    return sorted(found)


def _resolve(dotted: str):
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(dotted)


def test_the_shown_imports_were_found():
    imports = shown_imports()
    # The README and examples show the library's entry points; an extraction that finds none is broken.
    assert any(where == "README.md" for where, _, _ in imports), imports
    assert any(where.startswith("examples/") for where, _, _ in imports), imports
    assert len(docstring_references()) > 50


@pytest.mark.parametrize("where, module, name", shown_imports(), ids=lambda v: str(v))
def test_every_shown_import_works(where, module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # what users are shown must be the current path
        imported = importlib.import_module(module)
        if name is not None:
            assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}") is not None, (
                f"{where}: from {module} import {name} fails"
            )


def test_every_docstring_reference_resolves():
    broken = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for where, reference in docstring_references():
            try:
                _resolve(reference)
            except (ImportError, AttributeError):
                broken.append(f"{where}: {reference}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_a_moved_module_answers_at_its_old_path_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        module = importlib.import_module(old) if old not in importlib.sys.modules else _reimport(old)
    assert module is importlib.import_module(new)


def _reimport(old: str):
    importlib.sys.modules.pop(old)
    return importlib.import_module(old)


@pytest.mark.parametrize("where, old", [*((m, n) for m, n in RENAMED), ("dsdkit.runtime.config", "TimestepSchedule")])
def test_a_renamed_class_answers_to_its_old_name_with_a_warning(where, old):
    module = importlib.import_module(where)
    new = RENAMED.get((where, old), "TimestepTable")
    home, _, name = new.rpartition(":")
    with pytest.warns(DeprecationWarning, match=name):
        assert getattr(module, old) is getattr(importlib.import_module(home) if home else module, name)
    with pytest.raises(AttributeError):
        module.NoSuchName  # noqa: B018 - only the renamed names are answered
