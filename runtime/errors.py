"""The one exception family of dsdkit.

Every error a user can cause (a bad file, a missing model, an impossible option combination) is a
:class:`DsdkitError` whose message is one line: what went wrong, where, and what to do about it. The CLI prints
that line and exits with the class's ``exit_code``; ``--debug`` shows the traceback. Anything else that escapes
is a bug in dsdkit.

The family lives in the runtime package because the runtime is the bottom of the dependency chain
(train -> core -> runtime) and must stay importable without torch; ``dsdkit.runtime.errors`` re-exports it.
"""

from __future__ import annotations

__all__ = [
    "one_line",
    "DsdkitError",
    "ConfigError",
    "InputError",
    "ModelError",
    "OutputError",
    "TrainingError",
    "BundleError",
    "ParityError",
    "CompileError",
    "MissingDependencyError",
    "JobError",
    "Interrupted",
    "EXTRA_OF_MODULE",
    "missing_dependency",
    "install_hint",
    "EXIT_CODES",
]


def one_line(value: object, limit: int = 300) -> str:
    """A message on one line, at most ``limit`` characters: an exception's first line (its type name when it has no
    message: tracebacks that other libraries fold into their messages stay out), or a text with its whitespace
    collapsed (a decoder's multi-line warning)."""
    if isinstance(value, BaseException):
        lines = str(value).strip().splitlines()
        text = lines[0] if lines else type(value).__name__
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DsdkitError(Exception):
    """Base class of every user-facing dsdkit error."""

    exit_code = 1


class ConfigError(DsdkitError):
    """An option or option combination that cannot work (checked before any heavy work starts).

    ``field`` names the library's config field the message is about (``batch_size``, ``top_k``): library messages
    speak of fields, and the CLI rewrites the field's name into the flag a user typed (``--batch-size``).
    """

    exit_code = 2

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class InputError(DsdkitError):
    """A bad input file: an unreadable image, an empty or undecodable caption, a missing folder."""

    exit_code = 3


class ModelError(DsdkitError):
    """Model weights that cannot be found or loaded, or a folder that is not an SD2-architecture model."""

    exit_code = 4


class OutputError(DsdkitError):
    """A result that cannot be written (unknown format, unwritable folder, full disk)."""

    exit_code = 5


class TrainingError(DsdkitError):
    """Training cannot go on (a NaN/inf loss, an unusable dataset split); the last good checkpoint is kept."""

    exit_code = 6


class BundleError(DsdkitError):
    """A bundle (or an engine in it) that cannot be used: damaged, incomplete, another format, another GPU."""

    exit_code = 7


class ParityError(DsdkitError):
    """Two computations that must agree do not: an exported graph vs PyTorch (the bundle is not written), or, in
    ``dsdkit bench``, the reference vs the scorer or compiled vs eager (no ratios are reported)."""

    exit_code = 8


class CompileError(DsdkitError):
    """``torch.compile`` could not compile the scoring forward; the eager path (no ``--compile``) still works.

    Its own class so that a compiler failure is not reported as :class:`ModelError`, whose message points at the
    model weights, which are fine in this case.
    """

    exit_code = 9


class MissingDependencyError(DsdkitError):
    """An optional dependency that this command needs is not installed; the message names the extra to install."""

    exit_code = 10


class JobError(DsdkitError):
    """A sharded job (``dsdkit plan``) that cannot go on as asked: its inputs, model or scoring changed since it was
    planned, a shard is being scored by another live worker, a job folder holds another job, or ``merge`` found
    shards that are not done. Its own class (and exit code) so that a scheduler can tell "not now" and "plan again"
    from a bad option."""

    exit_code = 11


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job that saves its results as it goes: a ``KeyboardInterrupt`` (so it stops everything as
    one does) that says what was kept; ``resumable`` is true when ``--resume`` can continue from it."""

    exit_code = 130

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


#: The extra of ``pyproject.toml`` that installs each optional top-level module (``pip install -e ".[EXTRA]"``).
EXTRA_OF_MODULE = {
    "torch": "torch",
    "diffusers": "torch",
    "transformers": "torch",
    "safetensors": "torch",
    "huggingface_hub": "torch",
    "accelerate": "torch",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "ort",
    "tensorrt": "trt",
    "polygraphy": "trt",
    "pyarrow": "parquet",
    "ray": "ray",
}


def install_hint(extra: str) -> str:
    """How to install one of ``pyproject.toml``'s extras (dsdkit is installed from a checkout or a built wheel, not
    from a package index), for every message that names one."""
    return f'pip install -e ".[{extra}]" in a checkout, or the wheel with [{extra}]'


def missing_dependency(exc: BaseException) -> MissingDependencyError | None:
    """The one-line error for an ``import`` of an optional dependency that failed, or ``None`` when ``exc`` is not
    one (a missing module of dsdkit itself, or of a required dependency, stays a bug)."""
    import importlib.util

    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.partition(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    install = install_hint(extra)
    try:
        present = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules (None) has no spec to find
        present = False
    if present and top != exc.name:
        return MissingDependencyError(
            f"{top} is installed but its module {exc.name} is missing (a broken install); reinstall it: {install}"
        )
    return MissingDependencyError(
        f"this command needs {top}, which is not installed: it comes with the '{extra}' extra ({install})"
    )


#: Documented process exit codes of the ``dsdkit`` command.
EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (a bug: rerun with --debug and report the traceback)",
    ConfigError.exit_code: "invalid options or option combination",
    InputError.exit_code: "bad input data (images, captions, dataset files)",
    ModelError.exit_code: "model weights missing, unreadable or of the wrong architecture",
    OutputError.exit_code: "results could not be written",
    TrainingError.exit_code: "training stopped (diverged or no usable examples); the last good checkpoint is kept",
    BundleError.exit_code: "bundle or engine unusable (modified, missing, other format, other TensorRT or GPU)",
    ParityError.exit_code: "two computations that must agree do not (an exported graph vs PyTorch: nothing was "
    "written; bench: reference or compiled vs eager scores)",
    CompileError.exit_code: "torch.compile failed; run without --compile",
    MissingDependencyError.exit_code: "an optional dependency is not installed (the message names the extra)",
    JobError.exit_code: "a sharded job cannot go on as asked (inputs or scoring changed since it was planned, a shard "
    "is being scored by another worker, shards not done at merge); nothing was written",
    130: "interrupted (Ctrl-C)",
}
