"""The `dsdkit` command end to end on a tiny model: tiny-model, match, outputs, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dsdkit.cli import app


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def job(tmp_path_factory, image_factory):
    root = tmp_path_factory.mktemp("job")
    images = root / "images"
    images.mkdir()
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        image_factory(color, shape, seed=i).save(images / f"{i}_{color}_{shape}.png")
    captions = root / "captions.txt"
    captions.write_text("a red circle\na blue square!\n\na green triangle\na yellow star\n", encoding="utf-8")
    return root, images, captions


def test_tiny_model_then_match_end_to_end(runner, job, tmp_path):
    root, images, captions = job
    model = tmp_path / "tiny-sd2"
    made = runner.invoke(app, ["tiny-model", str(model), "--size", "micro"])
    assert made.exit_code == 0, made.output
    assert "scores are meaningless" in made.output
    outputs = {}
    for suffix in ("csv", "json", "jsonl"):
        out = tmp_path / f"scores.{suffix}"
        result = runner.invoke(
            app,
            [
                "match",
                str(images),
                str(captions),
                "--model",
                str(model),
                "--timesteps",
                "2",
                "--top-k",
                "2",
                "--batch-size",
                "5",
                "-o",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "best caption per image" in result.stdout and "scores are meaningless" in result.stdout
        outputs[suffix] = out
    rows = list(csv.reader(outputs["csv"].open(encoding="utf-8")))
    assert rows[0] == ["image", "a red circle", "a blue square!", "a green triangle", "a yellow star"]
    matrix = np.array([[float(v) for v in row[1:]] for row in rows[1:]])
    assert matrix.shape == (3, 4) and np.isfinite(matrix).all()
    document = json.loads(outputs["json"].read_text(encoding="utf-8"))
    np.testing.assert_array_equal(np.array(document["scores"]), matrix)
    assert document["meta"]["model"]["test_model_random_weights"] is True
    assert document["meta"]["scoring"]["num_timesteps"] == 2 and document["meta"]["timesteps"] == [489, 989]
    for record in document["top_k"]["per_image"]:
        assert record["top_k"][0]["index"] == int(np.argmax(matrix[record["index"]]))
    lines = [json.loads(line) for line in outputs["jsonl"].read_text(encoding="utf-8").splitlines()]
    np.testing.assert_array_equal(np.array([line["scores"] for line in lines if line["type"] == "image"]), matrix)


def test_match_knobs_reach_the_config(runner, job, tmp_path, tiny_model_dir):
    root, images, captions = job
    out = tmp_path / "paper.json"
    result = runner.invoke(
        app,
        [
            "match",
            str(images),
            str(captions),
            "--model",
            str(tiny_model_dir),
            "--preset",
            "paper",
            "--noise-levels",
            "0.5",
            "--lambda",
            "3",
            "--tokens",
            "words",
            "--normalize",
            "none",
            "--per-layer",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    layer_scores = np.array(document["layer_scores"])
    assert layer_scores.shape == (3, 4, 16)  # the paper preset scores all 16 cross-attention layers
    # Without the denoising term a score is the mean of its layers' attention terms.
    np.testing.assert_allclose(layer_scores.mean(-1), np.array(document["scores"]), atol=1e-9)
    scoring = document["meta"]["scoring"]
    assert scoring["preset"] == "paper" and scoring["noise_levels"] == [0.5] and scoring["lse_lambda"] == 3.0
    assert scoring["tokens"] == "words" and scoring["heads"] == "dynamic" and scoring["layers"] == "all"


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["match", "{images}", "{root}/missing.txt", "--model", "{model}"], 3, "missing.txt: no such file"),
        (["match", "{images}", "{captions}", "--model", "{root}/no-model"], 4, "no such folder"),
        (["match", "{images}", "{captions}", "--model", "{model}", "-o", "{root}/out.xlsx"], 2, "unknown format"),
        (["match", "{images}", "{captions}", "--model", "{model}", "--heads", "dynamic"], 2, "image-lse"),
        (["match", "{images}", "{captions}", "--model", "{model}", "--noise-levels", "a,b"], 2, "--noise-levels"),
    ],
)
def test_errors_are_one_line_with_documented_exit_codes(runner, job, tiny_model_dir, args, code, fragment):
    root, images, captions = job
    values = {"images": images, "captions": captions, "root": root, "model": tiny_model_dir}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(runner, job, tiny_model_dir):
    root, images, captions = job
    result = runner.invoke(
        app, ["--debug", "match", str(images), str(root / "missing.txt"), "--model", str(tiny_model_dir)]
    )
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "InputError"


def test_non_utf8_captions_name_the_line(runner, job, tiny_model_dir, tmp_path):
    root, images, _ = job
    captions = tmp_path / "latin1.txt"
    captions.write_bytes(b"a red circle\ncaf\xe9\n")
    result = runner.invoke(app, ["match", str(images), str(captions), "--model", str(tiny_model_dir)])
    assert result.exit_code == 3
    assert "latin1.txt line 2: not valid UTF-8" in result.stderr


def test_exit_codes_are_listed(runner):
    result = runner.invoke(app, ["exit-codes"])
    assert result.exit_code == 0 and "invalid options" in result.stdout and "bad input data" in result.stdout
    assert "   9  torch.compile failed; run without --compile" in result.stdout.splitlines()
