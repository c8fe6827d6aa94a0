"""The trainer: it learns, it resumes bit-exactly, it refuses unsafe resumes, it stops cleanly on NaN."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dsdkit.runtime.errors import ConfigError, TrainingError
from dsdkit.train import TrainConfig, train
from dsdkit.train.losses import CandidateLoss
from safetensors.torch import load_file

from dsdkit.world import write_colour_shapes

# Scoring used by the learning tests: low noise levels keep the image visible to the random-weight UNet; the
# attention-only score keeps each step to one conditional pass per candidate.
EASY_SCORING = {"timesteps": "noise-levels", "noise_levels": [0.1, 0.2, 0.3], "denoise_term": False}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_colour_shapes(tmp_path_factory.mktemp("colours"), train=256, test=100, seed=0)


@pytest.fixture(scope="module")
def small_colours(tmp_path_factory):
    return write_colour_shapes(tmp_path_factory.mktemp("small"), train=6, test=4, seed=1)


LEARNING = {
    "kv-prompt": {"lr": 5e-3, "epochs": 1},
    "lora": {"lr": 2e-3, "epochs": 3},
}


@pytest.mark.parametrize("kind", ["kv-prompt", "lora"])
def test_adapters_learn_what_the_zero_shot_model_cannot(colours, tiny_model, tmp_path, kind):
    config = TrainConfig(
        data=str(colours),
        output=str(tmp_path / kind),
        adapter=kind,
        scoring=EASY_SCORING,
        batch_size=2,
        checkpoint_every=1000,
        device="cpu",
        **LEARNING[kind],
    )
    result = train(config, model=tiny_model)
    zero_shot, trained = result.zero_shot_metrics, result.final_metrics
    print(
        f"{kind}: zero-shot top-1 {zero_shot['top1']:.2f} -> trained {trained['top1']:.2f} after {result.steps} steps"
    )
    assert zero_shot["examples"] == trained["examples"] == 100
    assert zero_shot["top1"] <= 0.25 + 0.10  # chance is 1 in 4
    assert trained["top1"] >= 0.90


def run(small_colours, tiny_model, output, callbacks=None, **overrides):
    values = dict(
        data=str(small_colours),
        output=str(output),
        scoring=EASY_SCORING,
        batch_size=2,
        epochs=2,
        checkpoint_every=2,
        lr=1e-2,
        device="cpu",
        seed=3,
        adapter="kv-prompt",
    )
    values.update(overrides)
    return train(TrainConfig(**values), callbacks=callbacks, model=tiny_model)


class Killed(Exception):
    pass


def kill_at(step_to_die):
    def callback(trainer, step, loss, accuracy):
        if step == step_to_die:
            raise Killed(f"simulated crash after step {step}")

    return callback


@pytest.mark.parametrize("kind", ["kv-prompt", "lora"])
@pytest.mark.parametrize("kill_step", [3, 5])
def test_resume_after_a_crash_is_bit_identical(small_colours, tiny_model, tmp_path, kind, kill_step):
    reference = run(small_colours, tiny_model, tmp_path / "straight", adapter=kind)
    assert reference.steps == 6
    crashed = tmp_path / "crashed"
    with pytest.raises(Killed):
        run(small_colours, tiny_model, crashed, callbacks={"on_step_end": [kill_at(kill_step)]}, adapter=kind)
    assert not (crashed / "adapter.safetensors").exists()
    resumed = run(small_colours, tiny_model, crashed, resume=True, adapter=kind)
    assert resumed.steps == 6
    expected, actual = load_file(str(reference.adapter_path)), load_file(str(resumed.adapter_path))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert resumed.history == reference.history
    assert any(
        not torch.equal(v, torch.zeros_like(v)) for k, v in actual.items() if k.endswith(".B") or k.endswith(".up")
    )


def test_checkpoints_hold_the_trained_adapter(small_colours, tiny_model, tmp_path, image_factory):
    """Each checkpoint's adapter file is the trainer's in-memory adapter at that step: it loads onto the model with
    the same tensors and says which step it is; the final file scores exactly like the trained adapter."""
    from dsdkit.train.trainer import Trainer

    from dsdkit.pytorch.adapters import load_adapter, read_adapter_header
    from dsdkit.pytorch.scorer import Scorer

    config = TrainConfig(
        data=str(small_colours),
        output=str(tmp_path / "run"),
        scoring=EASY_SCORING,
        batch_size=2,
        epochs=2,
        checkpoint_every=2,
        lr=1e-2,
        device="cpu",
        seed=3,
        adapter="lora",
        max_steps=4,
        eval_every_epoch=False,
    )
    snapshots = {}

    def snapshot(trainer, path):
        tensors = {name: value.detach().clone() for name, value in trainer.adapter.flat_state().items()}
        snapshots[path] = (trainer.state.step, tensors)

    trainer = Trainer(config, model=tiny_model)
    trainer.add_callback("on_checkpoint", snapshot)
    trainer.setup()
    result = trainer.run()
    steps = sorted(step for step, _ in snapshots.values())
    assert steps[0] < steps[-1] == result.steps == 4
    for path, (step, tensors) in snapshots.items():
        file = path / "adapter.safetensors"
        assert read_adapter_header(file)["trained_steps"] == step
        loaded = load_adapter(file, tiny_model)[0].flat_state()
        assert loaded.keys() == tensors.keys()
        for name, value in tensors.items():
            assert torch.equal(loaded[name].float(), value.float()), (path.name, name)
    # Training moved the weights between checkpoints (LoRA starts at up = 0), so a stale file would not pass.
    by_step = {step: tensors for step, tensors in snapshots.values()}
    first, last = by_step[steps[0]], by_step[steps[-1]]
    assert any(not torch.equal(first[name], last[name]) for name in first)
    final, scoring = load_adapter(result.adapter_path, tiny_model)
    images = [image_factory("red", "circle"), image_factory("blue", "square", seed=1)]
    captions = ["a red circle", "a blue square"]
    trained = Scorer(tiny_model, trainer.scoring, adapter=trainer.adapter).score(images, captions)
    reloaded = Scorer(tiny_model, scoring, adapter=final).score(images, captions)
    np.testing.assert_array_equal(np.asarray(reloaded), np.asarray(trained))
    zero_shot = Scorer(tiny_model, trainer.scoring).score(images, captions)
    assert np.abs(np.asarray(trained) - np.asarray(zero_shot)).max() > 1e-6  # the adapter is in the scores


def test_unsafe_resumes_are_refused(small_colours, tiny_model, tmp_path):
    run(small_colours, tiny_model, tmp_path / "run", max_steps=2, eval_every_epoch=False)
    with pytest.raises(ConfigError, match="`resume`"):
        run(small_colours, tiny_model, tmp_path / "run", max_steps=2, eval_every_epoch=False)
    with pytest.raises(ConfigError, match="lr differ"):
        run(small_colours, tiny_model, tmp_path / "run", max_steps=4, lr=1e-3, resume=True, eval_every_epoch=False)


def test_nan_loss_stops_with_the_last_good_checkpoint(small_colours, tiny_model, tmp_path, monkeypatch):
    original = CandidateLoss.forward
    calls = {"n": 0}

    def poisoned(self, scores, positive=None, label=None):
        calls["n"] += 1
        value = original(self, scores, positive, label)
        return value * float("nan") if calls["n"] > 6 else value  # steps 1-3 fine (2 examples each), then NaN

    monkeypatch.setattr(CandidateLoss, "forward", poisoned)
    output = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"loss became nan at step 4; the last good checkpoint is .*step-00000003"):
        run(small_colours, tiny_model, output, eval_every_epoch=False)
    latest = json.loads((output / "latest.json").read_text())
    assert latest["step"] == 3  # the epoch-end checkpoint after step 3 is intact
    assert load_file(str(output / latest["path"] / "adapter.safetensors"))


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_other_losses_train(small_colours, tiny_model, tmp_path, loss):
    result = run(small_colours, tiny_model, tmp_path / loss, loss=loss, max_steps=3, eval_every_epoch=False)
    assert result.steps == 3 and result.adapter_path.is_file()


def test_labelled_pairs_need_bce(tmp_path, tiny_model, image_factory):
    image_factory("red", "circle").save(tmp_path / "a.png")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"image": "a.png", "caption": c, "label": y})
            for c, y in [("a red circle", 1), ("a blue square", 0)] * 3
        )
        + "\n"
    )
    with pytest.raises(ConfigError, match="bce as `loss`"):
        run(data, tiny_model, tmp_path / "ce", eval_every_epoch=False)
    result = run(data, tiny_model, tmp_path / "bce", loss="bce", max_steps=2, eval_fraction=0.0)
    assert result.steps == 2


def test_gradient_checkpointing_gives_the_same_update(small_colours, tiny_model_dir, tmp_path):
    from dsdkit.pytorch.models import load_model

    plain = run(
        small_colours,
        load_model(tiny_model_dir, device="cpu"),
        tmp_path / "plain",
        max_steps=2,
        eval_every_epoch=False,
    )
    checkpointed = run(
        small_colours,
        None,
        tmp_path / "ckpt",
        max_steps=2,
        eval_every_epoch=False,
        gradient_checkpointing=True,
        model=str(tiny_model_dir),
    )
    expected, actual = load_file(str(plain.adapter_path)), load_file(str(checkpointed.adapter_path))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_bf16_training_step_runs_on_cpu(small_colours, tiny_model_dir, tmp_path):
    result = run(
        small_colours,
        None,
        tmp_path / "bf16",
        max_steps=1,
        eval_every_epoch=False,
        precision="bf16",
        model=str(tiny_model_dir),
    )
    assert result.steps == 1
