"""Package layout and import hygiene, checked in fresh interpreters outside the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_subpackages_live_in_the_dsdkit_namespace_only(tmp_path):
    code = (
        "import importlib.util, dsdkit.train, dsdkit.export, dsdkit.runtime\n"
        "print([n for n in ('train', 'export', 'runtime') if importlib.util.find_spec(n) is not None])"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_dsdkit_and_the_runtime_do_not_import_torch(tmp_path):
    code = (
        "import sys, dsdkit, dsdkit.runtime, dsdkit.errors, dsdkit.cli\n"
        "dsdkit.__version__\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_is_fast_and_torch_free(tmp_path):
    code = (
        "import sys\n"
        "from dsdkit.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "for command in ('match', 'tiny-model'):\n"
        "    try:\n        app([command, '--help'])\n    except SystemExit as exit:\n        assert exit.code == 0\n"
        "print('LOADED', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_console_script_is_installed(tmp_path):
    executable = Path(sys.executable).parent / "dsdkit"
    assert executable.is_file(), "installing the package must create the `dsdkit` console script"
    result = subprocess.run([executable, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("dsdkit ")
