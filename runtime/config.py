"""The scoring configuration: every knob of the DSD score, its two presets, its timestep tables, and the one rule
that decides which config a job runs with (:func:`resolve_scoring`).

A :class:`ScoringConfig` is plain data (torch-free, so the bundle runtime reads the same type the PyTorch side
writes). It is written next to every artifact (result files, adapters, bundles) so that a score can always be traced
to exactly how it was computed; ``dsdkit.runtime.config`` re-exports this module.

| knob                    | ``discffusion`` (authors' code, per pair) | ``paper`` (Eq. 3-4, 7)                  |
|-------------------------|-------------------------------------------|-----------------------------------------|
| ``pooling``             | ``text-lse``: mean_i LSE_j L_ij            | ``image-lse``: mean_j (1/λ) LSE_i λP_ij  |
| ``lse_lambda``          | 1                                         | 5                                       |
| ``tokens``              | ``all`` 77 positions                      | ``words-eos`` (BOS and padding masked)  |
| ``layers``              | ``last`` (last down, mid, last up block)  | ``all`` cross-attention layers          |
| ``heads``               | ``uniform``                               | ``dynamic`` (Eq. 7, closed form)        |
| ``timesteps``           | ``discffusion`` table with S steps        | ``noise-levels`` 0.2/0.4/0.6/0.8        |
| ``denoise_term``        | on                                        | off                                     |
| ``attention_term``      | on                                        | on                                      |
| ``uncond_in_attention`` | off (the authors' bug B3, as a knob)      | off                                     |
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import ConfigError
from .images import ResizeMode
from .records import record_from_dict
from .timesteps import discffusion_timesteps, noise_level_timesteps

logger = logging.getLogger(__name__)

__all__ = [
    "Pooling",
    "TokenSet",
    "LayerSet",
    "HeadWeighting",
    "TimestepTable",
    "Normalization",
    "ResizeMode",
    "ScoringConfig",
    "PRESETS",
    "PINNED_KNOBS",
    "FREE_KNOBS",
    "resolve_scoring",
    "ModelDeclaration",
    "RECOMMENDABLE_KNOBS",
    "KNOB_OPTIONS",
    "knob_option",
    "knob_field",
]


#: The command-line option of each knob whose option is not simply ``--knob-name`` (``--set knob=value`` sets any
#: knob), so that a message names what the user typed.
KNOB_OPTIONS = {
    "num_timesteps": "--timesteps",
    "lse_lambda": "--lambda",
    "timesteps": "--schedule",
    "denoise_term": "--denoise",
    "attention_term": "--attention",
    "noise_seed": "--seed",
}


def knob_field(name: str) -> str:
    """How library messages name a knob: by its field, in backticks (`num_timesteps`); the CLI says the option a
    user types instead (``--timesteps``, :data:`KNOB_OPTIONS`)."""
    return f"`{name}`"


def knob_option(name: str) -> str:
    """How messages name a knob: by the option a user types (``num_timesteps`` -> ``--timesteps``)."""
    return KNOB_OPTIONS.get(name, "--" + name.replace("_", "-"))


class Pooling(str, Enum):
    text_lse = "text-lse"  # per image token, LogSumExp of the logits over text tokens; mean over image tokens
    image_lse = "image-lse"  # per text token, LogSumExp of the probabilities over image tokens; mean over tokens


class TokenSet(str, Enum):
    all = "all"  # all 77 positions: BOS, words, EOS, padding (authors' code)
    words_eos = "words-eos"  # word tokens and EOS (paper preset)
    words = "words"  # word tokens only


class LayerSet(str, Enum):
    last = "last"  # last cross-attention block of the down path, the mid block, last of the up path (6 on SD2)
    all = "all"  # every cross-attention layer (16 on SD2)


class HeadWeighting(str, Enum):
    uniform = "uniform"
    dynamic = "dynamic"  # paper Eq. 7: attribution-based weights, per pair and per head


class TimestepTable(str, Enum):
    discffusion = "discffusion"  # idx_k = 10 + k*floor(1000/S) < 990, t = 999 - idx, ascending
    noise_levels = "noise-levels"  # t = round(level * 999) for the given levels


class Normalization(str, Enum):
    none = "none"
    uncond = "uncond"  # score(x, c) - score(x, empty caption), for comparing images under one caption


@dataclass(frozen=True)
class ScoringConfig:
    """How a DSD score is computed. Build one with :meth:`preset` and override single knobs."""

    preset: str = "discffusion"
    pooling: Pooling = Pooling.text_lse
    lse_lambda: float = 1.0
    tokens: TokenSet = TokenSet.all
    layers: LayerSet = LayerSet.last
    heads: HeadWeighting = HeadWeighting.uniform
    timesteps: TimestepTable = TimestepTable.discffusion
    num_timesteps: int = 30
    noise_levels: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    denoise_term: bool = True
    # Off: the denoising term alone (Diffusion Classifier's score, Li et al. 2023); the attention terms are still
    # computed and reported (layer scores, explain), they just do not enter the score.
    attention_term: bool = True
    uncond_in_attention: bool = False
    normalize: Normalization = Normalization.none
    resize: ResizeMode = ResizeMode.squash
    resolution: int | None = None  # None: the model's native resolution (512 for SD2-base)
    noise_seed: int = 0

    def __post_init__(self):
        enums = {
            "pooling": Pooling,
            "tokens": TokenSet,
            "layers": LayerSet,
            "heads": HeadWeighting,
            "timesteps": TimestepTable,
            "normalize": Normalization,
            "resize": ResizeMode,
        }
        for name, enum in enums.items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value.value if isinstance(value, Enum) else value))
            except ValueError:
                choices = ", ".join(m.value for m in enum)
                raise ConfigError(f"{knob_field(name)} {value!r} is not one of {choices}", field=name) from None
        object.__setattr__(self, "noise_levels", tuple(float(v) for v in self.noise_levels))
        self.validate()

    def validate(self) -> None:
        """Reject impossible knob values and combinations with a message that says what to change."""
        if not self.lse_lambda > 0:
            raise ConfigError(f"{knob_field('lse_lambda')} must be > 0, got {self.lse_lambda}", field="lse_lambda")
        if self.timesteps is TimestepTable.discffusion and not 1 <= self.num_timesteps <= 980:
            raise ConfigError(
                f"{knob_field('num_timesteps')} {self.num_timesteps}: S of the discffusion table must be between 1 "
                "and 980",
                field="num_timesteps",
            )
        if self.timesteps is TimestepTable.noise_levels:
            if not self.noise_levels:
                raise ConfigError(
                    f"{knob_field('noise_levels')} is empty; give at least one level in (0, 1]", field="noise_levels"
                )
            bad = [v for v in self.noise_levels if not 0.0 < v <= 1.0]
            if bad:
                raise ConfigError(
                    f"{knob_field('noise_levels')}: levels must lie in (0, 1], got {bad}", field="noise_levels"
                )
        if self.heads is HeadWeighting.dynamic and self.pooling is not Pooling.image_lse:
            raise ConfigError(
                f"{knob_field('heads')} dynamic (paper Eq. 7) attributes over attention probabilities and is "
                "defined for `pooling` image-lse; use `heads` uniform with text-lse pooling",
                field="heads",
            )
        if not self.attention_term and not self.denoise_term:
            raise ConfigError(
                f"{knob_field('attention_term')} off leaves the score without a term: keep the attention term or "
                "turn the denoising term on",
                field="attention_term",
            )
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise ConfigError(
                f"{knob_field('resolution')} must be a multiple of 64 (>= 64), got {self.resolution}",
                field="resolution",
            )

    # -- presets and serialisation ---------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ScoringConfig:
        """The named preset with some knobs overridden (``None`` values are ignored, so CLI defaults pass through)."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown scoring knob(s): {', '.join(sorted(unknown))}")
        values = _one_term_alone({k: v for k, v in overrides.items() if v is not None})
        return dataclasses.replace(base, **values)

    def replace(self, **changes: Any) -> ScoringConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value.value if isinstance(value, Enum) else (list(value) if isinstance(value, tuple) else value)
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoringConfig:
        values = dict(data) if isinstance(data, dict) else data
        if isinstance(values, dict) and "noise_levels" in values:
            values["noise_levels"] = tuple(values["noise_levels"])
        return record_from_dict(cls, values, "scoring config", "it was written by a newer dsdkit")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @property
    def timestep_table(self) -> list[int]:
        """The timesteps ``t_k`` this config scores at, ascending (entry k is paired with noise-bank entry k)."""
        if self.timesteps is TimestepTable.discffusion:
            return discffusion_timesteps(self.num_timesteps)
        return noise_level_timesteps(self.noise_levels)

    @property
    def needs_empty_caption_score(self) -> bool:
        """Whether the empty caption's attention term is needed (``normalize=uncond`` or the authors' B3)."""
        return self.normalize is Normalization.uncond or self.uncond_in_attention

    @property
    def needs_unconditional_pass(self) -> bool:
        """Whether ε̂(x_t, ∅) or the empty caption's attention is needed (computed once per image and timestep)."""
        return self.denoise_term or self.uncond_in_attention or self.normalize is Normalization.uncond


PRESETS: dict[str, ScoringConfig] = {}
PRESETS["discffusion"] = ScoringConfig()
PRESETS["paper"] = ScoringConfig(
    preset="paper",
    pooling=Pooling.image_lse,
    lse_lambda=5.0,
    tokens=TokenSet.words_eos,
    layers=LayerSet.all,
    heads=HeadWeighting.dynamic,
    timesteps=TimestepTable.noise_levels,
    denoise_term=False,
)


# -- which config a job runs with ---------------------------------------------------------------------------------

#: Knobs that define what a score *is*. An adapter (or a bundle) is trained / exported for one setting of them, pins
#: them in its header, and is refused under another.
PINNED_KNOBS = ("pooling", "lse_lambda", "tokens", "layers", "heads", "uncond_in_attention")

#: Knobs that stay free under an adapter: evaluation choices that do not change what the adapter computes.
FREE_KNOBS = tuple(
    f.name for f in dataclasses.fields(ScoringConfig) if f.name not in PINNED_KNOBS and f.name != "preset"
)


def _one_term_alone(overrides: dict[str, Any]) -> dict[str, Any]:
    """Explicit knobs with what each term switch means: ``denoise_term`` off asks for the attention term alone and
    ``attention_term`` off for the denoising term alone, so each turns the other term on unless that is given too
    (``--no-denoise`` works the same on a model or bundle whose score leaves the attention term out)."""
    overrides = dict(overrides)
    if overrides.get("denoise_term") is False:
        overrides.setdefault("attention_term", True)
    if overrides.get("attention_term") is False:
        overrides.setdefault("denoise_term", True)
    return overrides


#: The knobs a model may recommend (:class:`ModelDeclaration`): which terms the score has, S, and the normalisation.
RECOMMENDABLE_KNOBS = ("attention_term", "denoise_term", "num_timesteps", "normalize")


@dataclass(frozen=True)
class ModelDeclaration:
    """What a model declares about how it is scored (a folder's ``dsdkit_model.json``; written by
    ``dsdkit world train``, read by ``load_model``).

    ``context_tokens``: what its cross-attention attends to (``runtime.tokenizer.CONTEXTS``); a masked context takes
    precedence over the ``tokens`` knob (``dsdkit world train`` writes it). ``scoring``: knob values the model
    recommends over the default preset's, measured on the model and written with
    :func:`~dsdkit.pytorch.models.write_model_declaration` — only :data:`RECOMMENDABLE_KNOBS` (the demo model's
    ``{"attention_term": false}``: on it the attention term lowers every ranking subset). They apply when no preset
    is given explicitly, under the explicit knobs; ``attention_term: false`` also yields to an explicit knob that
    shapes the attention term (``--layers``, ``--pooling``, ...: asking for one means asking for that term), and a
    recommendation that would leave an invalid config (``--no-denoise``: the attention term alone) yields too.
    """

    context_tokens: str = "all"
    scoring: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .tokenizer import CONTEXTS

        if self.context_tokens not in CONTEXTS:
            raise ConfigError(f"context_tokens {self.context_tokens!r} is not one of {', '.join(CONTEXTS)}")
        if not isinstance(self.scoring, dict):
            raise ConfigError("a model's recommended scoring is an object of knob values")
        unknown = sorted(set(self.scoring) - set(RECOMMENDABLE_KNOBS))
        if unknown:
            raise ConfigError(f"a model can recommend only {', '.join(RECOMMENDABLE_KNOBS)}, not {', '.join(unknown)}")
        for name, value in self.scoring.items():
            if name.endswith("_term") and not isinstance(value, bool):
                raise ConfigError(f"the model's recommended {name} must be true or false, got {value!r}")
            if name == "num_timesteps" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"the model's recommended {name} must be a whole number, got {value!r}")
        ScoringConfig.from_preset("discffusion", **self.scoring)  # a value no config accepts is refused here

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"context_tokens": self.context_tokens}
        if self.scoring:
            out["scoring"] = dict(self.scoring)
        return out


def resolve_scoring(
    preset: str | None = None,
    pinned: ScoringConfig | dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    source: str = "the adapter",
    model: ModelDeclaration | None = None,
) -> ScoringConfig:
    """The scoring config of a job: explicit knob ``overrides`` over the adapter's header (``pinned``) over the preset.

    Used by every command (match, eval, explain, export, train, the dry run), so all of them agree.

    Args:
        preset: the ``--preset`` given explicitly, or ``None``.
        pinned: the scoring config an adapter was trained with (its header) or a bundle was exported with, if any.
        overrides: knob values given explicitly (``None`` values are ignored, so CLI defaults pass through).
        source: how ``pinned`` is named in messages (an adapter file, a bundle folder).

    Without ``pinned``: the preset (``discffusion`` by default) with the overrides. With it: the header's config with
    the overrides of :data:`FREE_KNOBS`. An explicit preset or override that contradicts one of its
    :data:`PINNED_KNOBS` is refused in one line, since the adapter computes another score under it.

    ``model``: what the model declares (:class:`ModelDeclaration`). A masked context takes precedence over the
    ``tokens`` knob (the model is scored over its word tokens): a preset's value is replaced by ``words``, an
    explicit other value is refused. Its recommended knobs apply under the explicit knobs when no preset is given
    (see :class:`ModelDeclaration` for when they yield), without ``pinned`` only (an adapter's header or a bundle's
    config already holds them: they were resolved here).

    ``denoise_term`` off without ``attention_term`` means the attention term alone, and the other way round
    (:func:`_one_term_alone`).

    Raises:
        ConfigError: unknown preset or knob, an invalid value, or a contradiction of a pinned knob.
    """
    model = model or ModelDeclaration()
    overrides = _one_term_alone({k: v for k, v in (overrides or {}).items() if v is not None})
    recommended = {} if preset is not None else _recommendations(model.scoring, overrides)
    if model.context_tokens != "all":
        asked = overrides.get("tokens")
        if asked is not None and _plain(asked) != TokenSet.words.value:
            raise ConfigError(
                f"tokens={_plain(asked)}: the model declares a masked cross-attention context "
                f"({model.context_tokens}), so it is scored over its word tokens; leave the tokens knob out (or set "
                "it to words)"
            )
        overrides["tokens"] = TokenSet.words
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ScoringConfig)}
    if unknown:
        raise ConfigError(f"unknown scoring knob(s): {', '.join(sorted(unknown))}")
    if pinned is None:
        resolved = _with_recommendations(ScoringConfig.from_preset(preset or "discffusion", **overrides), recommended)
        chosen = PRESETS[preset or "discffusion"]
        where = "`timesteps` noise-levels" if "timesteps" in overrides else f"the {chosen.preset} preset"
        _refuse_steps_on_noise_levels(resolved, overrides, chosen.num_timesteps, where, pinned=False)
        return resolved
    base = pinned if isinstance(pinned, ScoringConfig) else ScoringConfig.from_dict(pinned)
    wanted = {}
    if preset is not None:
        chosen = ScoringConfig.from_preset(preset)
        wanted.update({k: getattr(chosen, k) for k in PINNED_KNOBS if getattr(chosen, k) != getattr(base, k)})
    wanted.update({k: v for k, v in overrides.items() if k in PINNED_KNOBS})
    clashes = {k: v for k, v in wanted.items() if _plain(v) != _plain(getattr(base, k))}
    if clashes:
        asked = ", ".join(f"{k}={_plain(v)}" for k, v in clashes.items())
        has = ", ".join(f"{k}={_plain(getattr(base, k))}" for k in clashes)
        via = f"`preset` {preset} " if preset is not None and set(clashes) - set(overrides) else ""
        raise ConfigError(
            f"{source} pins {has}, but this run asks {via}for {asked}; leave out `preset` and those knobs to "
            "score the way it was trained (or retrain / re-export it)",
            field="preset",
        )
    free = {k: v for k, v in overrides.items() if k not in PINNED_KNOBS}
    resolved = base.replace(**free) if free else base
    _refuse_steps_on_noise_levels(resolved, overrides, base.num_timesteps, source)
    return resolved


def _recommendations(recommended: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The model's recommended knobs that this job's explicit knobs leave standing: none given explicitly, and no
    ``attention_term: false`` beside an explicit knob that shapes the attention term."""
    wanted = {k: v for k, v in recommended.items() if k not in explicit}
    if wanted.get("attention_term") is False and set(explicit) & (set(PINNED_KNOBS) - {"tokens"}):
        wanted.pop("attention_term")
    return wanted


def _with_recommendations(config: ScoringConfig, wanted: dict[str, Any]) -> ScoringConfig:
    """``config`` with the model's recommended knobs, unless they make an invalid config (then the explicit choice
    stands, logged)."""
    if not wanted:
        return config
    try:
        return config.replace(**wanted)
    except ConfigError as exc:
        logger.info("the model's recommended scoring %s does not apply to this config (%s)", wanted, exc)
        return config


def _refuse_steps_on_noise_levels(
    resolved: ScoringConfig, overrides: dict, base_steps: int, source: str, pinned: bool = True
) -> None:
    """S (``--timesteps``) only sizes the discffusion table; under the noise-levels schedule it would be silently
    ignored, so asking for another S there is refused with the option that does choose the timesteps."""
    asked = overrides.get("num_timesteps")
    if asked is None or resolved.timesteps is not TimestepTable.noise_levels or int(asked) == int(base_steps):
        return
    levels = ",".join(f"{level:g}" for level in resolved.noise_levels)
    raise ConfigError(
        f"{knob_field('num_timesteps')} {asked} sets S of the discffusion timestep table, but {source} scores at "
        f"the noise-levels schedule ({levels}); choose the levels with `noise_levels` instead"
        + (" (an adapter learned the levels it was trained with: keep them unless you retrain)" if pinned else ""),
        field="num_timesteps",
    )


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def __getattr__(name: str):
    # The enum's old name (before "schedule" came to mean only an adaptive elimination schedule), with a warning.
    if name == "TimestepSchedule":
        import warnings

        warnings.warn(
            "dsdkit.runtime.config.TimestepSchedule is now dsdkit.runtime.config.TimestepTable (the old name will "
            "be removed in a later release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return TimestepTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
