"""The Stable Diffusion family beyond SD2-base (issue 34, SD1.x and SD2 768-v; SDXL is not supported yet): a
random-weight micro model of each (``dsdkit tiny-model --arch``) scores like the independent reference, per pair and
batch-invariant, its adapters fold exactly, it exports to a bundle that passes the export's parity gates, and the
torch-free runtime scores that bundle like PyTorch. The v-prediction denoising term is checked against a formulation
that shares nothing with dsdkit's conversion (diffusers' velocity target: ε − ε̂ = sqrt(ā) (v − v̂)).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from dsdkit.runtime.config import ScoringConfig
from typer.testing import CliRunner

from dsdkit.cli import app
from dsdkit.pytorch.scorer import Scorer
from tests.conftest import perturbed_adapter
from tests.pytorch.test_scorer_reference import reference_scores

ARCHES = ("sd1", "sd2-v")
CAPTIONS = ["a red circle", "two blue squares on a table"]


@pytest.fixture(scope="module", params=ARCHES)
def family(request, tmp_path_factory):
    """(arch, folder, loaded model) of a micro model of each architecture, written by the CLI."""
    from dsdkit.pytorch.models import load_model

    folder = tmp_path_factory.mktemp(request.param) / "model"
    done = CliRunner().invoke(app, ["tiny-model", str(folder), "--size", "micro", "--arch", request.param])
    assert done.exit_code == 0, done.output
    return request.param, folder, load_model(folder, device="cpu", dtype="fp32")


def test_each_folder_has_its_architecture_and_loads_without_a_warning(family, caplog):
    from dsdkit.pytorch.models import load_model

    arch, folder, model = family
    unet = json.loads((folder / "unet" / "config.json").read_text())
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    if arch == "sd1":
        assert unet["use_linear_projection"] is False and unet["attention_head_dim"] == 8
        assert text["hidden_act"] == "quick_gelu" and tokenizer["pad_token"] == "<|endoftext|>"
        assert scheduler["prediction_type"] == "epsilon" and model.prediction_type == "epsilon"
    else:
        assert unet["use_linear_projection"] is True and text["hidden_act"] == "gelu"
        assert scheduler["prediction_type"] == "v_prediction" and model.prediction_type == "v_prediction"
    with caplog.at_level(logging.WARNING, logger="dsdkit"):
        load_model(folder, device="cpu")
    assert not [r for r in caplog.records if "validated" in r.getMessage()], caplog.text


def test_end_token_padding_keeps_the_roles_by_position(family):
    """SD1 pads with the end token itself: a padding slot has EOS's id, and only its position says it is padding."""
    arch, _, model = family
    encoded = model.tokenizer.encode("a red circle")
    eos = model.tokenizer.eos_id
    first_eos = int(np.flatnonzero(encoded.ids == eos)[0])
    assert first_eos == 4  # BOS, three words, EOS
    padding = encoded.ids[first_eos + 1 :]
    assert (padding == (eos if arch == "sd1" else model.tokenizer.pad_id)).all()
    roles = np.asarray(encoded.roles)
    assert len(set(roles[first_eos + 1 :].tolist())) == 1 and roles[first_eos + 1] != roles[first_eos]
    # The runtime recovers the roles from the ids alone (a bundle's tokenizer output): the first EOS ends the words.
    from dsdkit.runtime.tokenizer import roles_from_ids

    np.testing.assert_array_equal(roles_from_ids(encoded.ids, eos), roles)


@pytest.mark.parametrize("preset", ["discffusion", "paper"])
def test_scores_equal_the_independent_reference(family, shape_images, preset):
    _, folder, model = family
    overrides = {"num_timesteps": 2} if preset == "discffusion" else {"noise_levels": (0.3, 0.7), "denoise_term": True}
    config = ScoringConfig.from_preset(preset, **overrides)
    scorer = Scorer(model, config, batch_size=3)
    images = shape_images[:2]
    ours = scorer.score_matrix(images, CAPTIONS).scores
    expected = reference_scores(
        folder, images, CAPTIONS, config, scorer.resolution, scorer.layer_names, scorer.timesteps
    )
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 1e-4  # the pairs differ, so agreement means something


def test_a_pairs_score_does_not_depend_on_its_batch(family, shape_images):
    _, _, model = family
    scorer = Scorer(model, ScoringConfig.from_preset("discffusion", num_timesteps=2), batch_size=4)
    images, captions = shape_images[:3], [*CAPTIONS, "a green triangle"]
    whole = scorer.score_matrix(images, captions).scores
    for i, j in [(0, 0), (2, 1), (1, 2)]:
        alone = Scorer(model, scorer.config, batch_size=1).score_pairs(images, captions, [(i, j)]).scores[0]
        np.testing.assert_allclose(alone, whole[i, j], rtol=1e-6, atol=1e-6)


def test_v_prediction_denoising_term_against_the_velocity_target(shape_images, tmp_path):
    """ε − ε̂ = sqrt(ā) (v − v̂) with v from diffusers' ``get_velocity``: independent of dsdkit's ε conversion."""
    from diffusers import DDPMScheduler

    from dsdkit.pytorch.models import load_model
    from dsdkit.pytorch.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path / "v", size="micro", arch="sd2-v")
    model = load_model(folder, device="cpu")
    scorer = Scorer(model, ScoringConfig.from_preset("discffusion", num_timesteps=2))
    out = scorer.score_matrix(shape_images[:1], CAPTIONS[:1])
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    z0 = scorer.encode_images(shape_images[:1])[0].latent[None]
    states = scorer.encode_texts(CAPTIONS[:1])[0].states[None]
    empty = scorer.empty_caption.states[None]
    for k, t in enumerate(scorer.timesteps):
        noise = scorer.noise[k][None]
        step = torch.tensor([t])
        x_t = scheduler.add_noise(z0, noise, step)
        velocity = scheduler.get_velocity(z0, noise, step)
        with torch.no_grad():
            v_cond, v_empty = (model.unet(x_t, step, encoder_hidden_states=s).sample for s in (states, empty))
        root = float(scheduler.alphas_cumprod[t].sqrt())
        expected = root * float((velocity - v_empty).norm() - (velocity - v_cond).norm())
        assert out.denoise_steps[0, 0, k] == pytest.approx(expected, abs=1e-4)


def test_adapters_fold_export_and_the_runtime_scores_the_bundle(family, shape_images, tmp_path):
    """Both adapter kinds, trained-looking: the exported bundle (adapters folded into the graphs, the export's own
    parity gates passed) scores fresh pairs on ONNX Runtime like the PyTorch scorer with the adapter."""
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle
    from dsdkit.runtime.matcher import Matcher

    from dsdkit.pytorch.adapters import save_adapter

    arch, folder, model = family
    scoring = ScoringConfig.from_preset("discffusion", num_timesteps=2)
    images, captions = shape_images[1:3], ["a blue square", "a green triangle", "a yellow circle"]
    for kind in ("kv-prompt", "lora"):
        adapter = perturbed_adapter(model, scoring, kind, scale=0.15)
        path = save_adapter(adapter, tmp_path / f"{kind}.safetensors", model.identity(), scoring)
        expected = Scorer(model, scoring, adapter=adapter).score_matrix(images, captions).scores
        plain = Scorer(model, scoring).score_matrix(images, captions).scores
        assert np.abs(expected - plain).max() > 1e-3, f"the {kind} adapter changes nothing on {arch}"
        config = ExportConfig(exporter="torchscript", parity=ParitySettings(images=2, captions=2, timesteps=1))
        manifest = export_bundle(folder, tmp_path / f"{kind}.bundle", adapters=path, config=config)
        assert manifest["model"]["prediction_type"] == model.prediction_type
        with Matcher.from_bundle(tmp_path / f"{kind}.bundle") as matcher:
            ours = matcher.score_matrix(images, captions).scores
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_every_command_runs_on_the_architecture(family, tmp_path):
    """match (PyTorch and bundle), eval, explain and two training steps, as a user types them."""
    arch, folder, _ = family
    runner = CliRunner()
    data = tmp_path / "task"
    assert runner.invoke(app, ["tiny-data", str(data), "--train", "8", "--test", "4"]).exit_code == 0
    images = sorted((data / "images").glob("*.png"))[:2]
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\n")
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    common = ["--timesteps", "2", "--threads", "1"]
    runs = {
        "match": [
            "match",
            str(listing),
            str(captions),
            "--model",
            str(folder),
            *common,
            "-o",
            str(tmp_path / "m.json"),
        ],
        "eval": ["eval", str(data / "data.jsonl"), "--model", str(folder), *common, "--max-examples", "4"],
        "explain": ["explain", str(images[0]), "a red circle", "--model", str(folder), *common, "--out"],
        "train": ["train", str(data / "data.jsonl"), "--model", str(folder), "--output", str(tmp_path / "run")]
        + [*common, "--max-steps", "2", "--batch-size", "2", "--max-eval", "2"],
    }
    runs["explain"].append(str(tmp_path / "heat.png"))
    for name, args in runs.items():
        done = runner.invoke(app, args)
        assert done.exit_code == 0, f"{arch} {name}: {done.output}"
    assert (tmp_path / "heat.png").is_file() and (tmp_path / "run" / "adapter.safetensors").is_file()
    scores = json.loads((tmp_path / "m.json").read_text())
    assert np.isfinite(np.array(scores["scores"], dtype=float)).all()
