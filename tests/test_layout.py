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
        "import sys, dsdkit, dsdkit.runtime, dsdkit.runtime.errors, dsdkit.cli\n"
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
        "for command in ('match', 'tiny-model', 'serve', 'export'):\n"
        "    try:\n        app([command, '--help'])\n    except SystemExit as exit:\n        assert exit.code == 0\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'ray', 'onnxruntime', 'pyarrow')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_console_script_is_installed(tmp_path):
    executable = Path(sys.executable).parent / "dsdkit"
    assert executable.is_file(), "installing the package must create the `dsdkit` console script"
    result = subprocess.run([executable, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("dsdkit ")


# -- layers -------------------------------------------------------------------------------------------------------

#: The layers of docs/architecture.md, lowest first; a module may import its own layer and those below it.
#: ``train`` and ``serving`` share a rank: neither imports the other.
LAYER_RANK = {"runtime": 0, "world": 1, "pytorch": 2, "export": 3, "jobs": 4, "train": 5, "serving": 5, "cli": 6}
#: Source folder -> installed package (pyproject's package-dir).
SOURCES = {"dsdkit": "dsdkit", "train": "dsdkit.train", "export": "dsdkit.export", "runtime": "dsdkit.runtime"}
#: Leaves every layer may use: the deprecation machinery and the packaged data files.
SHARED = {"dsdkit._moved", "dsdkit.assets"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_RANK else None


def _imports(repo: Path):
    """Every (importing module, imported dsdkit module, line) of the source tree, lazy imports inside functions
    included, resolved the way Python resolves relative imports."""
    import ast

    for folder, package in SOURCES.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = path.relative_to(repo / folder).with_suffix("").parts
            module = ".".join([package, *parts]).removesuffix(".__init__")
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom):
                    prefix = base[: len(base) - node.level + 1] if node.level else []
                    target = ".".join(prefix + ([node.module] if node.module else []))
                    names = [a.name for a in node.names]
                    yield module, target, names, node.lineno
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        yield module, alias.name, [], node.lineno


def test_no_module_imports_a_layer_above_its_own():
    repo = Path(__file__).resolve().parents[1]
    upward = []
    for module, target, names, line in _imports(repo):
        if not target.startswith("dsdkit"):
            continue
        for imported in [target] + [f"{target}.{n}" for n in names]:
            if any(imported == s or imported.startswith(s + ".") for s in SHARED):
                break
        else:
            here, there = _layer(module), _layer(target)
            if here is None or there is None or here == there:
                continue  # dsdkit/__init__ re-exports lazily from every layer; that is its job
            if LAYER_RANK[there] >= LAYER_RANK[here]:
                upward.append(f"{module}:{line} imports {target}")
    assert not upward, "imports against the layering of docs/architecture.md:\n" + "\n".join(upward)
    # The check itself sees imports: the CLI (the top layer) is found importing the jobs layer.
    assert any(_layer(m) == "cli" and _layer(t) == "jobs" for m, t, _, _ in _imports(repo))


def test_no_private_name_is_imported_across_modules():
    repo = Path(__file__).resolve().parents[1]
    private = [
        f"{module}:{line} imports {target}.{name}"
        for module, target, names, line in _imports(repo)
        if target.startswith("dsdkit")
        for name in names
        if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in SHARED
    ]
    assert not private, "private names used outside their module:\n" + "\n".join(private)
