"""``match`` drives either engine through one path: images decoded once, one chunking rule, per-layer terms on
both engines, and one config resolution."""

from __future__ import annotations

import numpy as np
import pytest
from dsdkit.runtime.config import ScoringConfig

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def test_each_image_is_decoded_once_and_reaches_the_engine_as_pixels(tiny_model, shape_images, monkeypatch):
    from dsdkit.runtime import engine as engine_module

    from dsdkit.jobs import match as matching

    calls = []
    original = engine_module.preprocess_image  # the engine's one block iterator decodes each image, once
    monkeypatch.setattr(engine_module, "preprocess_image", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    monkeypatch.setattr(
        engine_module.Engine,
        "encode_images",
        lambda *a, **k: pytest.fail("match must hand the engine decoded pixels, not images to decode again"),
    )
    images = shape_images[:3] + [shape_images[0]]  # a duplicate is decoded (it is a separate input) but scored once
    result = matching.match(images, CAPTIONS, model=tiny_model, config=ScoringConfig(num_timesteps=2), chunk_size=2)
    assert len(calls) == len(images)
    # The duplicate is scored in the second chunk's batches: equal within the contract's batch invariance (fp32 on
    # CPU, 1e-6 relative; bitwise on some CPUs, 9e-9 apart on an AVX-512 FP16 one).
    np.testing.assert_allclose(result.scores[3], result.scores[0], rtol=1e-6, atol=0)
    # Two chunks of 2 images at 2 steps: the unconditional pass once per distinct image (the duplicate's is cached)
    # and every pair of each chunk's distinct images.
    assert result.meta["unet_evaluations"] == (2 * 2 + 2 * 3 * 2) + (1 * 2 + 2 * 3 * 2)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunking_does_not_change_scores(tiny_model, shape_images, chunk_size):
    from dsdkit.jobs.match import match
    from dsdkit.pytorch.scorer import Scorer

    config = ScoringConfig(num_timesteps=2)
    result = match(shape_images, CAPTIONS, model=tiny_model, config=config, chunk_size=chunk_size)
    expected = Scorer(tiny_model, config).score(shape_images, CAPTIONS)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6, atol=0)


def test_per_layer_terms_on_both_engines(export_case, tiny_model, shape_images):
    from dsdkit.jobs.match import match

    path, manifest = export_case("discffusion")
    kwargs = dict(per_layer=True, batch_size=4)
    bundle = match(shape_images[:2], CAPTIONS, bundle=path, num_timesteps=2, backend="onnxruntime", **kwargs)
    config = ScoringConfig.from_dict({**manifest["scoring"], "num_timesteps": 2})
    torch_side = match(shape_images[:2], CAPTIONS, model=tiny_model, config=config, **kwargs)
    assert bundle.layer_scores.shape == torch_side.layer_scores.shape == (2, 3, len(manifest["layers"]))
    np.testing.assert_allclose(bundle.layer_scores, torch_side.layer_scores, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(bundle.scores, torch_side.scores, atol=1e-5, rtol=1e-4)
    assert bundle.meta["layers"] == torch_side.meta["layers"] == manifest["layers"]
    assert bundle.meta["unet_evaluations"] == torch_side.meta["unet_evaluations"] == 2 * 2 + 2 * 3 * 2


def test_an_adapter_under_a_contradicting_config_is_refused_before_scoring(adapter_files, tiny_model, shape_images):
    from dsdkit.runtime.errors import ConfigError

    from dsdkit.jobs.match import match

    # The kv-prompt fixture adapter was made for the discffusion pooling; the paper config pools otherwise.
    with pytest.raises(ConfigError, match="pins pooling=text-lse"):
        match(
            shape_images[:1],
            CAPTIONS,
            model=tiny_model,
            config=ScoringConfig.from_preset("paper"),
            adapters=adapter_files["kv-prompt"],
        )
    # Free knobs may change: the adapter's own config with another S scores.
    result = match(
        shape_images[:1],
        CAPTIONS,
        model=tiny_model,
        config=ScoringConfig(num_timesteps=1),
        adapters=adapter_files["kv-prompt"],
    )
    assert result.meta["timesteps"] == ScoringConfig(num_timesteps=1).timestep_table
