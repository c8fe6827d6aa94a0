"""Image preprocessing: resize policies, modes, EXIF orientation, arrays, unreadable files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from dsdkit.runtime.errors import InputError
from dsdkit.runtime.images import load_image, preprocess_image
from PIL import Image


def test_squash_matches_plain_pil_bicubic():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    out = preprocess_image(image, 64)
    expected = np.asarray(image.resize((64, 64), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1


def test_center_crop_keeps_the_middle():
    array = np.zeros((64, 192, 3), dtype=np.uint8)
    array[:, 64:128] = 255  # white centre third
    out = preprocess_image(Image.fromarray(array), 64, "center-crop")
    np.testing.assert_allclose(out, 1.0)
    squashed = preprocess_image(Image.fromarray(array), 64, "squash")
    assert squashed.min() == -1.0


def test_alpha_is_composited_on_white_and_modes_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    np.testing.assert_allclose(preprocess_image(rgba, 64), 1.0)
    gray = Image.new("L", (8, 8), 0)
    np.testing.assert_allclose(preprocess_image(gray, 64), -1.0)
    palette = Image.new("P", (8, 8))
    assert preprocess_image(palette, 64).shape == (3, 64, 64)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    np.testing.assert_allclose(preprocess_image(sixteen, 64), 1.0)
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    np.testing.assert_allclose(preprocess_image(cmyk, 64), 1.0, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    loaded = load_image(path)
    assert loaded.size == (20, 40)  # turned upright: portrait
    top, bottom = np.asarray(loaded)[:5].mean(), np.asarray(loaded)[-5:].mean()
    assert top > 200 > 50 > bottom  # the white half is now on top


def test_arrays_are_accepted():
    rng = np.random.default_rng(1)
    uint8 = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        preprocess_image(uint8.astype(np.float32) / 255.0, 64), preprocess_image(uint8, 64), atol=1e-5
    )
    np.testing.assert_allclose(preprocess_image(uint8.transpose(2, 0, 1), 64), preprocess_image(uint8, 64))
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        preprocess_image(np.full((4, 4, 3), 2.0), 64)
    with pytest.raises(InputError, match="shape"):
        preprocess_image(np.zeros((6, 6, 5), dtype=np.uint8), 64)


def test_unreadable_files_are_one_line_input_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    for path in (empty, text, truncated, tmp_path / "missing.png", tmp_path):
        with pytest.raises(InputError) as info:
            load_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message


def test_lazily_opened_truncated_image_is_an_input_error(tmp_path):
    """A PIL image handed over unopened decodes on conversion; a truncated file must fail as an InputError then."""
    rng = np.random.default_rng(1)
    path = tmp_path / "cut.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    lazy = Image.open(path)  # header only: pixels not decoded yet
    with pytest.raises(InputError, match="cannot be decoded"):
        preprocess_image(lazy, 32)


def test_names_that_are_not_utf8_or_one_line_are_escaped(tmp_path):
    from dsdkit.runtime.images import describe

    surrogate = tmp_path / "caf\udce9.png"  # how Python names a Latin-1 file name on a UTF-8 system
    assert describe(surrogate).encode("utf-8") and "\\udce9" in describe(surrogate)
    assert "\n" not in describe(tmp_path / "two\nlines.png")
    with pytest.raises(InputError) as error:
        load_image(surrogate)
    str(error.value).encode("utf-8")  # printable and writable as UTF-8
