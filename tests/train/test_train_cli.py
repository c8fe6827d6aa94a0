"""`dsdkit tiny-data`, `dsdkit train`, `dsdkit eval` and `dsdkit adapters` end to end, as the README shows them."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dsdkit.cli import app


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def test_tiny_data_train_eval_end_to_end(runner, tiny_model_dir, tmp_path):
    data = tmp_path / "colours"
    made = runner.invoke(app, ["tiny-data", str(data), "--train", "8", "--test", "6"])
    assert made.exit_code == 0, made.output
    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "train",
            str(data / "data.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(run),
            "--max-steps",
            "4",
            "--batch-size",
            "2",
            "--lr",
            "5e-3",
            "--set",
            "timesteps=noise-levels",
            "--set",
            "noise_levels=0.1,0.2",
            "--no-denoise",
            "--checkpoint-every",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert "zero-shot: top1" in trained.stdout and "trained:   top1" in trained.stdout
    adapter = run / "adapter.safetensors"
    assert adapter.is_file() and (run / "latest.json").is_file() and (run / "train_config.json").is_file()
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["max_steps"] == 4 and saved["scoring"] == {
        "denoise_term": False,
        "timesteps": "noise-levels",
        "noise_levels": [0.1, 0.2],
    }

    info = runner.invoke(app, ["adapters", "info", str(adapter)])
    assert info.exit_code == 0 and json.loads(info.stdout)["kind"] == "kv-prompt"

    metrics_path = tmp_path / "metrics.json"
    evaluated = runner.invoke(
        app,
        [
            "eval",
            str(data / "data.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--adapters",
            str(adapter),
            "--split",
            "test",
            "-o",
            str(metrics_path),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(metrics_path.read_text())
    assert report["split"] == "test" and report["metrics"]["examples"] == 6 and len(report["examples"]) == 6
    assert report["meta"]["scoring"]["timesteps"] == "noise-levels"  # the adapter's own scoring config
    assert "top1" in evaluated.stdout

    zero_shot = runner.invoke(
        app,
        [
            "eval",
            str(data / "data.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--split",
            "test",
            "--timesteps",
            "1",
            "--max-examples",
            "2",
        ],
    )
    assert zero_shot.exit_code == 0, zero_shot.output

    again = runner.invoke(
        app, ["train", str(data / "data.jsonl"), "--model", str(tiny_model_dir), "--output", str(run)]
    )
    assert again.exit_code == 2 and "--resume" in again.stderr


def test_import_discffusion_command(runner, tiny_model, tiny_model_dir, tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {}
    for processor in tiny_model.unet.attn_processors:
        module = tiny_model.unet.get_submodule(processor.removesuffix(".processor"))
        for name, layer in (
            ("to_q", module.to_q),
            ("to_k", module.to_k),
            ("to_v", module.to_v),
            ("to_out", module.to_out[0]),
        ):
            state[f"{processor}.{name}_lora.down.weight"] = torch.randn(4, layer.in_features, generator=generator)
            state[f"{processor}.{name}_lora.up.weight"] = torch.zeros(layer.out_features, 4)
    source = tmp_path / "pytorch_model.bin"
    torch.save(state, source)
    destination = tmp_path / "discffusion.safetensors"
    result = runner.invoke(
        app, ["adapters", "import-discffusion", str(source), str(destination), "--model", str(tiny_model_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "LoRA rank 4 on 32 attention modules" in result.stdout
    header = json.loads(runner.invoke(app, ["adapters", "info", str(destination)]).stdout)
    assert header["kind"] == "lora" and header["imported_from"] == "pytorch_model.bin"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    refused = runner.invoke(
        app,
        ["adapters", "import-discffusion", str(bad), str(tmp_path / "x.safetensors"), "--model", str(tiny_model_dir)],
    )
    assert refused.exit_code == 4 and "not a readable PyTorch checkpoint" in refused.stderr
