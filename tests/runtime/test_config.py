"""``resolve_scoring``: the one rule for which scoring config a job runs with (explicit knobs > adapter header >
preset), and the torch-free home of the config."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dsdkit.runtime.config import (
    FREE_KNOBS,
    PINNED_KNOBS,
    PRESETS,
    ModelDeclaration,
    ScoringConfig,
    resolve_scoring,
)
from dsdkit.runtime.errors import ConfigError


def test_without_a_header_the_preset_and_the_knobs():
    assert resolve_scoring() == PRESETS["discffusion"]
    assert resolve_scoring("paper") == PRESETS["paper"]
    config = resolve_scoring("paper", None, {"lse_lambda": 2.0, "denoise_term": None})
    assert config.lse_lambda == 2.0 and config.denoise_term is False  # None means "not given"
    assert config.pooling.value == "image-lse"


def test_the_header_wins_over_the_preset_and_explicit_knobs_over_the_header():
    header = PRESETS["discffusion"].replace(num_timesteps=7, normalize="uncond").to_dict()
    # Free knobs come from the header, not from the preset's defaults ...
    assert resolve_scoring("discffusion", header).num_timesteps == 7
    assert resolve_scoring(None, header).normalize.value == "uncond"
    # ... and explicit knobs override them.
    config = resolve_scoring(None, header, {"num_timesteps": 3, "denoise_term": False})
    assert (config.num_timesteps, config.denoise_term, config.normalize.value) == (3, False, "uncond")


def test_a_contradiction_of_a_pinned_knob_is_refused_in_one_line():
    header = PRESETS["discffusion"].to_dict()
    with pytest.raises(ConfigError) as preset_clash:
        resolve_scoring("paper", header, source="run/adapter.safetensors")
    message = str(preset_clash.value)
    assert "\n" not in message and "run/adapter.safetensors pins" in message and "`preset` paper" in message
    assert "--" not in message and preset_clash.value.field == "preset"  # the CLI says --preset (as_flags)
    assert "pooling=text-lse" in message and "pooling=image-lse" in message
    with pytest.raises(ConfigError, match="pins lse_lambda=1.0, but this run asks for lse_lambda=3"):
        resolve_scoring(None, header, {"lse_lambda": 3})
    # Giving a pinned knob its pinned value is no contradiction.
    assert resolve_scoring(None, header, {"pooling": "text-lse", "layers": "last"}) == PRESETS["discffusion"]


def test_pinned_and_free_knobs_cover_every_field_once():
    fields = set(ScoringConfig.__dataclass_fields__) - {"preset"}
    assert set(PINNED_KNOBS) | set(FREE_KNOBS) == fields
    assert not set(PINNED_KNOBS) & set(FREE_KNOBS)
    # What the adapter computes: pooling definition, tokens, layers, heads and the B3 mixing.
    assert set(PINNED_KNOBS) == {"pooling", "lse_lambda", "tokens", "layers", "heads", "uncond_in_attention"}


def test_unknown_knobs_and_presets_are_refused():
    with pytest.raises(ConfigError, match="unknown scoring knob"):
        resolve_scoring(None, None, {"temperature": 1})
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        resolve_scoring("fast")


def test_the_config_and_its_timestep_table_import_without_torch():
    code = (
        "import sys; from dsdkit.runtime.config import ScoringConfig; "
        "assert ScoringConfig(num_timesteps=10).timestep_table[0] == 89; "
        "from dsdkit.runtime.config import ScoringConfig as Again; assert Again is ScoringConfig; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_model_recommends_knobs_under_the_explicit_ones_and_never_over_a_header():
    """The demo model's declaration (``attention_term: false``): it applies over the preset, an explicit knob wins,
    ``--no-denoise`` (and ``--preset paper``, the attention term alone) brings the attention term back instead of
    leaving a score without a term, and an adapter's header (resolved under it at training) is not touched."""
    demo = ModelDeclaration(context_tokens="words", scoring={"attention_term": False})
    recommended = resolve_scoring(None, None, {"num_timesteps": 10}, model=demo)
    assert (recommended.attention_term, recommended.denoise_term, recommended.num_timesteps) == (False, True, 10)
    assert resolve_scoring(None, None, {"attention_term": True}, model=demo).attention_term is True
    attention_alone = resolve_scoring(None, None, {"denoise_term": False}, model=demo)
    assert (attention_alone.attention_term, attention_alone.denoise_term) == (True, False)
    paper = resolve_scoring("paper", None, None, model=demo)
    assert (paper.attention_term, paper.denoise_term) == (True, False)
    # An explicit preset is a whole recipe: the method's score, both terms with --denoise.
    assert resolve_scoring("paper", None, {"denoise_term": True}, model=demo).attention_term is True
    assert resolve_scoring("discffusion", None, None, model=demo) == PRESETS["discffusion"].replace(tokens="words")
    # Asking for a knob that shapes the attention term is asking for that term.
    for knob, value in (("layers", "all"), ("pooling", "image-lse"), ("uncond_in_attention", True)):
        assert resolve_scoring(None, None, {knob: value}, model=demo).attention_term is True, knob
    header = PRESETS["discffusion"].replace(tokens="words").to_dict()
    assert resolve_scoring(None, header, None, model=demo).attention_term is True
    # Without a declaration nothing changes.
    assert resolve_scoring(None, None, {"num_timesteps": 10}).attention_term is True


def test_each_term_switch_alone_means_the_other_term_alone():
    denoise_alone = PRESETS["paper"].replace(denoise_term=True, attention_term=False)
    assert ScoringConfig.from_preset("paper", attention_term=False) == denoise_alone
    header = PRESETS["discffusion"].replace(attention_term=False).to_dict()
    assert resolve_scoring(None, header, {"denoise_term": False}).attention_term is True  # a bundle's config
    with pytest.raises(ConfigError, match="without a term"):
        resolve_scoring(None, None, {"denoise_term": False, "attention_term": False})


@pytest.mark.parametrize(
    "scoring, message",
    [
        ({"layers": "all"}, "can recommend only"),
        ({"timesteps": "noise-levels"}, "can recommend only"),
        ({"attention_term": "no"}, "true or false"),
        ({"num_timesteps": "ten"}, "a whole number"),
        ({"num_timesteps": 10.5}, "a whole number"),
        ({"num_timesteps": 0}, "between 1 and 980"),
        ({"normalize": "z-score"}, "not one of"),
    ],
)
def test_a_declaration_recommends_only_valid_evaluation_knobs(scoring, message):
    with pytest.raises(ConfigError, match=message):
        ModelDeclaration(scoring=scoring)
    with pytest.raises(ConfigError, match="context_tokens"):
        ModelDeclaration(context_tokens="eos")
