"""Heat maps: one panel per real token, from the same attention passes the score pools."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner


def test_explanation_uses_the_scores_attention(tiny_model, shape_images):
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.explain import explain
    from dsdkit.pytorch.scorer import Scorer

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
    from dsdkit.pytorch.explain import Explanation, layout_heat_maps

    image = tmp_path / "in.png"
    shape_images[1].save(image)  # 96 x 80
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
    assert sheet.text.get("caption") == "a blue square on a table"
    score = float(sheet.text["score"])
    assert f"score {score:.4f}" in result.output
    # The geometry of a sheet with the same tokens, image size, caption, score, timesteps and layers.
    same = Explanation(
        tokens=["a", "blue", "square", "on", "a", "table"],
        maps=np.zeros((6, 8, 8), np.float32),
        layer_scores=np.zeros((2, int(re.search(r"(\d+) layers", result.output).group(1)))),
        timesteps=[1, 2],
        pixels=np.zeros((3, 8, 8), np.float32),
        score=score,
        caption="a blue square on a table",
        image=np.zeros((80, 96, 3), np.uint8),
    )
    layout = layout_heat_maps(same)
    assert sheet.size == layout.size and layout.panel_size == (256, round(256 * 80 / 96))
    pixels = np.asarray(sheet.convert("RGB"))
    # The two empty cells of the last row stay white; the six panels are not.
    right_of_last = layout.panels[5][2] + 1
    assert (pixels[layout.labels[4][1] : layout.panels[5][3], right_of_last : layout.size[0]] == 255).all()
    for left, top, right, bottom in layout.panels:
        assert pixels[top:bottom, left:right].std() > 5


def _explanation(image, maps, caption="a red square", score=1.5):
    from dsdkit.pytorch.explain import Explanation

    return Explanation(
        tokens=[f"t{i}" for i in range(len(maps))],
        maps=np.asarray(maps, np.float32),
        layer_scores=np.zeros((1, 3)),
        timesteps=[500],
        pixels=np.zeros((3, 32, 32), np.float32),
        score=score,
        caption=caption,
        image=image,
    )


def test_explanation_score_is_the_scorers_score_and_progress_counts_passes(tiny_model, shape_images):
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.explain import explain
    from dsdkit.pytorch.scorer import Scorer

    # The discffusion preset has the denoising term: the score needs the unconditional passes too.
    config = ScoringConfig.from_preset("discffusion", num_timesteps=2)
    assert config.needs_unconditional_pass
    caption = "a blue square"
    calls = []

    def progress(total, done):
        calls.append(("total", total, done))
        return calls.append

    explanation = explain(Scorer(tiny_model, config, batch_size=1), shape_images[1], caption, progress=progress)
    expected = Scorer(tiny_model, config, batch_size=1).score([shape_images[1]], [caption])[0, 0]
    assert explanation.score == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # One conditional and one unconditional UNet pass per timestep, each reported as it finishes.
    assert calls == [("total", 4, 0), 1, 1, 1, 1]


def test_non_square_images_keep_their_aspect_ratio(tiny_model, image_factory, tmp_path):
    from dsdkit.runtime.config import ScoringConfig
    from PIL import Image

    from dsdkit.pytorch.explain import PANEL, explain, layout_heat_maps, maps_on_image, render_heat_maps
    from dsdkit.pytorch.scorer import Scorer

    wide = image_factory("red", "circle", size=(120, 60))
    squashed = explain(Scorer(tiny_model, ScoringConfig(num_timesteps=1)), wide, "a red circle")
    assert squashed.image.shape == (60, 120, 3) and squashed.region == (0.0, 0.0, 1.0, 1.0)
    layout = layout_heat_maps(squashed)
    assert layout.panel_size == (PANEL, PANEL // 2)
    out = render_heat_maps(squashed, tmp_path / "wide.png")
    assert Image.open(out).size == layout.size
    pixels = np.asarray(Image.open(out).convert("RGB"))
    left, top, right, bottom = layout.panels[0]
    assert (right - left, bottom - top) == (256, 128)
    assert pixels[top:bottom, left:right].std() > 5 and (pixels[bottom + 1 : bottom + 4, left:right] == 255).all()
    # Squashed: the map covers the whole image.
    assert np.isfinite(maps_on_image(squashed, 256, 128)).all()

    # Center-cropped, the model saw the middle square only: the map lies over it, the sides stay uncoloured.
    cropped = explain(Scorer(tiny_model, ScoringConfig(num_timesteps=1, resize="center-crop")), wide, "a red circle")
    assert cropped.region == (0.25, 0.0, 0.75, 1.0)
    placed = maps_on_image(cropped, 256, 128)
    assert np.isnan(placed[:, :, :64]).all() and np.isnan(placed[:, :, 192:]).all()
    assert np.isfinite(placed[:, :, 64:192]).all()
    out = render_heat_maps(cropped, tmp_path / "cropped.png")
    panel = np.asarray(Image.open(out).convert("RGB")).astype(int)[top:bottom, left:right]
    assert (panel[:, :60, 0] == panel[:, :60, 2]).all()  # grey: no colour where the model did not look


def test_sheet_has_a_title_band_and_a_labelled_colour_bar(tmp_path):
    from PIL import Image

    from dsdkit.pytorch.explain import MAX_TITLE_LINES, layout_heat_maps, render_heat_maps

    image = np.full((64, 64, 3), 200, np.uint8)
    maps = np.linspace(0.02, 0.3, 2 * 8 * 8).reshape(2, 8, 8)
    long_caption = "a very long caption about a red square " * 12
    explanation = _explanation(image, maps, caption=long_caption, score=-1.234567)
    layout = layout_heat_maps(explanation)
    # The caption, wrapped and ellipsised, then the score.
    assert len(layout.title_lines) == MAX_TITLE_LINES + 1
    assert layout.title_lines[0].startswith('"a very long caption') and layout.title_lines[-2].endswith("...")
    assert layout.title_lines[-1].startswith("score -1.2346")
    # The colour bar's ends are labelled with the values of the shared scale, in one precision.
    assert layout.scale == pytest.approx((0.02, 0.3)) and layout.ends == ("0.020", "0.300")
    sheet = np.asarray(Image.open(render_heat_maps(explanation, tmp_path / "sheet.png")).convert("RGB")).astype(int)
    left, top, right, bottom = layout.title
    assert (sheet[top:bottom, left:right] < 100).any()  # text in the title band
    assert layout.title[3] <= min(box[1] for box in layout.labels)  # above the panels
    left, top, right, bottom = layout.colour_bar
    assert top >= max(box[3] for box in layout.panels)  # below the panels
    bar = sheet[top + 2 : bottom - 2, left + 1 : right - 1]
    low, high = bar[:, 0].mean(0), bar[:, -1].mean(0)
    assert np.ptp(low) < 4  # the bottom of the scale: the grey itself
    assert high[0] > high[2] + 100 and high[1] > high[2] + 100  # the top: yellow
    assert (np.diff(bar[:, :, 2].mean(0)) < 2).mean() > 0.9  # blue falls from grey to yellow, mostly
    # Per-token scales label the ends as each token's own range.
    assert layout_heat_maps(explanation, scale="token").ends == ("token min", "token max")


def test_overlay_is_colour_over_a_grey_copy_of_the_image(tmp_path):
    """A saturated red image: where a token has no attention the panel shows grey, not red; where it has, colour."""
    from PIL import Image

    from dsdkit.pytorch.explain import layout_heat_maps, render_heat_maps

    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    heat = np.zeros((1, 8, 8))
    heat[0, :, 4:] = 0.25  # attention on the right half only
    explanation = _explanation(red, heat)
    layout = layout_heat_maps(explanation)
    sheet = np.asarray(Image.open(render_heat_maps(explanation, tmp_path / "red.png")).convert("RGB")).astype(int)
    left, top, right, bottom = layout.panels[0]
    panel = sheet[top:bottom, left:right]
    cold, hot = panel[:, :100], panel[:, 156:]
    assert np.abs(cold - cold[..., :1]).max() <= 1  # R = G = B: grey
    assert 60 < cold[..., 0].mean() < 140  # the red's luminance, in mid tones
    assert np.abs(hot[..., 1] - hot[..., 2]).mean() > 50  # coloured (yellow: high green, low blue)


# -- issue 31 item 7: labels in one precision, the objects' colours beside the maps ----------------------------------


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (0.012, 0.0613, ("0.0120", "0.0613")),  # the sheet: 0.012 vs 0.0613 before
        (0.02, 0.3, ("0.020", "0.300")),
        (0.000123, 0.5, ("0.000", "0.500")),
        (1.5, 12.25, ("1.5", "12.2")),
        (0.0, 0.0, ("0", "0")),
    ],
)
def test_colour_bar_ends_are_labelled_in_one_precision(low, high, expected):
    from dsdkit.pytorch.explain import layout_heat_maps, scale_labels

    assert scale_labels(low, high) == expected
    left, right = expected
    assert len(left.partition(".")[2]) == len(right.partition(".")[2])  # the same number of decimals
    maps = np.array([np.full((8, 8), low), np.full((8, 8), high)], np.float32)
    explanation = _explanation(np.full((32, 32, 3), 200, np.uint8), maps)
    shown = scale_labels(float(maps.min()), float(maps.max()))
    assert layout_heat_maps(explanation).ends == shown


def test_the_image_in_colour_is_a_panel_beside_the_maps(tmp_path):
    """A red and blue image: the maps' panels are grey underneath, but the first panel shows the objects' colours."""
    from PIL import Image

    from dsdkit.pytorch.explain import layout_heat_maps, render_heat_maps

    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32, 0] = 220  # red left half
    image[:, 32:, 2] = 220  # blue right half
    explanation = _explanation(image, np.zeros((2, 8, 8)))
    layout = layout_heat_maps(explanation)
    assert len(layout.panels) == 2 and layout.image[1] == layout.panels[0][1] and layout.image[0] < layout.panels[0][0]
    sheet = np.asarray(Image.open(render_heat_maps(explanation, tmp_path / "sheet.png")).convert("RGB")).astype(int)
    left, top, right, bottom = layout.image
    shown = sheet[top:bottom, left:right]
    width = right - left
    assert shown[:, : width // 2 - 8, 0].mean() > 180 and shown[:, : width // 2 - 8, 2].mean() < 40  # red
    assert shown[:, width // 2 + 8 :, 2].mean() > 180 and shown[:, width // 2 + 8 :, 0].mean() < 40  # blue
    left, top, right, bottom = layout.panels[0]
    panel = sheet[top:bottom, left:right]
    assert np.abs(panel - panel[..., :1]).max() <= 1  # no attention anywhere: the grey base alone
