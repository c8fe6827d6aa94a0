"""The error family: one exit code per class, each in the documented table and on the troubleshooting page."""

from __future__ import annotations

import re
from pathlib import Path

from dsdkit.runtime import errors

TROUBLESHOOTING = Path(__file__).parents[2] / "docs" / "troubleshooting.md"


def _family() -> list[type[errors.DsdkitError]]:
    found, pending = [], [errors.DsdkitError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_class_has_its_own_documented_exit_code():
    family = [cls for cls in _family() if cls.__module__ == errors.__name__]
    codes = [cls.exit_code for cls in family]
    assert len(set(codes)) == len(codes), {cls.__name__: cls.exit_code for cls in family}
    assert set(codes) <= set(errors.EXIT_CODES)
    assert {cls.__name__ for cls in family} <= set(errors.__all__)


def test_compile_failures_have_their_own_code():
    assert errors.CompileError.exit_code == 9
    assert errors.EXIT_CODES[9] == "torch.compile failed; run without --compile"
    assert issubclass(errors.CompileError, errors.DsdkitError)
    assert not issubclass(errors.CompileError, errors.ModelError)  # whose message is about the weights


def test_the_troubleshooting_page_lists_every_exit_code_with_its_fix():
    text = TROUBLESHOOTING.read_text(encoding="utf-8")
    paragraph = text[text.index("Errors are one line") :].split("\n\n", 1)[0]
    listed = {int(code) for code in re.findall(r"(?<![\w.`])(\d+) (?=[a-z`])", paragraph)}
    assert listed == set(errors.EXIT_CODES), paragraph
    # The table: a row per exit code, naming its class, with a fix.
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| (\d+) \|.*$", text, re.M)}
    assert set(rows) == set(errors.EXIT_CODES), sorted(rows)
    for cls in _family():
        if cls.__module__ == errors.__name__ and cls is not errors.DsdkitError:
            assert f"`{cls.__name__}`" in rows[cls.exit_code], cls.__name__
    assert all(row.rstrip(" |").rsplit("|", 1)[-1].strip() for code, row in rows.items() if code), rows
