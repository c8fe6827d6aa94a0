"""`torch.compile` and channels-last for the PyTorch scorer: same scores as eager within the export's parity gate,
one compiled graph shared by every scorer that can use it, clear errors for what cannot work."""

from __future__ import annotations

import numpy as np
import pytest

from dsdkit.config import ScoringConfig

# The fp32 gate of `dsdkit export`'s parity check: absolute + relative to |eager score|.
ATOL, RTOL = 1e-5, 1e-4


def _within_gate(got: np.ndarray, expected: np.ndarray) -> None:
    excess = np.abs(got - expected) - (ATOL + RTOL * np.abs(expected))
    assert excess.max() <= 0, f"max abs diff {np.abs(got - expected).max():.3g}"


@pytest.fixture(scope="module")
def fresh_model(tiny_model_dir):
    """A model of its own: compiling converts its UNet to channels-last and caches graphs on it."""
    from dsdkit.models import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="fp32")


def test_compiled_scorer_matches_eager_and_compiles_once(fresh_model, shape_images):
    import torch

    from dsdkit.acceleration import Acceleration
    from dsdkit.scorer import Scorer

    # B3 on: an unconditional pass per image (its caption batch is an expanded, stride-0 tensor) as well as the
    # conditional one; 2 x 3 pairs x S=3 in batches of 4 leaves a short last batch, which is padded.
    config = ScoringConfig.from_preset("discffusion", num_timesteps=3, uncond_in_attention=True)
    images, captions = shape_images[:2], ["a red circle", "a blue square", "a green triangle"]
    eager = Scorer(fresh_model, config, batch_size=4).score_matrix(images, captions)
    compiled_scorer = Scorer(fresh_model, config, batch_size=4, acceleration=Acceleration(compile="default"))
    compiled = compiled_scorer.score_matrix(images, captions)
    _within_gate(compiled.scores, eager.scores)
    np.testing.assert_allclose(compiled.layer_scores, eager.layer_scores, atol=ATOL, rtol=RTOL)
    # Padding work is not counted: both ran the same useful evaluations.
    assert compiled.unet_evaluations == eager.unet_evaluations == 2 * 3 * 3 + 2 * 3
    assert fresh_model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    # A new scorer with another S, new images and captions reuses the compiled graph: no recompilation.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    other = config.replace(num_timesteps=5)
    again = Scorer(fresh_model, other, batch_size=4, acceleration=Acceleration(compile="default"))
    scores = again.score(shape_images[2:5], ["a yellow star"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    _within_gate(scores, Scorer(fresh_model, other, batch_size=4).score(shape_images[2:5], ["a yellow star"]))


def test_channels_last_alone_matches_eager_and_converts_back(fresh_model, shape_images):
    import torch

    from dsdkit.acceleration import Acceleration, set_channels_last
    from dsdkit.scorer import Scorer

    config = ScoringConfig.from_preset("discffusion", num_timesteps=2)
    set_channels_last(fresh_model, False)
    assert fresh_model.unet.conv_in.weight.is_contiguous()
    eager = Scorer(fresh_model, config, batch_size=3).score(shape_images[:2], ["a red circle", "a blue square"])
    fast = Scorer(fresh_model, config, batch_size=3, acceleration=Acceleration(channels_last=True))
    assert fresh_model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    _within_gate(fast.score(shape_images[:2], ["a red circle", "a blue square"]), eager)
    set_channels_last(fresh_model, False)
    assert fresh_model.unet.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("kind", ["kv-prompt", "lora"])
def test_compiled_scorer_with_an_adapter_matches_eager(fresh_model, shape_images, kind):
    from dsdkit.acceleration import Acceleration
    from dsdkit.scorer import Scorer
    from tests.conftest import perturbed_adapter

    config = ScoringConfig.from_preset("discffusion" if kind == "kv-prompt" else "paper", num_timesteps=2)
    adapter = perturbed_adapter(fresh_model, config, kind).eval()
    captions = ["a red circle", "a blue square"]
    eager = Scorer(fresh_model, config, batch_size=4, adapter=adapter).score(shape_images[:2], captions)
    compiled = Scorer(fresh_model, config, batch_size=4, adapter=adapter,
                      acceleration=Acceleration(compile="default")).score(shape_images[:2], captions)
    _within_gate(compiled, eager)


def test_bad_compile_requests_are_refused_in_one_line(tmp_path):
    from dsdkit.acceleration import Acceleration
    from dsdkit.errors import ConfigError
    from dsdkit.matching import match

    with pytest.raises(ConfigError, match="compile mode 'fastest' is not one of auto, default"):
        Acceleration(compile="fastest")
    with pytest.raises(ConfigError, match="--compile is for the PyTorch path"):
        match([np.zeros((8, 8, 3), np.uint8)], ["a cat"], bundle=tmp_path, compile="auto")
    assert Acceleration(compile="auto").mode_for("cuda") == "reduce-overhead"
    assert Acceleration(compile="auto").mode_for("cpu") == "default"
    assert Acceleration(compile="max-autotune").mode_for("cpu") == "max-autotune"
