"""One engine interface: the PyTorch Scorer and the bundle Matcher answer the same calls with the same numbers.

The per-timestep terms each engine returns are checked against the naive reference of
``tests/pytorch/test_scorer_reference.py`` (no dsdkit scoring code: diffusers' default attention, hooks that recompute
Q and K in float64, explicit loops), evaluated at one (t_k, ε_k) at a time.
"""

from __future__ import annotations

import inspect
import threading

import numpy as np
import pytest

CAPTIONS = ["a red circle", "two blue squares on a table", "a green triangle"]
S = 3
STEPS = [0, 2]  # a subset of the S = 3 timestep indices
# The bundle side agrees with PyTorch within its export's parity tolerance (fp32 ONNX Runtime vs eager PyTorch).
BUNDLE_ATOL, BUNDLE_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def engines(export_case, tiny_model):
    """A Scorer and a Matcher of the same (zero-shot, fp32) model and scoring config."""
    from dsdkit.runtime.matcher import Matcher

    from dsdkit.pytorch.scorer import Scorer

    path, manifest = export_case("discffusion")
    matcher = Matcher.from_bundle(path, backend="onnxruntime", device="cpu", num_timesteps=S, batch_size=4)
    scorer = Scorer(tiny_model, matcher.config, batch_size=4)
    yield {"scorer": scorer, "matcher": matcher}
    matcher.close()


INTERFACE = [
    "encode_images",
    "encode_pixels",
    "encode_texts",
    "score_encoded_pairs",
    "score_encoded_matrix",
    "score_pairs",
    "score_matrix",
    "score",
    "iter_blocks",
    "rank_texts",
    "rank_images",
    "planned_evaluations",
    "step_indices",
    "metadata",
    "close",
]


@pytest.mark.parametrize("kind", ["scorer", "matcher"])
def test_one_interface_same_numbers(engines, shape_images, kind):
    """One test body for both engines: the same names, signatures, return types and numbers."""
    from dsdkit.runtime.engine import Engine, ScoreOutput

    engine, reference = engines[kind], engines["scorer"]
    assert isinstance(engine, Engine)
    for name in INTERFACE:
        # Defined once (the shared base) or overridden with the base's exact signature.
        assert inspect.signature(getattr(type(engine), name)) == inspect.signature(getattr(Engine, name)), name
    assert engine.timesteps == reference.timesteps and len(engine.timesteps) == S
    assert engine.layer_names == reference.layer_names
    assert engine.config == reference.config

    out = engine.score_matrix(shape_images[:3], CAPTIONS)
    assert isinstance(out, ScoreOutput)
    assert out.attention_steps.shape == (3, 3, S, len(engine.layer_names))
    assert out.denoise_steps.shape == (3, 3, S) and out.steps == [0, 1, 2]
    assert out.unet_evaluations == engine.planned_evaluations(3, 9)
    expected = reference.score_matrix(shape_images[:3], CAPTIONS)
    tolerance = dict(atol=BUNDLE_ATOL, rtol=BUNDLE_RTOL) if kind == "matcher" else dict(atol=0, rtol=1e-6)
    np.testing.assert_allclose(out.scores, expected.scores, **tolerance)
    np.testing.assert_allclose(out.attention_steps, expected.attention_steps, **tolerance)
    # One timestep's denoising term is a difference of two noise-error norms (~30): the scorer graph's noise_error
    # tolerance (atol 1e-4) applies to it, not the score's.
    denoise_tolerance = dict(atol=1e-4, rtol=1e-5) if kind == "matcher" else tolerance
    np.testing.assert_allclose(out.denoise_steps, expected.denoise_steps, **denoise_tolerance)
    np.testing.assert_allclose(engine.score(shape_images[:3], CAPTIONS), expected.scores, **tolerance)

    seen = []
    pairs = engine.score_pairs(shape_images[:2], CAPTIONS, [(0, 2), (1, 0)], steps=[1], progress=seen.append)
    assert pairs.steps == [1] and pairs.scores.shape == (2,)
    np.testing.assert_allclose(pairs.scores, expected.per_step[[0, 1], [2, 0], 1], **tolerance)
    # Conditional terms are per pair and recomputed; the images' unconditional terms were cached by the call above.
    assert sum(seen) == pairs.unet_evaluations == 2

    meta = engine.metadata()
    assert {"backend", "model", "scoring", "timesteps", "layers", "warnings"} <= set(meta)
    assert meta["timesteps"] == engine.timesteps and meta["scoring"] == engine.config.to_dict()


@pytest.mark.parametrize("kind", ["scorer", "matcher"])
def test_per_timestep_terms_equal_the_naive_reference(engines, tiny_model_dir, shape_images, kind):
    """Each engine's terms at index k equal the naive reference evaluated at (t_k, ε_k) alone."""
    from tests.pytorch.test_scorer_reference import reference_scores

    engine = engines[kind]
    images = shape_images[1:3]
    out = engine.score_matrix(images, CAPTIONS[:2], steps=STEPS)
    assert out.steps == STEPS and out.timesteps == [engine.timesteps[k] for k in STEPS]
    # ONNX Runtime's fp32 kernels sum in their own order (2.3e-5 measured on an AVX-512 CPU).
    atol = 1e-5 if kind == "scorer" else 5e-5
    for position, k in enumerate(STEPS):
        expected = reference_scores(
            tiny_model_dir,
            images,
            CAPTIONS[:2],
            engine.config,
            engine.resolution,
            engine.layer_names,
            [engine.timesteps[k]],
            noise_indices=[k],
        )
        np.testing.assert_allclose(out.per_step[..., position], expected, rtol=0, atol=atol)
    # Any subset combines by averaging: the two-step score is the mean of its per-step scores.
    np.testing.assert_allclose(out.scores, out.per_step.mean(-1), rtol=1e-12)
    np.testing.assert_allclose(out.at([2]).scores, out.per_step[..., 1], rtol=1e-12)
    assert np.ptp(out.per_step[..., 0] - out.per_step[..., 1]) > 1e-4, "the timesteps must really differ"


def test_steps_out_of_range_are_refused(engines):
    from dsdkit.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="out of range: this engine has 3 timesteps"):
        engines["scorer"].step_indices([3])


def test_concurrent_calls_on_one_model(tiny_model, shape_images):
    """Two scorers with different configs share one UNet from two threads and get their sequential results."""
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.scorer import Scorer

    configs = [
        ScoringConfig.from_preset("discffusion", num_timesteps=2),
        ScoringConfig.from_preset("paper", noise_levels=(0.3, 0.6)),
    ]
    sequential = [Scorer(tiny_model, c, batch_size=2).score(shape_images[:2], CAPTIONS) for c in configs]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def run(index):
        try:
            scorer = Scorer(tiny_model, configs[index], batch_size=2)
            barrier.wait()
            results[index] = scorer.score(shape_images[:2], CAPTIONS)
        except Exception as error:  # surfaced below with the thread's own error
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, expected in zip(results, sequential, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
