"""What a new user hits first (issue 15): the README's own flow on noise-level bundles, missing extras, option and
message fixes, Ctrl-C with saved chunks, ``-q``, the terminal summary, ``inspect`` and the README's install lines."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.config import ScoringConfig, resolve_scoring
from dsdkit.runtime.errors import ConfigError
from dsdkit.runtime.results import MatchResult
from dsdkit.runtime.timesteps import discffusion_timesteps
from typer.testing import CliRunner

from dsdkit.cli import app, expand_bare_compile, main, ui
from dsdkit.cli.app import as_flags

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE_IMAGES = ROOT / "examples" / "images"
EXAMPLE_CAPTIONS = ROOT / "examples" / "captions.txt"


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


# -- item 2: --timesteps on a noise-levels schedule ------------------------------------------------------------


def test_timesteps_on_a_noise_levels_adapter_is_refused_naming_noise_levels():
    paper = ScoringConfig.from_preset("paper")
    with pytest.raises(ConfigError) as refused:
        resolve_scoring(None, paper, {"num_timesteps": 2}, source="run/adapter.safetensors")
    message = str(refused.value)
    # The library names the fields (a Python caller has no flags); the CLI says the options (issue 31 item 4).
    assert "`num_timesteps` 2" in message and "`noise_levels`" in message and "run/adapter.safetensors" in message
    assert "--" not in message and "\n" not in message and refused.value.field == "num_timesteps"
    said = as_flags(message)
    assert "--timesteps 2" in said and "--noise-levels" in said and "num_timesteps" not in said
    # The adapter's own value, or none at all, still resolves (the full config passes through every engine).
    assert resolve_scoring(None, paper, paper.to_dict()) == paper
    with pytest.raises(ConfigError, match="the paper preset scores at the noise-levels schedule"):
        resolve_scoring("paper", None, {"num_timesteps": 10})


def test_noise_levels_bundle_refuses_timesteps_in_one_line(export_case, runner):
    from dsdkit.runtime import Matcher

    bundle, manifest = export_case("paper-lora")
    assert manifest["scoring"]["timesteps"] == "noise-levels"
    with pytest.raises(ConfigError, match="`noise_levels`"):
        Matcher.from_bundle(bundle, num_timesteps=10, verify=False)
    result = runner.invoke(
        app, ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--bundle", str(bundle), "--timesteps", "2"]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --timesteps 2") and "--noise-levels" in lines[0]
    assert "Traceback" not in result.output and "num_timesteps" not in result.output


def test_embedding_example_runs_on_a_noise_levels_bundle(export_case):
    """examples/embed_runtime.py reads the bundle's schedule and passes num_timesteps only where it applies."""
    bundle, _ = export_case("paper-lora")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed_runtime.py"), str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "best image for" in done.stdout and done.stdout.count(".png: '") == 4


def test_too_many_timesteps_for_the_noise_bank_names_the_flag_and_the_largest_s(export_case, runner):
    from dsdkit.runtime import Matcher

    bundle, manifest = export_case("discffusion")
    bank = manifest["noise"]["bank_size"]
    # The largest S whose table fits the bank, found by trying every S (the table is not S long for large S).
    largest = max(s for s in range(1, 981) if len(discffusion_timesteps(s)) <= bank)
    Matcher.from_bundle(bundle, num_timesteps=largest, verify=False).close()
    with pytest.raises(ConfigError, match=f"S can be at most {largest}"):
        Matcher.from_bundle(bundle, num_timesteps=largest + 1, verify=False)
    result = runner.invoke(
        app, ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--bundle", str(bundle), "--timesteps", "500"]
    )
    assert result.exit_code == 2, result.output
    assert "--timesteps 500" in result.output and f"--timesteps {largest} or fewer" in result.output
    assert "timesteps asked for" not in result.output and "num_timesteps" not in result.output


# -- item 3: a missing optional dependency --------------------------------------------------------------------


def _without(module: str, *arguments: str) -> subprocess.CompletedProcess:
    """Run the dsdkit command in a fresh interpreter in which ``module`` cannot be imported (as where its extra
    is not installed)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from dsdkit.cli import main\n"
        "sys.argv = ['dsdkit', *sys.argv[1:]]\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.mark.parametrize(
    "module, extra, arguments",
    [
        ("torch", "torch", ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--model", "demo"]),
        ("torch", "torch", ["tiny-model", "{tmp}/tiny"]),
        ("torch", "torch", ["explain", str(EXAMPLE_IMAGES / "red_circle.png"), "a red circle", "--model", "demo"]),
        ("onnx", "export", ["export", "--model", "{micro}", "--out", "{tmp}/bundle", "--parity-size", "1"]),
    ],
)
def test_missing_extra_is_one_line_naming_it(module, extra, arguments, tmp_path, micro_model_dir):
    arguments = [a.format(tmp=tmp_path, micro=micro_model_dir) for a in arguments]
    done = _without(module, *arguments)
    from dsdkit.runtime.errors import MissingDependencyError

    assert done.returncode == MissingDependencyError.exit_code, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith(("error", "internal error"))]
    assert len(errors) == 1 and errors[0].startswith("error: this command needs"), done.stderr
    assert f"'{extra}' extra" in errors[0] and f".[{extra}]" in errors[0]
    assert "Traceback" not in done.stderr and "dsdkit bug" not in done.stderr


def test_a_missing_module_of_dsdkit_itself_stays_a_bug():
    from dsdkit.runtime.errors import missing_dependency

    assert missing_dependency(ModuleNotFoundError("No module named 'dsdkit.nothing'", name="dsdkit.nothing")) is None
    assert missing_dependency(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None
    assert missing_dependency(ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")) is not None


# -- item 7: options and messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--batch-size", "0"],
        ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--batch-size", "-3"],
        ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--chunk-size", "0"],
        ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--top-k", "0"],
        ["eval", "data.jsonl", "--batch-size", "0"],
        ["train", "data.jsonl", "--batch-size", "0"],
        ["train", "data.jsonl", "--epochs", "0"],
        ["bench", "--images", "0"],
    ],
)
def test_counts_below_one_are_refused(runner, arguments):
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2, result.output
    option = next(a for a in arguments if a.startswith("--"))
    assert option in result.output and "Traceback" not in result.output


def test_model_pointed_at_a_bundle_suggests_bundle(export_case, runner):
    bundle, _ = export_case("discffusion")
    result = runner.invoke(app, ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--model", str(bundle)])
    assert result.exit_code == 4, result.output
    assert f"--bundle {bundle}" in result.output and "Traceback" not in result.output


def test_ctrl_c_after_saved_chunks_prints_the_resume_command(export_case, runner, tmp_path, monkeypatch):
    """Ctrl-C in the second chunk: exit 130, the first chunk is kept, and the printed command finishes the job."""
    from dsdkit.runtime.engine import Engine

    bundle, _ = export_case("discffusion")
    out = tmp_path / "scores.csv"
    arguments = ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--bundle", str(bundle), "--timesteps", "1"]
    arguments += ["--chunk-size", "1", "-o", str(out)]
    original, calls = Engine.score_encoded_matrix, []

    def interrupted_in_the_second_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "score_encoded_matrix", interrupted_in_the_second_chunk)
    monkeypatch.setattr(sys, "argv", ["dsdkit", *arguments])
    result = runner.invoke(app, arguments)
    assert result.exit_code == 130, result.output
    line = result.output.strip().splitlines()[-1]
    assert "1 of 4 image rows" in line and "continue with: " in line
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "dsdkit" and command[-1] == "--resume" and command[1:-1] == arguments
    monkeypatch.setattr(Engine, "score_encoded_matrix", original)
    resumed = runner.invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert len(out.read_text().splitlines()) == 5  # header + 4 image rows


def test_quiet_prints_only_errors(export_case, runner, tmp_path):
    bundle, _ = export_case("discffusion")
    arguments = ["match", str(EXAMPLE_IMAGES), str(EXAMPLE_CAPTIONS), "--bundle", str(bundle), "--timesteps", "1"]
    quiet = runner.invoke(app, ["-q", *arguments, "-o", str(tmp_path / "scores.json")])
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output
    assert (tmp_path / "scores.json").is_file()
    failed = runner.invoke(app, ["-q", "match", str(tmp_path / "absent"), str(EXAMPLE_CAPTIONS), "--bundle", "b"])
    assert failed.exit_code != 0 and failed.output.startswith("error: ")


def test_bare_compile_means_auto(monkeypatch):
    assert expand_bare_compile(["match", "a", "b", "--compile"]) == ["match", "a", "b", "--compile", "auto"]
    bare_then_option = ["match", "--compile", "--model", "m"]
    assert expand_bare_compile(bare_then_option) == ["match", "--compile", "auto", "--model", "m"]
    assert expand_bare_compile(["match", "--compile", "default", "a"]) == ["match", "--compile", "default", "a"]
    seen = {}
    # main() calls the app of its own module (the package's `app` attribute is the typer app, not the module).
    app_module = importlib.import_module("dsdkit.cli.app")
    monkeypatch.setattr(app_module, "app", lambda: seen.setdefault("argv", list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["dsdkit", "match", "a", "b", "--compile"])
    main()
    assert seen["argv"][-2:] == ["--compile", "auto"]


# -- item 10: the terminal summary ----------------------------------------------------------------------------


def _summary(capsys, scores, captions, images=None) -> str:
    scores = np.asarray(scores, dtype=float)
    images = images or [f"image-{i}.png" for i in range(scores.shape[0])]
    ui.State.quiet = False
    ui.print_summary(MatchResult(images=images, captions=captions, scores=scores, meta={}))
    return capsys.readouterr().out


def test_summary_explains_itself_and_has_no_nan_margin(capsys):
    one = _summary(capsys, [[3.25]], ["a red circle"])
    assert "1 image x 1 caption:" in one and "nan" not in one and "margin" not in one
    assert "higher is better" in one
    two = _summary(capsys, [[3.0, 1.0], [0.5, 2.5]], ["a red circle", "a blue square"])
    assert "2 images x 2 captions:" in two and "margin: best minus second-best score" in two
    assert "2.0000" in two  # 3.0 - 1.0 and 2.5 - 0.5


def test_a_long_caption_does_not_wrap_a_row(capsys):
    caption = " ".join(["a red circle left of a blue square"] * 12)
    name = "/".join(["a-long-folder-name"] * 6) + "/the-image.png"
    out = _summary(capsys, [[1.0, 0.0]], [caption, "x"], images=[name])
    rows = [line for line in out.splitlines() if "1.0000" in line]
    assert len(rows) == 1 and "the-image.png" in rows[0]
    assert len(out.splitlines()) <= 12


# -- item 12: inspect, install commands, quick-start outputs --------------------------------------------------


def test_inspect_lists_every_file_with_size_and_sha256(export_case, runner):
    from dsdkit.runtime.bundle import sha256_file

    bundle, manifest = export_case("discffusion")
    result = runner.invoke(app, ["inspect", str(bundle)])
    assert result.exit_code == 0, result.output
    for name, record in manifest["files"].items():
        line = next(line for line in result.output.splitlines() if line.strip().startswith(name + " "))
        assert sha256_file(bundle / name) in line and f"{record['size']:,} B" in line


def test_readme_and_examples_install_only_what_exists():
    """Every pip install in the README and the examples names extras of pyproject.toml, from a checkout (`.`) or
    a built wheel; dsdkit is not on PyPI, so a bare `dsdkit[...]` would install someone else's package or fail."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    texts = {"README.md": README}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "examples").glob("*.py")})
    installs = []
    for where, text in texts.items():
        for command in re.findall(r"pip install ([^\n`&#]+)", text):
            installs.append((where, command))
            for target in re.findall(r"""["']?([\w./*-]*)\[([\w,-]+)\]["']?""", command):
                source, named = target
                assert source in (".", "") or source.endswith(".whl"), (where, command)
                assert source != "" or '".[' in command or "'.[" in command, (where, command)
                assert set(named.split(",")) <= extras, (where, command)
            assert not re.search(r"(?<![\w.])dsdkit\[", command), (where, command)
    assert installs


def test_quick_start_outputs_are_ignored_by_git():
    """What the README's and the docs' offline commands write into a checkout is in .gitignore."""
    written = set()
    texts = [README, *(page.read_text(encoding="utf-8") for page in sorted((ROOT / "docs").glob("*.md")))]
    for line in (line for text in texts for line in re.findall(r"^dsdkit .*$", text, flags=re.M)):
        for option in ("-o", "--output", "--out"):
            written.update(re.findall(rf"(?:^|\s){option} (\S+)", line))
        written.update(re.findall(r"dsdkit (?:demo-data|tiny-data|tiny-model) (\S+)", line))
    # Names only: synopsis placeholders such as `RESULT]` or `out.csv|out.json]` are not files a command writes.
    written = {w.rstrip("]") for w in written if not w.startswith(("$", "-")) and "/" not in w.rstrip("/")}
    written = {w for w in written if re.fullmatch(r"[\w.-]+/?", w)}
    assert {"run", "demo-data", "demo.bundle"} <= written, written
    # A command may write a file or a folder (a folder pattern matches only with the trailing slash): either counts.
    candidates = sorted(written | {w.rstrip("/") + "/" for w in written})
    checked = subprocess.run(
        ["git", "check-ignore", "--no-index", *candidates], cwd=ROOT, capture_output=True, text=True
    )
    ignored = {path.rstrip("/") for path in checked.stdout.split()}
    assert ignored >= {w.rstrip("/") for w in written}, f"not in .gitignore: {sorted(written - ignored)}"


def test_readme_states_the_suite_time_on_a_quiet_machine():
    paragraph = README[README.index("## Run the tests") :].split("## ", 2)[1]
    stated = re.search(r"The whole suite takes (\d+) minutes on a quiet 2-core machine \(nothing else", paragraph)
    assert stated, paragraph
    assert "not on a quiet machine" not in paragraph and "beside other work" not in paragraph


def test_an_image_list_whose_paths_resolve_nowhere_says_they_are_relative_to_the_list(tmp_path, monkeypatch):
    from dsdkit.runtime.errors import InputError
    from dsdkit.runtime.inputs import list_images

    images = tmp_path / "photos"
    images.mkdir()
    (images / "a.png").write_bytes((EXAMPLE_IMAGES / "red_circle.png").read_bytes())
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = lists / "images.txt"
    listed.write_text("photos/a.png\n", encoding="utf-8")  # relative to the current folder, not to the list's
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as refused:
        list_images(listed)
    message = str(refused.value)
    assert "relative paths are taken from the list file's folder" in message and str(lists) in message
    assert "1 of them exist relative to the current folder" in message
    listed.write_text("../photos/a.png\n", encoding="utf-8")  # relative to the list: found
    assert list_images(listed) == [lists / "../photos/a.png"]
