"""A model that declares a masked cross-attention context (``dsdkit_model.json``, as `dsdkit world train` writes for
``context_tokens``) is scored, exported and explained attending to its word tokens only: each path fails here if it
ignores the declaration."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from dsdkit.runtime.tokenizer import ROLE_WORD

CAPTIONS = ["a red circle", "a blue square left of a green triangle"]


@pytest.fixture(scope="module")
def declared(micro_model_dir, tmp_path_factory):
    """The micro model, and a copy of it that declares ``context_tokens: words``."""
    from dsdkit.pytorch.models import write_model_declaration

    copy = tmp_path_factory.mktemp("context") / "words"
    shutil.copytree(micro_model_dir, copy)
    write_model_declaration(copy, context_tokens="words")
    return micro_model_dir, copy


def _scorer(folder, **knobs):
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.models import load_model
    from dsdkit.pytorch.scorer import Scorer

    return Scorer(load_model(folder, device="cpu"), ScoringConfig.from_preset("discffusion", num_timesteps=3, **knobs))


def _scores_with_masked_states_replaced(engine, images, seed=0):
    """Scores of ``images`` x CAPTIONS, and again with every masked position's text states replaced by noise."""
    rng = np.random.default_rng(seed)
    encoded, texts = engine.encode_images(images), engine.encode_texts(CAPTIONS)
    pairs = [(i, j) for i in range(len(images)) for j in range(len(CAPTIONS))]
    before = engine.score_encoded_pairs(encoded, texts, pairs).scores
    changed = []
    for text in texts:
        states = np.array(text.states, dtype=np.float32, copy=True)
        outside = text.tokens.roles != ROLE_WORD
        states[outside] = rng.normal(size=states[outside].shape)
        if not isinstance(text.states, np.ndarray):  # a torch tensor on the PyTorch engine
            import torch

            states = torch.from_numpy(states)
        changed.append(dataclasses.replace(text, states=states))
    after = engine.score_encoded_pairs(encoded, changed, pairs).scores
    return before, after


def test_the_pytorch_scorer_attends_to_word_tokens_only(declared, shape_images):
    plain, words = declared
    before, after = _scores_with_masked_states_replaced(_scorer(words), shape_images[:2])
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    # The same model without the declaration reads the masked positions: the check can fail.
    before, after = _scores_with_masked_states_replaced(_scorer(plain), shape_images[:2])
    assert np.abs(after - before).max() > 1e-3


def test_the_declaration_sets_the_tokens_knob_and_refuses_a_conflicting_one(declared):
    from dsdkit.runtime.config import ModelDeclaration, TokenSet, resolve_scoring
    from dsdkit.runtime.errors import ConfigError

    from dsdkit.pytorch.models import declared_model

    _, words = declared
    assert declared_model(words) == ModelDeclaration(context_tokens="words")
    assert _scorer(words).config.tokens is TokenSet.words  # the preset's "all" is replaced
    masked = ModelDeclaration(context_tokens="words")
    assert resolve_scoring("paper", None, {}, model=masked).tokens is TokenSet.words
    with pytest.raises(ConfigError, match="declares a masked cross-attention context"):
        resolve_scoring(None, None, {"tokens": "all"}, model=masked)


def test_the_empty_caption_keeps_its_whole_context_so_uncond_normalisation_works(declared, shape_images):
    _, words = declared
    scorer = _scorer(words, normalize="uncond")
    scores = scorer.score(shape_images[:2], CAPTIONS)
    assert np.isfinite(scores).all()


def test_explain_maps_put_all_attention_on_the_words(declared, shape_images):
    from dsdkit.pytorch.explain import explain

    plain, words = declared
    masked = explain(_scorer(words), shape_images[0], CAPTIONS[1])
    np.testing.assert_allclose(masked.maps.sum(axis=0), 1.0, atol=1e-5)
    unmasked = explain(_scorer(plain), shape_images[0], CAPTIONS[1])
    assert unmasked.maps.sum(axis=0).max() < 0.99


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_exported_bundle_attends_as_the_model_does(declared, shape_images, tmp_path, exporter):
    """Both exporters: the default (dynamo, torch.export under a dynamic batch) once failed on a masked context,
    since diffusers' processor repeats the mask per head (the demo model v2 could not be exported by default)."""
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle
    from dsdkit.runtime.matcher import Matcher

    plain, words = declared
    config = ExportConfig(exporter=exporter, parity=ParitySettings(images=2, captions=2, timesteps=2))
    manifest = export_bundle(words, tmp_path / "bundle", overrides={"num_timesteps": 3}, config=config)
    assert manifest["model"]["context_tokens"] == "words"
    with Matcher.from_bundle(tmp_path / "bundle") as matcher:
        before, after = _scores_with_masked_states_replaced(matcher, shape_images[:2])
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
        bundle_scores = matcher.score(shape_images[:2], CAPTIONS)
    np.testing.assert_allclose(bundle_scores, _scorer(words).score(shape_images[:2], CAPTIONS), rtol=1e-4, atol=1e-4)
    assert np.abs(bundle_scores - _scorer(plain).score(shape_images[:2], CAPTIONS)).max() > 1e-3
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["scoring"]["tokens"] == "words"


@pytest.mark.parametrize("knobs", [{}, {"normalize": "uncond", "pooling": "image-lse", "heads": "dynamic"}])
def test_the_reference_computation_agrees_with_the_scorer_under_a_masked_context(declared, shape_images, knobs):
    """The authors'-way reference (stock diffusers processors, the mask passed as the UNet's encoder attention mask
    and the pooling written out) scores a declared-words model as the scorer does; `dsdkit bench` relies on it. The
    same reference on the undeclared copy gives other scores, so the mask is what makes them agree."""
    from dsdkit.pytorch.reference import reference_scores

    plain, words = declared
    scorer = _scorer(words, **knobs)
    ours = scorer.score(shape_images[:2], CAPTIONS)
    np.testing.assert_allclose(reference_scores(scorer, shape_images[:2], CAPTIONS), ours, rtol=1e-5, atol=1e-5)
    if not knobs:  # (the plain model refuses normalize=uncond over words: its empty caption has none)
        unmasked = _scorer(plain, tokens="words")
        assert np.abs(reference_scores(unmasked, shape_images[:2], CAPTIONS) - ours).max() > 1e-3
