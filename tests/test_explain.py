"""Heat maps: one panel per real token, from the same attention passes the score pools."""

from __future__ import annotations

import math

import numpy as np
from typer.testing import CliRunner


def test_explanation_uses_the_scores_attention(tiny_model, shape_images):
    from dsdkit.config import ScoringConfig
    from dsdkit.explain import explain
    from dsdkit.scorer import Scorer

    config = ScoringConfig.from_preset("discffusion", num_timesteps=3)
    scorer = Scorer(tiny_model, config, batch_size=4)
    caption = "a red circle next to a blue square!"
    explanation = explain(scorer, shape_images[0], caption)
    words = tiny_model.tokenizer.encode(caption).num_words
    assert len(explanation.tokens) == words == explanation.maps.shape[0]
    assert explanation.tokens[:3] == ["a", "red", "circle"] and explanation.tokens[-1] == "!"
    # The attention term of the score for this pair equals the mean of the explained passes' layer scores.
    scored = Scorer(tiny_model, config, batch_size=4).score_pairs([shape_images[0]], [caption], [(0, 0)])
    np.testing.assert_allclose(explanation.layer_scores.mean(0), scored.layer_scores[0], rtol=1e-6, atol=1e-6)
    assert explanation.layer_scores.shape == (3, len(scorer.layer_names))
    # Maps are probabilities over text positions: in [0, 1], and they differ between tokens.
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1
    assert np.abs(explanation.maps[1] - explanation.maps[2]).max() > 1e-6


def test_explain_cli_writes_one_panel_per_token(tiny_model_dir, shape_images, tmp_path):
    from PIL import Image

    from dsdkit.cli import app
    from dsdkit.explain import LABEL, PANEL

    image = tmp_path / "in.png"
    shape_images[1].save(image)
    out = tmp_path / "heat.png"
    result = CliRunner().invoke(
        app,
        [
            "explain",
            str(image),
            "a blue square on a table",
            "--model",
            str(tiny_model_dir),
            "--timesteps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "6 panels (a, blue, square, on, a, table)" in result.output
    sheet = Image.open(out)
    columns, rows = 4, math.ceil(6 / 4)
    assert sheet.size == (columns * PANEL, rows * (PANEL + LABEL))
    assert sheet.text.get("caption") == "a blue square on a table"
    # The two empty cells of the last row stay white; the six panels are not.
    pixels = np.asarray(sheet.convert("RGB"))
    assert (pixels[PANEL + LABEL + LABEL :, 2 * PANEL :] == 255).all()
    for index in range(6):
        x, y = (index % columns) * PANEL, (index // columns) * (PANEL + LABEL) + LABEL
        assert pixels[y : y + PANEL, x : x + PANEL].std() > 5
