"""The CLI package (issue 28 Build item 3, issue 31 items 6-7): help panels and command order, one knob syntax for
every command, swapped arguments, the missing-folder rule for outputs, one-line parser errors, plain text off a
terminal, each notice once, and short command bodies."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dsdkit.runtime.config import Pooling, ScoringConfig, TimestepTable, resolve_scoring
from dsdkit.runtime.errors import ConfigError, OutputError
from typer.testing import CliRunner

from dsdkit.cli import app
from dsdkit.cli.app import COMMAND_ORDER, HELPERS, HELPERS_PANEL
from dsdkit.cli.options import KNOB_HELP, PANELS, build_scoring, markup_safe, prepare_output

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
CAPTIONS = DEMO / "captions.txt"
ANSI = "\x1b["


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# -- help: order, short help, panels, markup ----------------------------------------------------------------------


def test_top_level_help_lists_user_commands_first_and_cuts_nothing(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    rows = [line.split("│")[1].split()[0] for line in text.splitlines() if line.startswith("│ ") and "--" not in line]
    assert rows == [*COMMAND_ORDER, *HELPERS], rows  # every command, in this order, helpers last
    assert text.index("Commands") < text.index(HELPERS_PANEL) < text.index("tiny-model")
    # Each command's description fits its row: nothing is cut, nothing wraps onto a second line.
    assert "…" not in text
    described = [line for line in text.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()]
    assert len(described) == len(rows) + 5  # the command rows and the five global options, one line each


def test_match_help_is_grouped_into_panels_in_reading_order(runner):
    result = runner.invoke(app, ["match", "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    starts = [text.index(f"─ {panel} ─") for panel in PANELS]
    assert starts == sorted(starts), "panels out of order"

    def panel_of(flag: str) -> str:
        at = text.index(f" {flag} ")
        return max((start, panel) for start, panel in zip(starts, PANELS, strict=True) if start < at)[1]

    expected = {
        "--output": "Inputs and outputs",
        "--dry-run": "Inputs and outputs",
        "--model": "Scoring",
        "--timesteps": "Scoring",
        "--set": "Scoring",
        "--adaptive-schedule": "Adaptive and pairs",
        "--pairs": "Adaptive and pairs",
        "--ray": "Scale-out",
        "--shard": "Scale-out",
        "--batch-size": "Performance",
        "--threads": "Performance",
    }
    assert {flag: panel_of(flag) for flag in expected} == expected
    assert "…" not in text  # no option name or help word is cut at 80 columns
    # Square brackets in help are shown as written, not read as markup.
    assert "--compile [MODE]" in " ".join(text.replace("│", " ").split())


def test_markup_characters_in_help_survive_rendering():
    from rich.text import Text

    for written in ("--compile [auto|default]", "keep=8,3,1:steps=2,6,all", "a [bold]b[/bold] c", "x [y]"):
        assert Text.from_markup(markup_safe(written)).plain == written


# -- one knob syntax ----------------------------------------------------------------------------------------------


def test_every_scoring_knob_has_a_typed_option():
    fields = {name for name in ScoringConfig.__dataclass_fields__ if name != "preset"}
    assert set(KNOB_HELP) == fields


def test_set_and_the_typed_options_give_the_same_scoring():
    typed = build_scoring(
        "paper",
        num_timesteps=10,
        timesteps=TimestepTable.discffusion,
        lse_lambda=3,
        pooling=Pooling.image_lse,
        denoise_term=False,
        noise_levels="0.5",
    )
    aliased = build_scoring(
        "paper",
        ["num_timesteps=10", "timesteps=discffusion", "lse_lambda=3", "pooling=image-lse", "denoise_term=off"]
        + ["noise-levels=0.5"],
    )
    assert typed == aliased
    assert typed.knobs == {
        "num_timesteps": 10,
        "timesteps": "discffusion",
        "lse_lambda": 3.0,
        "pooling": "image-lse",
        "denoise_term": False,
        "noise_levels": (0.5,),
    }
    assert resolve_scoring(typed.preset, None, typed.knobs) == resolve_scoring(aliased.preset, None, aliased.knobs)
    assert build_scoring(None, ["num_timesteps=10"], num_timesteps=10).knobs == {"num_timesteps": 10}  # agree
    with pytest.raises(ConfigError, match="--timesteps 10 and --set num_timesteps=4 disagree"):
        build_scoring(None, ["num_timesteps=4"], num_timesteps=10)
    for bad, message in (
        ("lse_lambda", "expected knob=value"),
        ("nothing=1", "unknown knob nothing"),
        ("pooling=max", "not one of text-lse, image-lse"),
        ("num_timesteps=ten", "a whole number"),
        ("noise_levels=a,b", "comma-separated numbers"),
        ("preset=paper", "use --preset"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_scoring(None, [bad])


# What each command hands to the library, captured instead of run: (the module attribute to fake, how to read the
# knobs and preset from what it was given).
_CAPTURED = {
    "match": ("dsdkit.jobs.match.match", lambda args, kwargs: args[2]),
    "plan": ("dsdkit.jobs.shards.plan_job", lambda args, kwargs: args[4]),
    "explain": ("dsdkit.jobs.engines.open_engine", lambda args, kwargs: args[0]),
    "eval": ("dsdkit.jobs.engines.open_engine", lambda args, kwargs: args[0]),
    "train": ("dsdkit.train.train", lambda args, kwargs: args[0]),
    "export": ("dsdkit.export.export_bundle", lambda args, kwargs: kwargs),
}


def _knobs_of(given) -> tuple:
    if isinstance(given, dict):  # export_bundle's keyword arguments
        return given["preset"], given["overrides"]
    if hasattr(given, "scoring"):  # a TrainConfig
        return given.preset, given.scoring
    return given.preset, given.knobs  # an EngineSpec


@pytest.mark.parametrize("name", list(_CAPTURED))
def test_every_command_takes_the_same_knobs_both_ways(name, runner, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    target, read = _CAPTURED[name]
    module, attribute = target.rsplit(".", 1)
    seen = []

    def capture(*args, **kwargs):
        seen.append(_knobs_of(read(args, kwargs)))
        raise ConfigError("captured")

    monkeypatch.setattr(importlib.import_module(module), attribute, capture)
    monkeypatch.setattr("dsdkit.jobs.datasets.load_dataset", lambda *args, **kwargs: None)
    inputs = {
        "match": [str(DEMO), str(CAPTIONS)],
        "plan": [str(DEMO), str(CAPTIONS), "--shards", "2", "--out", "job"],
        "explain": [str(DEMO / "00-a-red-circle.png"), "a red circle"],
        "eval": ["benchmark.jsonl"],
        "train": ["fewshot.jsonl"],
        "export": ["--out", "demo.bundle"],
    }[name]
    typed = ["--preset", "paper", "--schedule", "discffusion", "--timesteps", "10", "--lambda", "3", "--no-denoise"]
    typed += ["--noise-levels", "0.5"]
    aliased = ["--preset", "paper", "--set", "timesteps=discffusion", "--set", "num_timesteps=10"]
    aliased += ["--set", "lse_lambda=3", "--set", "denoise_term=false", "--set", "noise_levels=0.5"]
    for knobs in (typed, aliased):
        result = runner.invoke(app, [name, *inputs, "--model", "demo", *knobs])
        assert result.exit_code == 2 and _one_error_line(result) == "error: captured", result.output
    expected = {"timesteps": "discffusion", "num_timesteps": 10, "lse_lambda": 3.0, "denoise_term": False}
    expected["noise_levels"] = [0.5]
    assert [(preset, {**knobs, "noise_levels": list(knobs["noise_levels"])}) for preset, knobs in seen] == [
        ("paper", expected),
        ("paper", expected),
    ]


def test_set_and_typed_options_score_the_same_on_the_demo_model(runner, tmp_path):
    documents = []
    for knobs in (["--timesteps", "1", "--lambda", "2"], ["--set", "num_timesteps=1", "--set", "lse_lambda=2"]):
        out = tmp_path / f"scores-{len(documents)}.json"
        images, captions = ROOT / "examples" / "images", ROOT / "examples" / "captions.txt"
        result = runner.invoke(app, ["match", str(images), str(captions), "--model", "demo", *knobs, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert ANSI not in result.output  # the summary table off a terminal is plain text
        documents.append(json.loads(out.read_text()))
    assert documents[0]["meta"]["scoring"] == documents[1]["meta"]["scoring"]
    assert documents[0]["meta"]["scoring"]["num_timesteps"] == 1 and documents[0]["meta"]["scoring"]["lse_lambda"] == 2
    assert documents[0]["scores"] == documents[1]["scores"]


# -- swapped arguments and the missing-folder rule ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["match", "plan"])
def test_swapped_arguments_are_named(command, runner, tmp_path):
    listed = tmp_path / "images.txt"
    listed.write_text("".join(f"{path}\n" for path in sorted(DEMO.glob("*.png"))), encoding="utf-8")
    extra = ["--shards", "2", "--out", str(tmp_path / "job")] if command == "plan" else []
    for images in (DEMO, listed):  # a folder, or an image list, given second
        result = runner.invoke(app, [command, str(CAPTIONS), str(images), "--model", "demo", *extra])
        assert result.exit_code == 2, result.output
        line = _one_error_line(result)
        assert "IMAGES and CAPTIONS look swapped" in line and f"dsdkit {command} {images} {CAPTIONS}" in line
    assert not (tmp_path / "job").exists()


def test_outputs_create_missing_folders_inside_the_current_folder_only(runner, tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    # Outside the current folder: refused in one line (exit 5) before any work, and nothing is created.
    out = elsewhere / "missing" / "out.csv"
    result = runner.invoke(app, ["match", str(DEMO), str(CAPTIONS), "--model", "demo", "-o", str(out)])
    assert result.exit_code == OutputError.exit_code, result.output
    line = _one_error_line(result)
    assert f"--output {out}: the folder {out.parent} does not exist" in line and "only inside the current" in line
    result = runner.invoke(app, ["tiny-data", str(elsewhere / "data"), "--train", "1", "--test", "1"])
    assert result.exit_code == OutputError.exit_code and "FOLDER" in _one_error_line(result)
    assert not elsewhere.exists()
    # Inside it: created.
    result = runner.invoke(app, ["tiny-data", "nested/data", "--train", "1", "--test", "1"])
    assert result.exit_code == 0, result.output
    assert (here / "nested" / "data" / "data.jsonl").is_file()


def test_the_missing_folder_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_output(None, "-o")
    prepare_output("scores.csv", "-o")
    prepare_output("a/b/scores.csv", "-o")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a folder"):
        prepare_output("file/scores.csv", "-o")
    with pytest.raises(OutputError, match="only inside the current folder"):
        prepare_output("../outside/scores.csv", "-o")
    assert not (tmp_path.parent / "outside").exists()


def test_every_option_that_writes_states_the_rule():
    import typer.main

    from dsdkit.cli.options import CREATES_FOLDERS

    def walk(group, path):
        for name in group.list_commands(None):
            command = group.get_command(None, name)
            if hasattr(command, "list_commands"):
                yield from walk(command, [*path, name])
            else:
                yield " ".join([*path, name]), command

    writers = {"--output", "--out", "OUTPUT", "FOLDER", "DESTINATION"}
    checked = []
    for name, command in walk(typer.main.get_command(app), []):
        for param in command.params:
            shown = {*param.opts, getattr(param, "metavar", None)}
            if shown & writers:
                checked.append(name)
                assert CREATES_FOLDERS in " ".join((param.help or "").split()), (name, param.name)
    assert {"match", "merge", "plan", "eval", "explain", "export", "bench", "train", "tiny-model"} <= set(checked)


# -- errors, terminal output, notices -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["match", "a", "b", "--bogus"], "No such option: --bogus"),
        (["match", "a", "b", "--batch-size", "0"], "--batch-size"),
        (["nothing"], "No such command"),
    ],
)
def test_parser_errors_are_one_line(arguments, fragment, runner):
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert fragment in line and line.endswith("--help")


def test_no_colour_codes_when_the_output_is_not_a_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "NO_COLOR")}
    env["TERM"] = "xterm-256color"  # a colour terminal type, but the streams are pipes
    executable = Path(sys.executable).parent / "dsdkit"
    for arguments in (["--help"], ["match", "--help"], ["match", str(CAPTIONS), str(DEMO)], ["exit-codes"]):
        done = subprocess.run(
            [executable, *arguments], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        assert done.stdout or done.stderr
        assert ANSI not in done.stdout and ANSI not in done.stderr, arguments


def test_each_notice_is_printed_once(capsys):
    from dsdkit.cli.app import _configure_logging

    root = logging.getLogger("dsdkit")
    before = root.handlers[:], root.level, root.propagate
    try:
        _configure_logging(verbose=0, quiet=False)
        logger = logging.getLogger("dsdkit.export.bundle")
        for _ in range(3):
            logger.warning("TensorRT engines not built: no GPU")
        logger.warning("another notice")
    finally:
        root.handlers[:], root.level, root.propagate = before[0], before[1], before[2]
    err = capsys.readouterr().err
    assert err.count("TensorRT engines not built") == 1 and err.count("another notice") == 1


def test_export_summary_does_not_repeat_the_logged_engine_notice():
    from dsdkit.cli.export import bundle_summary

    manifest = json.loads((ROOT / "tests" / "data" / "formats" / "bundle-kv-prompt.manifest.json").read_text())
    reason = manifest["engines"]["reason"]
    assert reason in bundle_summary(Path("b"), manifest, verified=False)  # inspect says why
    assert reason not in bundle_summary(Path("b"), manifest, verified=True, engines_noted=True)  # export logged it


# -- structure ----------------------------------------------------------------------------------------------------


def test_no_function_body_in_the_cli_is_over_80_lines():
    package = ROOT / "dsdkit" / "cli"
    long = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                lines = body[-1].end_lineno - body[0].lineno + 1
                if lines > 80:
                    long.append((path.name, node.name, lines))
    assert not long, long


# -- library messages name fields, the CLI says flags (issue 31 item 4) ---------------------------------------------

#: The library's layers: what a Python caller imports (the CLI package is the one place that may say flags).
LIBRARY = ("runtime", "dsdkit/jobs", "dsdkit/pytorch", "dsdkit/world", "dsdkit/serving", "train", "export")


def _raised_messages():
    """(file:line, source) of every ``SomethingError(...)`` built in the library's code."""
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Error"):
                    if node.func.id == "RequestError":  # an HTTP answer about how the server was started
                        continue
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", ast.get_source_segment(text, node) or ""


def _cli_flags() -> set[str]:
    import typer.main

    flags, pending = set(), [typer.main.get_command(app)]
    while pending:
        command = pending.pop()
        if hasattr(command, "list_commands"):
            pending.extend(command.get_command(None, name) for name in command.list_commands(None))
        for param in command.params:
            flags.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return flags


def test_library_errors_name_fields_not_flags():
    """A Python caller is told the argument or field (`device`), never a flag (--device); flags inside a quoted
    command (`dsdkit export --shortlist MODEL`) are a command to run and may stay."""
    import re

    offenders = []
    for where, source in _raised_messages():
        unquoted = re.sub(r"`[^`]*`", "", source)
        if re.search(r"(?<![\w-])--[a-z]", unquoted):
            offenders.append(where)
    assert not offenders, offenders


def test_every_field_a_library_error_names_is_a_flag_of_the_cli():
    """What as_flags makes of each `field` in a library message is an option some command has (a backticked word
    that is not a field, such as `demo`, would come out as a flag that does not exist)."""
    import re

    from dsdkit.cli.app import as_flags

    flags = _cli_flags()
    unknown = {}
    for where, source in _raised_messages():
        for name in re.findall(r"(?<!`)`([a-z_]+)`(?!`)", source):
            flag = as_flags(f"`{name}`")
            if flag not in flags:
                unknown.setdefault(flag, where)
    assert not unknown, unknown


def test_the_cli_says_flags_where_the_library_says_fields(runner):
    """The issue's case: "use --device cpu" was said to Python callers too."""
    from dsdkit.pytorch.models import load_model

    try:
        import torch
    except ImportError:
        pytest.skip("needs torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the device is not refused here")
    with pytest.raises(ConfigError) as refused:
        load_model("demo", device="cuda")
    assert "pass cpu as `device`" in str(refused.value) and "--" not in str(refused.value)
    result = runner.invoke(app, ["match", str(DEMO), str(CAPTIONS), "--model", "demo", "--device", "cuda"])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert "pass cpu as --device" in line and "`device`" not in line
