"""The ``dsdkit`` typer app: its global options, command order, and error handling.

Commands live in one module per group (``match.py``, ``train.py``, ...) and register on :data:`app` through
:func:`command`, which gives each one-line errors: a :class:`~dsdkit.runtime.errors.DsdkitError` prints
``error: <message>`` with the library's config field names (`top_k`) said as the flags a user types (``--top-k``,
:func:`as_flags`) and exits with its class's code (:data:`~dsdkit.runtime.errors.EXIT_CODES`); ``--debug`` shows the
traceback instead. Usage errors that the option parser finds (an unknown option, a count below 1) are one line too.
Heavy imports (torch, diffusers, ray) happen inside the commands, so ``dsdkit --help`` is instant.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
import typer.core

from ..jobs.specs import COMPILE_MODES
from ..runtime.config import KNOB_OPTIONS
from ..runtime.errors import DsdkitError, Interrupted, missing_dependency, one_line
from ..runtime.threads import use_passive_waiting
from ..runtime.version import __version__
from .options import in_panel_order, markup_safe
from .ui import State

__all__ = ["app", "main", "command", "cli_errors", "as_flags", "FIELD_FLAGS", "expand_bare_compile"]

logger = logging.getLogger("dsdkit")

#: `dsdkit --help` lists the user's commands by workflow, then the helpers for tests and docs in a panel of their own.
COMMAND_ORDER = (
    "match",
    "plan",
    "merge",
    "serve",
    "explain",
    "train",
    "eval",
    "adapters",
    "export",
    "inspect",
    "build-engines",
    "bench",
    "demo-data",
    "world",
)
HELPERS = ("tiny-model", "tiny-data", "exit-codes")
HELPERS_PANEL = "Helpers for tests and scripts"

# The exception classes of the click that typer runs on (newer typer versions bring their own copy of click).
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class DsdkitGroup(typer.core.TyperGroup):
    """The top-level command group: commands in :data:`COMMAND_ORDER`, and parser errors in one line."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate((*COMMAND_ORDER, *HELPERS))}
        ahead = len(COMMAND_ORDER)  # a command not in the list goes after the known ones, before the helpers
        return sorted(names, key=lambda name: rank.get(name, ahead))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `dsdkit` alone: the help, as the parser printed it
                if exc.format_message().strip():
                    exc.show()
                sys.exit(exc.exit_code)
            context = getattr(exc, "ctx", None)
            hint = f"; see {context.command_path} --help" if context is not None else ""
            typer.echo(f"error: {one_line(exc.format_message()).rstrip('.')}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="dsdkit",
    cls=DsdkitGroup,
    help="Discriminative Stable Diffusion image-text matching: score, train, export, run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


class _EachOnce(logging.Filter):
    """Passes each message once per run: a notice that several layers (or every chunk) repeat is noise."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        key = (record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = (
        logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    handler = logging.StreamHandler(sys.stderr)  # plain text: no colour codes, whatever the stream is
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_EachOnce())
    root = logging.getLogger("dsdkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Upstream libraries are noisy at INFO (loading bars, hints); show their warnings only when asked for detail.
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose > 1 else logging.ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsdkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    State.debug = debug
    State.quiet = quiet
    _configure_logging(verbose, quiet)
    # Before any command imports torch: libgomp reads its wait policy once, when it loads (runtime/threads.py).
    use_passive_waiting()


#: Library messages name config fields in backticks (`top_k`); the CLI says the flag a user types instead. A field
#: not listed is ``--field-name``; the scoring knobs whose option has another name come from the library's table.
FIELD_FLAGS = {
    "knobs": "--set",
    "per": "--adaptive-per",
    "fmt": "--format",  # load_dataset(path, fmt=...)
    "address": "--ray",  # RayOptions.address, serve_ray(address=...)
    "per_subset": "--items",  # write_demo_data(folder, per_subset=...)
    **KNOB_OPTIONS,
}


def as_flags(message: str) -> str:
    """A library message with its `field` names as the CLI's flags (``--field-name`` for a field not listed)."""
    return re.sub(r"`([a-z_]+)`", lambda m: FIELD_FLAGS.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)


def _resume_command() -> str:
    """The command line that continues this interrupted run: the same arguments with ``--resume``."""
    import shlex

    arguments = sys.argv[1:]
    return shlex.join(["dsdkit", *arguments, *([] if "--resume" in arguments else ["--resume"])])


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def cli_errors(command: Callable) -> Callable:
    """Turn dsdkit errors into one line on stderr and the documented exit code (``--debug``: the traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except DsdkitError as exc:
            if State.debug:
                raise
            raise _fail(f"error: {as_flags(str(exc))}", exc.exit_code) from None
        except KeyboardInterrupt as exc:
            if State.debug:
                raise
            if isinstance(exc, Interrupted):  # a job that kept its finished chunks says how to continue
                raise _fail(f"{exc}; continue with: {_resume_command()}" if exc.resumable else str(exc), 130) from None
            raise _fail("interrupted", 130) from None
        except Exception as exc:  # noqa: BLE001 - anything else is our bug; say so in one line
            if State.debug:
                raise
            missing = missing_dependency(exc)
            if missing is not None:  # an extra the user did not install is not our bug
                raise _fail(f"error: {missing}", missing.exit_code) from None
            raise _fail(
                f"internal error: {type(exc).__name__}: {exc} (a dsdkit bug: rerun with --debug and report the "
                "traceback)",
                1,
            ) from None

    return wrapper


def _paragraphs(text: str) -> str:
    """A docstring's paragraphs, each on one line: help reflows them to the terminal's width."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


def command(parent: typer.Typer, name: str, short_help: str, *, panel: str | None = None) -> Callable:
    """Register a function as command ``name`` of ``parent``: its docstring is the help, ``short_help`` its line in
    the parent's command list (short enough not to be cut), errors one line (:func:`cli_errors`)."""

    def register(function: Callable) -> Callable:
        wrapped = in_panel_order(cli_errors(function))
        parent.command(
            name,
            help=markup_safe(_paragraphs(inspect.getdoc(function) or "")),
            short_help=markup_safe(short_help),
            rich_help_panel=panel,
        )(wrapped)
        return wrapped

    return register


def expand_bare_compile(arguments: list[str]) -> list[str]:
    """``--compile`` given without a mode means ``--compile auto``: the mode is filled in when the next argument is
    not one (typer options cannot have an optional value)."""
    expanded = []
    for index, argument in enumerate(arguments):
        expanded.append(argument)
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if argument == "--compile" and following not in COMPILE_MODES:
            expanded.append("auto")
    return expanded


def main() -> None:
    """Console-script entry point."""
    sys.argv[1:] = expand_bare_compile(sys.argv[1:])
    use_passive_waiting()  # first of all (the callback does it again for programs that embed `app`)
    app()
