"""Typed, validated specs for what a job runs on and how: :class:`EngineSpec` (which engine, built by
:func:`dsdkit.jobs.engines.open_engine`) and :class:`MatchOptions` (what a ``match`` job computes and writes).

Both are frozen dataclasses checked once, on construction, with messages that name the field (the CLI turns a
field's name into its flag). Their JSON form (:meth:`to_dict` / :meth:`from_dict`) is what job manifests and the
serve config record, so a worker rebuilds exactly the engine the job was planned with. Torch-free.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.adaptive import Schedule
from ..runtime.config import FREE_KNOBS, PINNED_KNOBS, PRESETS, ScoringConfig
from ..runtime.errors import ConfigError
from ..runtime.records import record_from_dict
from ..runtime.results import OUTPUT_FORMATS

__all__ = ["EngineSpec", "MatchOptions", "ShortlistSpec", "DTYPES", "BACKENDS"]

DTYPES = ("fp32", "fp16", "bf16")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
#: torch.compile modes of the PyTorch scorer (the same tuple as ``dsdkit.pytorch.acceleration.COMPILE_MODES``,
#: repeated here so that checking a spec imports nothing of the PyTorch backend; a test keeps the two equal).
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Knobs a bundle's graphs do not fix: the only scoring a bundle job may change.
BUNDLE_KNOBS = frozenset(FREE_KNOBS) - {"resolution", "resize", "noise_seed"}
_SCORING_FIELDS = frozenset(f.name for f in dataclasses.fields(ScoringConfig)) - {"preset"}


def _plain(value: Any) -> Any:
    """JSON-able knob values: enums by value, tuples as lists."""
    if hasattr(value, "value"):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass(frozen=True)
class EngineSpec:
    """Which engine a job runs on: the PyTorch scorer of a model, or an exported bundle's matcher.

    Attributes:
        model: a diffusers SD2 folder, a hub id or ``"demo"`` (PyTorch engine; ``None`` and no bundle: the default
            model, stabilityai/stable-diffusion-2-1-base).
        bundle: an exported bundle folder (torch-free engine); excludes ``model``, ``adapters``, ``preset``,
            ``dtype`` other than fp32 and ``compile``.
        adapters: an adapter file from ``dsdkit train`` (PyTorch engine).
        preset: a scoring preset (``discffusion``, ``paper``); ``None``: the adapter's, else ``discffusion``.
        knobs: explicit scoring-knob values (:class:`~dsdkit.runtime.config.ScoringConfig` fields), over the
            adapter's header over the preset; a bundle takes only the knobs its graphs do not fix.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (for a bundle, the ONNX Runtime provider).
        dtype: the UNet's precision (PyTorch engine).
        compile: a ``torch.compile`` mode (PyTorch engine).
        backend: a bundle's runner: ``auto``, ``onnxruntime`` or ``tensorrt``.
        threads: CPU threads of the runner (default: what the process may use).
        batch_size: work items per UNet / scorer-graph batch (default: the engine's).
        chunk_size: images per chunk: memory stays flat, the unit of ``--resume`` and of shards.
    """

    model: str | None = None
    bundle: str | None = None
    adapters: str | None = None
    preset: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str = "fp32"
    compile: str | None = None
    backend: str = "auto"
    threads: int | None = None
    batch_size: int | None = None
    chunk_size: int = 64

    def __post_init__(self):
        for name in ("model", "bundle", "adapters"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        knobs = self.knobs.to_dict() if isinstance(self.knobs, ScoringConfig) else dict(self.knobs or {})
        knobs.pop("preset", None)
        object.__setattr__(self, "knobs", {k: _plain(v) for k, v in knobs.items() if v is not None})
        self._check_numbers()
        self._check_choices()
        if self.bundle is not None:
            self._check_bundle()
        else:
            self._check_scoring()

    def _check_numbers(self) -> None:
        for name in ("batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"`{name}` must be a whole number >= 1, got {value!r}", field=name)
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ConfigError(f"`chunk_size` must be a whole number >= 1, got {self.chunk_size!r}", field="chunk_size")

    def _check_choices(self) -> None:
        choices = {"dtype": DTYPES, "backend": BACKENDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"`{name}` {getattr(self, name)!r} is not one of {', '.join(allowed)}", field=name)
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"`compile` {self.compile!r} is not one of {', '.join(COMPILE_MODES)}", field="compile")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"`preset` {self.preset!r} is not one of {', '.join(PRESETS)}", field="preset")
        unknown = sorted(set(self.knobs) - _SCORING_FIELDS)
        if unknown:
            raise ConfigError(f"unknown scoring knob(s): {', '.join(unknown)}", field="knobs")

    def _check_bundle(self) -> None:
        if self.compile is not None:
            raise ConfigError(
                "`compile` is for the PyTorch path (`model`); a bundle's speed comes from its `backend`",
                field="compile",
            )
        given = [name for name in ("model", "adapters", "preset", "compile") if getattr(self, name) is not None]
        given += ["dtype"] if self.dtype != "fp32" else []
        given += sorted(set(self.knobs) - BUNDLE_KNOBS)
        if given:
            named = ", ".join(f"`{name}`" for name in given)
            raise ConfigError(
                f"{named}: a bundle fixes the model, adapter and scoring config at export (only "
                f"{', '.join(sorted(BUNDLE_KNOBS))} can change); re-export it with dsdkit export to change them",
                field=given[0],
            )

    def _check_scoring(self) -> None:
        """The knobs make a valid config over the preset (the adapter's header is checked when it is read)."""
        ScoringConfig.from_preset(self.preset or "discffusion", **self.knobs)

    @property
    def kind(self) -> str:
        """``"bundle"`` or ``"pytorch"``: which engine :func:`~dsdkit.jobs.engines.open_engine` builds."""
        return "bundle" if self.bundle is not None else "pytorch"

    def replace(self, **changes: Any) -> EngineSpec:
        return dataclasses.replace(self, **changes)

    def absolute(self) -> EngineSpec:
        """The spec with its local paths (bundle, model folder, adapter) made absolute, for processes that start
        in another folder (job workers, Ray replicas); ``demo`` and hub ids stay as they are."""
        changes = {}
        for name in ("bundle", "model", "adapters"):
            value = getattr(self, name)
            if value is not None and value != "demo" and Path(value).expanduser().exists():
                changes[name] = str(Path(value).expanduser().resolve())
        return self.replace(**changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (paths as given; the job manifest makes them absolute before writing)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "engine spec") -> EngineSpec:
        return record_from_dict(cls, data, source)

    def pinned_knobs(self) -> dict[str, Any]:
        """The explicit knobs that define what a score is (an adapter pins them)."""
        return {k: v for k, v in self.knobs.items() if k in PINNED_KNOBS}


@dataclass(frozen=True)
class ShortlistSpec:
    """A gallery search's first stage: a CLIP model proposes ``k`` candidates per query, DSD ranks only those.

    Attributes:
        model: a Hugging Face ``CLIPModel`` folder or hub id, or ``"demo"`` (the shipped mini-CLIP); ``None``: the
            CLIP towers a bundle was exported with (``dsdkit export --shortlist``), torch-free.
        k: candidates per query (at or above the candidate count: every candidate, the run without a shortlist).
        block_rows: queries per similarity block (memory: ``block_rows x candidates`` similarities at a time).
        fuse: the CLIP weight of a fused ranking (``None``: DSD's scores rank the shortlist): each query's listed
            pairs are scored ``fuse * z(CLIP similarity) + (1 - fuse) * z(DSD score)`` (:meth:`~dsdkit.runtime.
            results.MatchResult.fused`), for where DSD alone ranks worse than the shortlist (``docs/search.md``).
    """

    model: str | None = None
    k: int = 8
    block_rows: int = 1024
    fuse: float | None = None

    def __post_init__(self):
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        for name in ("k", "block_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                label = "shortlist_k" if name == "k" else name
                raise ConfigError(f"`{label}` must be a whole number >= 1, got {value!r}", field=label)
        if self.fuse is not None and (
            isinstance(self.fuse, bool) or not isinstance(self.fuse, (int, float)) or not 0.0 <= self.fuse <= 1.0
        ):
            raise ConfigError(
                f"`shortlist_fuse` is the CLIP weight of the fused score, from 0 (DSD alone) to 1 (CLIP alone); "
                f"got {self.fuse!r}",
                field="shortlist_fuse",
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["fuse"] is None:  # a job planned without fusion records what it recorded before the option existed
            del out["fuse"]
        return out


@dataclass(frozen=True)
class MatchOptions:
    """What a ``match`` job computes and writes, beside the engine.

    Attributes:
        output: a result file (``.csv``, ``.json``, ``.jsonl``, ``.parquet``), written atomically; ``None``: none.
        top_k: best captions per image and images per caption the JSON outputs list; with ``adaptive``, kept exact.
        adaptive: rank by successive elimination with this schedule (``"default"``, its text form or a
            :class:`~dsdkit.runtime.adaptive.Schedule`) instead of scoring every pair at every timestep.
        per: with ``adaptive``: what a query is, ``"image"`` (its captions) or ``"caption"`` (its images).
        pairs: a pair list file (or :class:`~dsdkit.runtime.pairs.PairList`): only those pairs are scored.
        per_layer: keep the attention term of every scored layer (``[N, M, L]``; not with adaptive, pairs, resume).
        resume: continue from ``<output>.partial/``.
        strict: refuse the job at the first unusable image or blank caption line instead of skipping it.
        empty_ok: a job whose images are all unusable returns an empty result (a shard of a larger job may).
        shortlist: a gallery search: a CLIP shortlist of each query's candidates (:class:`ShortlistSpec`), in the
            direction ``per`` names; DSD scores only the shortlisted pairs (exhaustively, or adaptively inside).
    """

    output: str | None = None
    top_k: int = 5
    adaptive: Schedule | None = None
    per: str = "image"
    pairs: Any = None
    per_layer: bool = False
    resume: bool = False
    strict: bool = False
    empty_ok: bool = False
    shortlist: ShortlistSpec | None = None

    def __post_init__(self):
        if isinstance(self.output, os.PathLike):
            object.__setattr__(self, "output", os.fspath(self.output))
        if isinstance(self.adaptive, str):
            object.__setattr__(self, "adaptive", Schedule.parse(self.adaptive))
        if self.output is not None and Path(self.output).suffix.lower() not in OUTPUT_FORMATS:
            raise ConfigError(
                f"`output` {self.output}: unknown format; use a file ending in {', '.join(OUTPUT_FORMATS)}",
                field="output",
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ConfigError(f"`top_k` must be a whole number >= 1, got {self.top_k!r}", field="top_k")
        if self.per not in ("image", "caption"):
            raise ConfigError(f"`per` must be image or caption, got {self.per!r}", field="per")
        if self.per == "caption" and self.adaptive is None and self.shortlist is None:
            raise ConfigError(
                "`per` caption ranks images by successive elimination or shortlists them: add `adaptive` or "
                "`shortlist`",
                field="per",
            )
        if self.shortlist is not None and self.pairs is not None:
            raise ConfigError(
                "`shortlist` and `pairs` both choose the pairs to score: give one of them", field="shortlist"
            )
        if self.shortlist is not None and self.per_layer:
            raise ConfigError("`per_layer` needs every pair at every timestep; drop `shortlist`", field="per_layer")
        if self.per_layer and self.resume:
            raise ConfigError(
                "`per_layer` cannot be combined with `resume` (per-layer terms are not kept between runs)",
                field="per_layer",
            )
        if self.per_layer and (self.adaptive is not None or self.pairs is not None):
            raise ConfigError(
                "`per_layer` needs every pair at every timestep; drop `adaptive` / `pairs` to use it",
                field="per_layer",
            )
        if self.resume and self.output is None:
            raise ConfigError(
                "`resume` needs an `output`: partial results are kept next to the output file", field="resume"
            )

    @property
    def detailed(self) -> bool:
        """Whether each cell carries (score, timesteps held, stage left after): adaptive ranking, given pairs or a
        shortlist."""
        return self.adaptive is not None or self.pairs is not None or self.shortlist is not None

    def replace(self, **changes: Any) -> MatchOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the pair list by its source only)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["adaptive"] = None if self.adaptive is None else str(self.adaptive.describe())
        out["pairs"] = None if self.pairs is None else str(getattr(self.pairs, "source", self.pairs))
        out["shortlist"] = None if self.shortlist is None else self.shortlist.to_dict()
        return out
