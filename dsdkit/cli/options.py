"""The options that several commands share, each declared once, and the groups that hand a command one built object.

Typer reads a command's options from its signature. :func:`option_group` puts a group of declared options into a
command's ``__signature__`` in place of one parameter, and calls the command with that parameter built from their
values: ``engine: EngineSpec`` (:func:`engine_options`), ``scoring: Scoring`` (:func:`scoring_options`),
``options: MatchOptions`` (:func:`match_options`). So ``match``, ``plan``, ``explain``, ``train``, ``eval``,
``export``, ``bench`` and ``serve`` take the same flags with the same help, and a command body does not repeat them.

Scoring knobs have one syntax: a typed option per knob (``--timesteps 10``, ``--lambda 3``, ``--no-denoise``),
derived from :class:`~dsdkit.runtime.config.ScoringConfig`'s fields, with ``--set knob=value`` as an alias for any
knob by its config name (``--set num_timesteps=10``); both are parsed here, once, into the same values.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from ..jobs.specs import BACKENDS, COMPILE_MODES, DTYPES, EngineSpec, MatchOptions, ShortlistSpec
from ..runtime.config import PRESETS, ScoringConfig, knob_option
from ..runtime.errors import ConfigError, OutputError
from ..runtime.files import output_error
from ..runtime.threads import configure_threads

__all__ = [
    "IO_PANEL",
    "SCORING_PANEL",
    "ADAPTIVE_PANEL",
    "SCALE_PANEL",
    "PERFORMANCE_PANEL",
    "PANELS",
    "in_panel_order",
    "CREATES_FOLDERS",
    "markup_safe",
    "option",
    "argument",
    "Declared",
    "option_group",
    "Scoring",
    "KNOB_HELP",
    "parse_noise_levels",
    "parse_set",
    "build_scoring",
    "scoring_options",
    "engine_options",
    "match_options",
    "prepare_output",
    "plain",
    "PresetName",
    "DtypeName",
    "CompileMode",
    "ThreadsOption",
]

# The help panels of `dsdkit COMMAND --help`, in the order a user reads them.
IO_PANEL = "Inputs and outputs"
SCORING_PANEL = "Scoring"
ADAPTIVE_PANEL = "Adaptive and pairs"
SCALE_PANEL = "Scale-out"
PERFORMANCE_PANEL = "Performance"
PANELS = (IO_PANEL, SCORING_PANEL, ADAPTIVE_PANEL, SCALE_PANEL, PERFORMANCE_PANEL)

#: Said in the help of every option that names a file or folder to write (the rule: :func:`prepare_output`).
CREATES_FOLDERS = "A missing parent folder is created inside the current folder only."


def markup_safe(text: str | None) -> str | None:
    """Help text as typed: rich help reads ``[...]`` as markup and would drop ``[auto|default]``, so brackets are
    escaped (only when typer renders with rich, or the backslashes would show)."""
    if text is None or not typer.core.HAS_RICH:
        return text
    from rich.markup import escape

    return escape(text)


def option(
    *declarations: str, help: str, panel: str | None = None, choices: type[Enum] | None = None, **settings: Any
) -> Any:
    """A ``typer.Option`` whose help renders as written, in help panel ``panel``.

    Short metavars keep the help's columns readable in 80 columns: an option of ``choices`` names them in its help and
    shows ``NAME``, a bounded count shows ``N`` and its range."""
    if choices is not None:
        help = f"{help} One of: {', '.join(member.value for member in choices)}."
        settings.setdefault("metavar", "NAME")
    if "min" in settings or "max" in settings:
        settings.setdefault("metavar", "N")  # typer adds the range: "N [x>=1]"
    if any("/" in declaration for declaration in declarations):
        settings.setdefault("show_default", False)  # an on/off pair's help says when it is on by default
    return typer.Option(*declarations, help=markup_safe(help), rich_help_panel=panel, **settings)


def argument(metavar: str, *, help: str, **settings: Any) -> Any:
    """A ``typer.Argument`` shown as ``metavar`` (errors name it so too) whose help renders as written."""
    return typer.Argument(metavar=metavar, help=markup_safe(help), **settings)


def plain(value: Any) -> Any:
    """An option's value without its enum (``Pooling.text_lse`` -> ``"text-lse"``)."""
    return value.value if isinstance(value, Enum) else value


def _choices(name: str, values: typing.Iterable[str]) -> type[Enum]:
    """A str enum whose values are the library's choices (typer shows and checks them)."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


PresetName = _choices("PresetName", PRESETS)
DtypeName = _choices("DtypeName", DTYPES)
CompileMode = _choices("CompileMode", COMPILE_MODES)
BackendName = _choices("BackendName", BACKENDS)
Per = _choices("Per", ("image", "caption"))


# -- option groups ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """One option as a command parameter: ``Annotated[type, typer.Option(...)]`` and its default."""

    annotation: Any
    default: Any = None


def option_group(target: str, declared: dict[str, Declared], build: Callable[..., Any]) -> Callable:
    """A decorator that replaces the command's parameter ``target`` by the ``declared`` options (in its signature,
    which typer reads) and calls the command with ``target=build(**their values)``.

    ``build`` runs inside the command's error handling, so a bad value is a one-line error like any other.
    """

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        names = list(signature.parameters)
        if target not in names:
            raise TypeError(f"{command.__name__} has no parameter {target!r} for its option group")
        clash = set(declared) & set(names)
        if clash:
            raise TypeError(f"{command.__name__}: option group parameters {sorted(clash)} already exist")
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=item.annotation)
            for name, item in declared.items()
        ]
        # Typer calls a command with keyword arguments only, so every parameter may be keyword-only, which lets a
        # group with defaults sit before a plain argument.
        kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
        index = names.index(target)
        parameters = kept[:index] + added + kept[index + 1 :]

        @functools.wraps(command)
        def with_group(**values: Any) -> Any:
            given = {name: values.pop(name) for name in declared}
            return command(**values, **{target: build(**given)})

        with_group.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        with_group.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_group

    return decorate


def _panel(parameter: inspect.Parameter) -> str | None:
    for metadata in typing.get_args(parameter.annotation)[1:]:
        panel = getattr(metadata, "rich_help_panel", None)
        if panel is not None:
            return panel
    return None


def in_panel_order(command: Callable) -> Callable:
    """Order a command's parameters by help panel (:data:`PANELS`; arguments and options without a panel first, each
    panel's options in their own order): typer shows the panels in the order of their first option."""
    signature = inspect.signature(command, eval_str=True)
    rank = {panel: i for i, panel in enumerate(PANELS)}
    parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
    parameters.sort(key=lambda p: rank.get(_panel(p), -1))
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return command


def _select(declared: dict[str, Declared], only, exclude, defaults) -> dict[str, Declared]:
    """The options ``only`` (default: all) less ``exclude``, with ``defaults`` replacing theirs."""
    names = [name for name in (declared if only is None else only) if name not in exclude]
    unknown = set(names) - set(declared) or set(defaults or {}) - set(names)
    if unknown:
        raise TypeError(f"not options of this group: {sorted(unknown)}")
    return {
        name: dataclasses.replace(declared[name], default=(defaults or {}).get(name, declared[name].default))
        for name in names
    }


# -- scoring knobs ------------------------------------------------------------------------------------------------

#: The help of each scoring knob's typed option, in help order: every field of ScoringConfig but ``preset`` (a test
#: keeps the two in step). The option's name is :func:`~dsdkit.runtime.config.knob_option`'s, its type the field's.
KNOB_HELP = {
    "num_timesteps": "S: timesteps of the discffusion table (the presets': 30; a bundle: the S it was exported with).",
    "pooling": "How attention scores are pooled (overrides the preset's).",
    "lse_lambda": "LogSumExp temperature λ.",
    "tokens": "Which text positions are pooled.",
    "layers": "Which cross-attention layers are scored.",
    "heads": "Head weighting.",
    "timesteps": "Timestep schedule.",
    "noise_levels": "Comma-separated noise levels for --schedule noise-levels, e.g. 0.2,0.4.",
    "denoise_term": "Add the denoising term (discffusion default: on).",
    "attention_term": "Count the attention term (off: the denoising term alone, Diffusion Classifier's score).",
    "uncond_in_attention": "Mix empty-caption rows into the attention (the authors' B3).",
    "normalize": "uncond: subtract the empty caption's score (for ranking images).",
    "resize": "How images are fitted to the model's size.",
    "resolution": "Image size fed to the VAE; default: the model's.",
    "noise_seed": "Seed of the fixed noise bank.",
}

_KNOB_TYPES = typing.get_type_hints(ScoringConfig)


def _knob_type(name: str) -> Any:
    """A knob field's type without ``| None``."""
    kind = _KNOB_TYPES[name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _knob_option(name: str) -> Declared:
    """The typed option of knob ``name``: an enum's choices, a number, a switch, or the noise levels.

    A switch that a preset turns on is ``--knob/--no-knob``; one that every preset leaves off is ``--knob`` alone
    (``--set knob=false`` still says off): a ``--no-`` form that only repeats the default would widen every row of the
    help's table."""
    flag, kind, extra = knob_option(name), _knob_type(name), {}
    if name == "noise_levels":
        kind = str  # parsed by parse_noise_levels, like --set noise_levels=...
    elif kind is bool and any(getattr(preset, name) for preset in PRESETS.values()):
        flag = f"{flag}/--no-{flag[2:]}"
    elif isinstance(kind, type) and issubclass(kind, Enum):
        extra["choices"] = kind
    return Declared(Annotated[kind | None, option(flag, help=KNOB_HELP[name], panel=SCORING_PANEL, **extra)])


_SCORING: dict[str, Declared] = {
    "preset": Declared(
        Annotated[
            PresetName | None,
            option(
                "--preset",
                help="Scoring preset. Default: the adapter's, else discffusion.",
                panel=SCORING_PANEL,
                choices=PresetName,
            ),
        ]
    ),
    **{name: _knob_option(name) for name in KNOB_HELP},
    "set_knobs": Declared(
        Annotated[
            list[str] | None,
            option(
                "--set",
                metavar="KNOB=VALUE",
                help="Any scoring knob by its config name (repeatable), the same as its option: --set lse_lambda=3 "
                "is --lambda 3, --set num_timesteps=10 is --timesteps 10.",
                panel=SCORING_PANEL,
            ),
        ]
    ),
}


@dataclass(frozen=True)
class Scoring:
    """The scoring a command was asked for: an explicit preset (or ``None``) and the knobs given explicitly
    (ScoringConfig field -> plain value); the library applies them over an adapter's header over the preset."""

    preset: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)


def parse_noise_levels(text: str, given: str) -> tuple[float, ...]:
    """``"0.2,0.4"`` -> ``(0.2, 0.4)``; ``given`` says what the user typed, for the message."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{given}: expected comma-separated numbers like 0.2,0.4") from None


_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _parse_knob(name: str, raw: str) -> Any:
    """A ``--set`` value as the knob's type (the type its typed option has)."""
    given, kind = f"--set {name}={raw}", _knob_type(name)
    if name == "noise_levels":
        return parse_noise_levels(raw, given)
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(raw).value
        except ValueError:
            raise ConfigError(f"{given}: not one of {', '.join(m.value for m in kind)}") from None
    if kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{given}: expected true or false")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{given}: expected {'a whole number' if kind is int else 'a number'}") from None


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set knob=value`` items as knob values, each parsed as its knob's typed option would be."""
    knobs = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--set {item!r}: expected knob=value, e.g. --set lse_lambda=3")
        if name == "preset":
            raise ConfigError(f"--set {item}: the preset is not a knob; use --preset")
        if name not in KNOB_HELP:
            raise ConfigError(f"--set {item}: unknown knob {name}; the knobs are {', '.join(KNOB_HELP)}")
        knobs[name] = _parse_knob(name, raw.strip())
    return knobs


def _shown(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def build_scoring(preset: Any = None, set_knobs: list[str] | None = None, **typed: Any) -> Scoring:
    """The scoring of the typed knob options and ``--set`` together; a knob given both ways must agree."""
    knobs = {}
    for name, value in typed.items():
        if value is None:
            continue
        knobs[name] = (
            parse_noise_levels(value, f"--noise-levels {value!r}") if name == "noise_levels" else plain(value)
        )
    for name, value in parse_set(set_knobs).items():
        if name in knobs and knobs[name] != value:
            raise ConfigError(
                f"{knob_option(name)} {_shown(knobs[name])} and --set {name}={_shown(value)} disagree; "
                "give the knob once"
            )
        knobs[name] = value
    return Scoring(preset=plain(preset), knobs=knobs)


def scoring_options(*, only=None, exclude=(), defaults: dict[str, Any] | None = None) -> Callable:
    """Give the command ``scoring: Scoring`` from the preset, the typed knob options and ``--set`` (or the ones in
    ``only``, less ``exclude``; ``defaults`` overrides a default, e.g. bench's S = 10)."""
    return option_group("scoring", _select(_SCORING, only, exclude, defaults), build_scoring)


# -- the engine ---------------------------------------------------------------------------------------------------

ThreadsOption = Annotated[
    int | None,
    option(
        "--threads",
        help="CPU threads for torch and ONNX Runtime (default: OMP_NUM_THREADS, else the CPUs this process may "
        "use: its affinity and cgroup quota). Lower it when other work shares the CPUs.",
        panel=PERFORMANCE_PANEL,
    ),
]

_ENGINE: dict[str, Declared] = {
    "model": Declared(
        Annotated[
            str | None,
            option(
                "--model",
                help="Diffusers SD2 folder, hub id, or demo (the shipped demo model). Default: SD2-1-base from the "
                "Hugging Face hub.",
                panel=SCORING_PANEL,
            ),
        ]
    ),
    "bundle": Declared(
        Annotated[
            Path | None,
            option(
                "--bundle",
                help="Score with an exported bundle (torch-free runtime) instead of --model.",
                panel=SCORING_PANEL,
            ),
        ]
    ),
    "adapters": Declared(
        Annotated[
            Path | None,
            option("--adapters", help="Adapter file from dsdkit train (default: zero-shot).", panel=SCORING_PANEL),
        ]
    ),
    "device": Declared(
        Annotated[
            str, option("--device", help="auto (CUDA if there is one), cpu, cuda or cuda:N.", panel=PERFORMANCE_PANEL)
        ],
        "auto",
    ),
    "dtype": Declared(
        Annotated[
            DtypeName,
            option(
                "--dtype",
                help="UNet precision; scores are pooled in fp32.",
                panel=PERFORMANCE_PANEL,
                choices=DtypeName,
            ),
        ],
        DtypeName.fp32,
    ),
    "compile": Declared(
        Annotated[
            CompileMode | None,
            option(
                "--compile",
                help="PyTorch scorer: torch.compile the scoring UNet (--compile [MODE]; alone: auto, CUDA graphs on "
                "a GPU) with channels-last weights; the first batch compiles (minutes).",
                panel=PERFORMANCE_PANEL,
                choices=CompileMode,
                metavar="MODE",
            ),
        ]
    ),
    "backend": Declared(
        Annotated[
            BackendName, option("--backend", help="A bundle's runner.", panel=PERFORMANCE_PANEL, choices=BackendName)
        ],
        BackendName.auto,
    ),
    "threads": Declared(ThreadsOption),
    "batch_size": Declared(
        Annotated[
            int,
            option(
                "--batch-size", min=1, help="UNet batch size (scores do not depend on it).", panel=PERFORMANCE_PANEL
            ),
        ],
        8,
    ),
    "chunk_size": Declared(
        Annotated[
            int,
            option(
                "--chunk-size",
                min=1,
                help="Images per chunk (memory stays flat; the unit of --resume and of shards).",
                panel=PERFORMANCE_PANEL,
            ),
        ],
        64,
    ),
}


def engine_options(*, only=None, defaults: dict[str, Any] | None = None, scoring: dict[str, Any] | None = None):
    """Give the command ``engine: EngineSpec`` from the engine options (or those in ``only``) and the scoring
    options (:func:`scoring_options`' arguments in ``scoring``), validated by the spec on construction."""
    engine = _select(_ENGINE, only, (), defaults)
    knobs = _select(_SCORING, **{"only": None, "exclude": (), "defaults": None, **(scoring or {})})

    def build(**values: Any) -> EngineSpec:
        if "threads" in values:  # first: before anything imports torch, and a bad count is the first error
            configure_threads(values["threads"])
        chosen = build_scoring(**{name: values.pop(name) for name in knobs})
        return EngineSpec(**{k: plain(v) for k, v in values.items()}, preset=chosen.preset, knobs=chosen.knobs)

    return option_group("engine", {**engine, **knobs}, build)


# -- what a match job computes and writes -------------------------------------------------------------------------

_MATCH: dict[str, Declared] = {
    "output": Declared(
        Annotated[
            Path | None,
            option(
                "--output",
                "-o",
                help="Result file: .csv (matrix), .json or .jsonl (matrix + top-k), .parquet (a row per pair). "
                + CREATES_FOLDERS,
                panel=IO_PANEL,
            ),
        ]
    ),
    "top_k": Declared(
        Annotated[
            int,
            option(
                "--top-k",
                min=1,
                help="Best captions per image / images per caption in JSON outputs; with --adaptive, kept exact.",
                panel=IO_PANEL,
            ),
        ],
        5,
    ),
    "per_layer": Declared(
        Annotated[
            bool,
            option(
                "--per-layer", help="Also write each scored layer's attention term (JSON outputs).", panel=IO_PANEL
            ),
        ],
        False,
    ),
    "resume": Declared(
        Annotated[
            bool, option("--resume", help="Continue an interrupted run from <output>.partial/.", panel=IO_PANEL)
        ],
        False,
    ),
    "strict": Declared(
        Annotated[
            bool,
            option(
                "--strict",
                help="Fail on the first unusable image or blank caption line instead of skipping it.",
                panel=IO_PANEL,
            ),
        ],
        False,
    ),
    "adaptive": Declared(
        Annotated[
            bool,
            option(
                "--adaptive",
                help="Rank by successive elimination: the --top-k best get exact scores for a fraction of the "
                "evaluations (docs/match.md: Adaptive ranking).",
                panel=ADAPTIVE_PANEL,
            ),
        ],
        False,
    ),
    "adaptive_schedule": Declared(
        Annotated[
            str | None,
            option(
                "--adaptive-schedule",
                help="Elimination stages, e.g. keep=8,3,1:steps=2,6,all or keep=50%,25%,k:steps=1,4,all (implies "
                "--adaptive; default: the measured default).",
                panel=ADAPTIVE_PANEL,
            ),
        ]
    ),
    "adaptive_per": Declared(
        Annotated[
            Per,
            option(
                "--adaptive-per",
                help="What ranks with --adaptive: image (its captions) or caption (its images; use --normalize "
                "uncond).",
                panel=ADAPTIVE_PANEL,
                metavar="NAME",
            ),
        ],
        Per.image,
    ),
    "pairs": Declared(
        Annotated[
            Path | None,
            option(
                "--pairs",
                help="Score only the pairs listed in this .csv / .jsonl / .json (image and caption by index, name "
                "or text); with --adaptive each image ranks its listed captions.",
                panel=ADAPTIVE_PANEL,
            ),
        ]
    ),
    "shortlist": Declared(
        Annotated[
            str | None,
            option(
                "--shortlist",
                help="Search a gallery: a CLIP model (a CLIPModel folder, a hub id, or demo: the shipped mini-CLIP) "
                "proposes --shortlist-k candidates per image (per caption with --adaptive-per caption) and DSD "
                "scores only those. A bundle exported with --shortlist shortlists with its own towers: give "
                "--shortlist-k alone.",
                panel=ADAPTIVE_PANEL,
            ),
        ]
    ),
    "shortlist_k": Declared(
        Annotated[
            int | None,
            option(
                "--shortlist-k",
                min=1,
                help="Candidates per query the shortlist keeps (default 8; at or above the candidate count: every "
                "candidate, the run without a shortlist).",
                panel=ADAPTIVE_PANEL,
            ),
        ]
    ),
    "shortlist_fuse": Declared(
        Annotated[
            float | None,
            option(
                "--shortlist-fuse",
                min=0.0,
                max=1.0,
                help="Rank each query's shortlist by W x its standardised CLIP similarity + (1 - W) x its "
                "standardised DSD score (the result's scores are then these; W from 0, DSD alone, to 1, CLIP "
                "alone). On the demo world W = 0.35 beat both alone: docs/search.md.",
                panel=ADAPTIVE_PANEL,
            ),
        ]
    ),
}


def adaptive_schedule(adaptive: bool, schedule: str | None) -> str | None:
    """What ``--adaptive`` / ``--adaptive-schedule`` ask for: a schedule given implies ``--adaptive``; ``--adaptive``
    alone is the default one; neither is exhaustive scoring (``None``)."""
    return schedule or ("default" if adaptive else None)


def _build_match_options(**values: Any) -> MatchOptions:
    schedule = adaptive_schedule(values.pop("adaptive", False), values.pop("adaptive_schedule", None))
    values["per"] = plain(values.pop("adaptive_per", "image"))
    model, k = values.pop("shortlist", None), values.pop("shortlist_k", None)
    fuse = values.pop("shortlist_fuse", None)
    if fuse is not None and model is None and k is None:
        raise ConfigError(
            "`shortlist_fuse` ranks a gallery search's shortlist: add `shortlist`", field="shortlist_fuse"
        )
    shortlist = None if model is None and k is None else ShortlistSpec(model=model, k=8 if k is None else k, fuse=fuse)
    return MatchOptions(adaptive=schedule, shortlist=shortlist, **values)


def match_options(*, only=None) -> Callable:
    """Give the command ``options: MatchOptions`` from the output, top-k, adaptive and pair options (or those in
    ``only``)."""
    return option_group("options", _select(_MATCH, only, (), None), _build_match_options)


# -- files a command writes ---------------------------------------------------------------------------------------


def prepare_output(path: str | Path | None, flag: str) -> None:
    """The one rule for every file or folder a command writes: a missing parent folder is created when it lies inside
    the current folder, and refused outside it, where a typo (``-o /nonexistent/out.csv``) would otherwise leave a
    stray folder tree behind."""
    if path is None:
        return
    parent = Path(path).parent
    if parent.is_dir():
        return
    if parent.exists():
        raise OutputError(f"{flag} {path}: {parent} is not a folder")
    here = Path.cwd().resolve()
    target = (here / parent).resolve()
    if target != here and here not in target.parents:
        raise OutputError(
            f"{flag} {path}: the folder {parent} does not exist; dsdkit creates missing folders only inside the "
            f"current folder (create it first: mkdir -p {parent})"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(Path(path), exc) from None
