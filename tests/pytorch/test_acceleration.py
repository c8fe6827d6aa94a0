"""`torch.compile` and channels-last for the PyTorch scorer: same scores as eager within the export's parity gate,
one compiled graph shared by every scorer that can use it, clear errors for what cannot work."""

from __future__ import annotations

import numpy as np
import pytest
from dsdkit.runtime.config import ScoringConfig

# The fp32 gate of `dsdkit export`'s parity check: absolute + relative to |eager score|.
ATOL, RTOL = 1e-5, 1e-4


def _within_gate(got, expected) -> None:
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)  # None (not scored) -> NaN
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isfinite(expected).any()
    excess = np.abs(got - expected) - (ATOL + RTOL * np.abs(expected))
    assert np.nanmax(excess) <= 0, f"max abs diff {np.nanmax(np.abs(got - expected)):.3g}"


@pytest.fixture(scope="module")
def fresh_model(micro_model_dir):
    """A model of its own: compiling converts its UNet to channels-last and caches graphs on it. The micro model has
    half the tiny model's layers, so compiling it costs half as much (CI compiles cold)."""
    from dsdkit.pytorch.models import load_model

    return load_model(micro_model_dir, device="cpu", dtype="fp32")


def test_compiled_scorer_matches_eager_and_compiles_once(fresh_model, shape_images):
    import torch

    from dsdkit.pytorch.acceleration import Acceleration
    from dsdkit.pytorch.scorer import Scorer

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

    from dsdkit.pytorch.acceleration import Acceleration, set_channels_last
    from dsdkit.pytorch.scorer import Scorer

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
    from dsdkit.pytorch.acceleration import Acceleration
    from dsdkit.pytorch.scorer import Scorer
    from tests.conftest import perturbed_adapter

    config = ScoringConfig.from_preset("discffusion" if kind == "kv-prompt" else "paper", num_timesteps=2)
    adapter = perturbed_adapter(fresh_model, config, kind).eval()
    captions = ["a red circle", "a blue square"]
    eager = Scorer(fresh_model, config, batch_size=4, adapter=adapter).score(shape_images[:2], captions)
    compiled = Scorer(
        fresh_model, config, batch_size=4, adapter=adapter, acceleration=Acceleration(compile="default")
    ).score(shape_images[:2], captions)
    _within_gate(compiled, eager)


def test_bad_compile_requests_are_refused_in_one_line(tmp_path):
    from dsdkit.runtime.errors import ConfigError

    from dsdkit.jobs.match import match
    from dsdkit.pytorch.acceleration import Acceleration

    with pytest.raises(ConfigError, match="compile mode 'fastest' is not one of auto, default"):
        Acceleration(compile="fastest")
    with pytest.raises(ConfigError, match="`compile` is for the PyTorch path"):  # a field; the CLI says --compile
        match([np.zeros((8, 8, 3), np.uint8)], ["a cat"], bundle=tmp_path, compile="auto")
    assert Acceleration(compile="auto").mode_for("cuda") == "reduce-overhead"
    assert Acceleration(compile="auto").mode_for("cpu") == "default"
    assert Acceleration(compile="max-autotune").mode_for("cpu") == "max-autotune"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mode", [("fp16", "reduce-overhead"), ("bf16", "max-autotune-no-cudagraphs")])
def test_compiled_scorer_on_cuda_matches_eager(tiny_model_dir, shape_images, dtype, mode):
    """CUDA graphs (reduce-overhead) and inductor's GPU kernels in half precision, against the eager scorer in the
    same precision, under the bench's gate for that precision."""
    from dsdkit.jobs.bench import ACCELERATION_TOLERANCE
    from dsdkit.pytorch.acceleration import Acceleration
    from dsdkit.pytorch.models import load_model
    from dsdkit.pytorch.scorer import Scorer

    model = load_model(tiny_model_dir, device="cuda", dtype=dtype)
    config = ScoringConfig.from_preset("discffusion", num_timesteps=3, uncond_in_attention=True)
    images, captions = shape_images[:3], ["a red circle", "a blue square"]
    eager = Scorer(model, config, batch_size=4).score(images, captions)
    compiled = Scorer(model, config, batch_size=4, acceleration=Acceleration(compile=mode))
    first = compiled.score(images, captions)
    again = compiled.score(images[::-1], captions)  # CUDA-graph replays must not leak earlier batches' outputs
    atol, rtol = ACCELERATION_TOLERANCE[dtype]
    for got, expected in ((first, eager), (again[::-1], eager)):
        assert (np.abs(got - expected) - (atol + rtol * np.abs(expected))).max() <= 0


def test_match_and_eval_cli_compile(micro_model_dir, shape_images, tmp_path):
    """`--compile` reaches the scorer from the command line and changes no score beyond the gate."""
    import json

    from typer.testing import CliRunner

    from dsdkit.cli import app

    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(shape_images[:3]):
        image.save(images / f"{i}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\n", encoding="utf-8")
    runner, matrices = CliRunner(), {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "default"])):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(
            app,
            [
                "match",
                str(images),
                str(captions),
                "--model",
                str(micro_model_dir),
                "--timesteps",
                "2",
                "--batch-size",
                "4",
                "-o",
                str(out),
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        document = json.loads(out.read_text())
        assert document["meta"]["compile"] == (extra[1] if extra else None)
        matrices[name] = np.array(document["scores"])
    _within_gate(matrices["compiled"], matrices["eager"])

    data = tmp_path / "data"
    assert runner.invoke(app, ["tiny-data", str(data), "--train", "2", "--test", "3"]).exit_code == 0
    reports = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "default"])):
        out = tmp_path / f"eval-{name}.json"
        result = runner.invoke(
            app,
            [
                "eval",
                str(data / "data.jsonl"),
                "--model",
                str(micro_model_dir),
                "--split",
                "test",
                "--timesteps",
                "2",
                "--batch-size",
                "4",
                "-o",
                str(out),
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(out.read_text())
        assert reports[name]["meta"]["compile"] == (extra[1] if extra else None)
    for eager, compiled in zip(reports["eager"]["examples"], reports["compiled"]["examples"], strict=True):
        _within_gate(compiled["scores"], eager["scores"])


def test_compiled_forwards_are_bounded_and_released(micro_model_dir):
    """Entries hold compiled code and their adapter: at most MAX_CACHED_FORWARDS per model, least recently used out.
    (Building an entry compiles nothing yet: torch.compile compiles on the first call.)"""
    from dsdkit.pytorch.acceleration import MAX_CACHED_FORWARDS, compiled_forward, release_compiled
    from dsdkit.pytorch.forward import ScoringForward
    from dsdkit.pytorch.models import load_model

    model = load_model(micro_model_dir, device="cpu", dtype="fp32")
    base = ScoringConfig.from_preset("discffusion")
    forwards = [ScoringForward(model, base.replace(lse_lambda=float(v))) for v in range(1, MAX_CACHED_FORWARDS + 2)]
    entries = [compiled_forward(forward, "default") for forward in forwards]
    # Another forward object with the same pooling definition shares the compiled entry.
    assert compiled_forward(ScoringForward(model, forwards[-1].config), "default") is entries[-1]
    cached = list(model._compiled_forwards.values())
    assert len(cached) == MAX_CACHED_FORWARDS and entries[0] not in cached and entries[1] in cached
    assert compiled_forward(forwards[0], "default") is not entries[0]  # rebuilt
    release_compiled(model)
    assert not getattr(model, "_compiled_forwards", None)


def test_a_compiler_failure_is_one_line(micro_model_dir, monkeypatch):
    import torch
    from dsdkit.runtime.errors import CompileError

    from dsdkit.pytorch.acceleration import Acceleration
    from dsdkit.pytorch.models import load_model
    from dsdkit.pytorch.scorer import Scorer

    def broken(*args, **kwargs):
        raise RuntimeError("Windows not yet supported for torch.compile\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    model = load_model(micro_model_dir, device="cpu", dtype="fp32")
    with pytest.raises(CompileError) as caught:
        Scorer(model, ScoringConfig.from_preset("discffusion"), acceleration=Acceleration(compile="default"))
    assert str(caught.value) == (
        "torch.compile failed (RuntimeError: Windows not yet supported for torch.compile); run without `compile`"
    )
    assert caught.value.exit_code == 9  # its own documented code, not the missing-weights one (ModelError, 4)
