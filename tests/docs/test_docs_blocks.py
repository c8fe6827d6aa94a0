"""Docs that cannot rot (issue 31 item 2): every shell command and Python block of the README and of docs/ is run
here, or marked with the reason it cannot be, and marked blocks are still checked.

The convention (docs/development.md, "Docs that cannot rot"):

- fenced blocks tagged ``bash`` / ``sh`` / ``shell`` / ``console`` are shell commands, ``python`` blocks Python;
  ``text``, ``json`` and untagged blocks are output, synopses or data (their ``dsdkit SUBCOMMAND`` lines are still
  checked for option names);
- ``<!-- not-run: REASON -->`` on the line just before a fence marks a block that is not run here, for one of
  :data:`REASONS`;
- unmarked blocks run, in page order, in a fresh folder holding a link to ``examples/``: ``dsdkit`` commands
  in-process through the CLI (exit code 0 required), other command lines in bash, each Python block in a fresh
  namespace; ``pip install`` lines are checked, not run (this environment is the ``dev`` install);
- marked blocks are checked: Python compiles, every ``dsdkit`` command's subcommand and options exist, every
  ``pip install`` names extras that exist, ``python PATH`` names a script that exists.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
REASONS = (
    "needs SD2 weights",
    "needs a GPU",
    "needs TensorRT",
    "needs a cluster",
    "needs the network",
    "runs until stopped",
    "too long for CI",
    "run by .ci/run",
    "run by .ci/readme_flows",
)
MARKER = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```([\w+-]*)\s*$")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    reason: str | None  # the not-run reason, None: the block runs

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.name}:{index + 1}: a code block that is never closed"
        marker = MARKER.match(lines[index - 1]) if index else None
        blocks.append(
            Block(page, index + 1, opened.group(1), "\n".join(lines[index + 1 : end]), marker and marker.group(1))
        )
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]


# -- reading commands -------------------------------------------------------------------------------------------------


def shell_lines(text: str) -> list[str]:
    """The block's command lines: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        if stripped and not stripped.startswith("#"):
            out.append(stripped)
    return out


def segments(line: str) -> list[list[str]]:
    """A command line's commands (split at ``&&``, ``||``, ``;`` and pipes) as argument lists, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            if current:
                parts.append(current)
            current = []
        else:
            current.append(token)
    if current:
        parts.append(current)
    return parts


def _click_app():
    import typer.main

    from dsdkit.cli import app

    return typer.main.get_command(app)


def _options(command) -> set[str]:
    names = set()
    for param in command.params:
        names.update(o for o in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())) if o[0] == "-")
    return names


def check_dsdkit(arguments: list[str], where: str) -> None:
    """``dsdkit ...``: the (sub)command exists and every option it is given is one of that command's."""
    group = _click_app()
    rest = list(arguments[1:])
    while rest and rest[0].startswith("-"):  # global options before the command
        assert rest[0] in _options(group) | {"--help"}, f"{where}: dsdkit has no global option {rest[0]}"
        rest.pop(0)
    command, path = group, ["dsdkit"]
    while hasattr(command, "list_commands") and rest:
        name = rest.pop(0)
        assert name in command.list_commands(None), f"{where}: {' '.join(path)} has no command {name!r}"
        command, path = command.get_command(None, name), [*path, name]
    known = _options(command) | {"--help"}
    for token in rest:
        if token.startswith("--") and len(token) > 2:
            name = token.split("=", 1)[0]
            assert name in known, f"{where}: {' '.join(path)} has no option {name}"
        elif re.fullmatch(r"-[a-zA-Z]", token):
            assert token in known, f"{where}: {' '.join(path)} has no option {token}"


def check_synopsis(line: str, where: str) -> None:
    """A synopsis line (``dsdkit match IMAGES CAPTIONS [--model M] ...``): the command and every option named."""
    words = line.split()
    arguments = ["dsdkit"]
    for word in words[1:]:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        arguments.append(word)
    arguments += re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z](?=[\s\]|]))", line)
    check_dsdkit(arguments, where)


def _extras() -> set[str]:
    import tomllib  # Python 3.11+, as the tests' environment is

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_pip(arguments: list[str], where: str) -> None:
    """``pip install ...``: extras of pyproject.toml, from a checkout (``.``) or a built wheel; a constraints file
    that exists."""
    for index, token in enumerate(arguments):
        if token == "-c":
            assert (ROOT / arguments[index + 1]).is_file(), f"{where}: no constraints file {arguments[index + 1]}"
        found = re.fullmatch(r"([\w./*-]*)\[([\w,-]+)\]", token)
        if found:
            source, extras = found.groups()
            assert source == "." or source.endswith(".whl"), f"{where}: install {token} from a checkout or a wheel"
            assert set(extras.split(",")) <= _extras(), f"{where}: {token} names an extra pyproject.toml lacks"


def check_python_script(arguments: list[str], where: str) -> None:
    script = next((a for a in arguments[1:] if not a.startswith("-")), None)
    if script is not None and script.endswith(".py"):
        assert (ROOT / script).is_file(), f"{where}: no script {script}"


def check_block(block: Block) -> None:
    if block.language == "python":
        compile(block.text, block.where, "exec")
    elif block.language in SHELL:
        for line in shell_lines(block.text):
            for arguments in segments(line):
                if arguments[0] == "dsdkit":
                    check_dsdkit(arguments, block.where)
                elif arguments[:2] == ["pip", "install"]:
                    check_pip(arguments, block.where)
                elif arguments[0] == "python":
                    check_python_script(arguments, block.where)
    else:  # output, synopsis or data: its dsdkit lines (a line that goes on indented continues the one above)
        lines: list[str] = []
        for raw in block.text.splitlines():
            if raw.startswith("dsdkit ") and re.match(r"dsdkit [a-z-]+( |$)", raw):
                lines.append(raw)
            elif raw.startswith(" ") and lines:
                lines[-1] += " " + raw.strip()
        for line in lines:
            check_synopsis(line.split("#")[0], block.where)


# -- the tests ------------------------------------------------------------------------------------------------------


def test_every_shell_and_python_block_runs_or_says_why_not():
    """A marker names one of the documented reasons; a marker sits only before a block that could run."""
    assert len(ALL_BLOCKS) > 40 and any(b.page.name == "README.md" for b in ALL_BLOCKS)
    for block in ALL_BLOCKS:
        if block.reason is not None:
            assert block.reason in REASONS, f"{block.where}: unknown not-run reason {block.reason!r}"
            assert block.language in (*SHELL, "python"), f"{block.where}: a marker on a {block.language!r} block"
        if block.language in (*SHELL, "python"):
            continue
        assert block.language in ("text", "json", ""), f"{block.where}: unknown block language {block.language!r}"
    markers = [
        (page, n) for page in PAGES for n, line in enumerate(page.read_text().splitlines(), 1) if MARKER.match(line)
    ]
    assert len(markers) == sum(b.reason is not None for b in ALL_BLOCKS), "a marker that is not on a fence's line"


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.where)
def test_every_block_is_well_formed(block):
    """Python compiles; dsdkit commands, synopses and pip installs name what exists (marked blocks too)."""
    check_block(block)


def test_the_checks_catch_what_rots():
    """The checks themselves: a renamed option, an unknown subcommand, an extra that does not exist."""
    with pytest.raises(AssertionError, match="has no option --sampling-steps"):
        check_dsdkit(shlex.split("dsdkit match a b --sampling-steps 4"), "x")
    with pytest.raises(AssertionError, match="has no command 'score'"):
        check_dsdkit(["dsdkit", "score", "a"], "x")
    with pytest.raises(AssertionError, match="has no command 'fly'"):
        check_dsdkit(["dsdkit", "world", "fly"], "x")
    with pytest.raises(AssertionError, match="names an extra"):
        check_pip(shlex.split('pip install -e ".[gpu]"'), "x")
    with pytest.raises(AssertionError, match="has no option --nope"):
        check_synopsis("dsdkit plan IMAGES CAPTIONS [--nope N]", "x")
    check_dsdkit(shlex.split("dsdkit -q world train run --threads 1"), "x")
    check_synopsis("dsdkit match IMAGES CAPTIONS [--model M] [-o out.csv|out.json]", "x")
    assert segments("dsdkit a && dsdkit b || echo $? # note") == [["dsdkit", "a"], ["dsdkit", "b"], ["echo", "$?"]]


# -- running the runnable ones ---------------------------------------------------------------------------------------

RUNNABLE_PAGES = [
    page for page in PAGES if any(b.reason is None and b.language in (*SHELL, "python") for b in read_blocks(page))
]


@pytest.fixture
def page_folder(tmp_path, monkeypatch):
    """A fresh folder with ``examples/`` linked in, as the current folder; torch's thread count and the thread
    settings a block may change are put back afterwards."""
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    from dsdkit.runtime import threads

    monkeypatch.setattr(threads, "_configured", threads._configured)
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield tmp_path
    torch = sys.modules.get("torch")
    if torch is not None and before is not None:
        torch.set_num_threads(before)


def _bash(line: str, where: str) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's dsdkit
    env["PYTHONPATH"] = ""
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (
        f"{where}: `{line}` exited {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )


def run_shell(block: Block) -> None:
    from dsdkit.cli import app
    from dsdkit.cli.app import expand_bare_compile

    runner = CliRunner()
    for line in shell_lines(block.text):
        commands = segments(line)
        plain = not re.search(r"\|\||[|;<>`$]", line.split("#")[0].replace("&&", ""))
        if plain and all(c[0] in ("dsdkit", "pip") for c in commands):
            for arguments in commands:
                if arguments[0] == "pip":
                    continue  # checked, not run: this environment is the dev install
                result = runner.invoke(app, expand_bare_compile(arguments[1:]))
                assert result.exit_code == 0, (
                    f"{block.where}: `{shlex.join(arguments)}` exited {result.exit_code}\n{result.output[-4000:]}"
                )
        elif commands and commands[0][:2] != ["pip", "install"]:
            _bash(line, block.where)


def run_python(block: Block) -> None:
    code = compile(block.text, block.where, "exec")
    exec(code, {"__name__": "__main__", "__file__": str(block.page)})  # noqa: S102 - the docs' own examples


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_runnable_blocks_run_as_written(page, page_folder):
    """Every unmarked shell and Python block of the page, in order, in one fresh folder."""
    for block in read_blocks(page):
        if block.reason is not None:
            continue
        if block.language in SHELL:
            run_shell(block)
        elif block.language == "python":
            run_python(block)
