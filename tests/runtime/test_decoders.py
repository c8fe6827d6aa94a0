"""Whatever Pillow raises while opening, reading or converting one input file is that file's problem.

Every format Pillow can both write and read is written here and scored through a folder and an image list; decoders
are patched to raise each exception type Pillow's plugins are known to raise, at open, load, convert and pixel-access
time; damaged files come from hypothesis. A bad file is skipped with a one-line reason naming it and the exception
type, and the other images are scored. An exception raised in dsdkit's own code is not a skip: it surfaces.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from dsdkit.runtime import images as images_module
from dsdkit.runtime.errors import InputError
from dsdkit.runtime.images import load_image, preprocess_image
from dsdkit.runtime.inputs import image_suffixes, list_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import BlpImagePlugin, Image, ImageFile, ImageOps, PdfParser, PngImagePlugin

Image.init()

#: Formats Pillow registers both a writer and a reader for.
FORMATS = sorted(set(Image.SAVE) & set(Image.OPEN))
#: The modes tried, in order, until the format's writer takes one (MSP and XBM write "1" only, BLP "P").
MODES = ("RGB", "RGBA", "L", "P", "1", "F")
#: Stub plugins: Pillow identifies the format, but reading (and writing) needs a handler an application registers.
#: With none here, a file of theirs is only a header; it must be skipped like any unreadable file.
STUB_HEADERS = {
    "BUFR": b"BUFR" + bytes(60),
    "GRIB": b"GRIB\x00\x00\x00\x01" + bytes(60),
    "HDF5": b"\x89HDF\r\n\x1a\n" + bytes(60),
    "WMF": b"\xd7\xcd\xc6\x9a\x00\x00"
    + struct.pack("<hhhhH", 0, 0, 1440, 1440, 1440)
    + bytes(6)
    + b"\x01\x00\t\x00"
    + bytes(60),
}
CAPTIONS = ["a red circle", "a blue square"]


def _suffix(fmt: str) -> str:
    """The first suffix Pillow registers for ``fmt`` (SPIDER has none: only an image list can name its files)."""
    return next((s for s, f in sorted(Image.registered_extensions().items()) if f == fmt), f".{fmt.lower()}")


def _encoded(fmt: str) -> bytes | None:
    """A small image written as ``fmt`` in the first mode its writer takes, or None (no writer here: stubs)."""
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    for mode in MODES:
        buffer = io.BytesIO()
        try:
            base.convert(mode).save(buffer, format=fmt)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return buffer.getvalue()
    return None


def _pillow_error(path: Path) -> str | None:
    """What plain Pillow raises reading ``path`` (its type name), or None when it reads it."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - any failure is the expectation for dsdkit's message
        return type(exc).__name__
    return None


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """``{format: (path, Pillow's own error or None)}``: one file per format in one folder, and an image list."""
    folder = tmp_path_factory.mktemp("formats")
    made = {}
    for fmt in FORMATS:
        data = _encoded(fmt)
        if data is None:
            data = STUB_HEADERS[fmt]  # a format with no writer here is a stub: its header alone
        path = folder / f"{fmt.lower()}{_suffix(fmt)}"
        path.write_bytes(data)
        made[fmt] = (path, _pillow_error(path))
    listing = folder.parent / f"{folder.name}.txt"
    listing.write_text("".join(f"{folder.name}/{path.name}\n" for path, _ in made.values()))
    return folder, listing, made


def test_the_formats_cover_pillows_registry():
    # Guards the table above: a Pillow upgrade that adds a format without a writer needs its stub header here.
    assert {fmt for fmt in FORMATS if _encoded(fmt) is None} <= set(STUB_HEADERS)
    assert len(FORMATS) >= 20


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_listed_and_decoded_or_skipped_naming_the_error(formats, fmt):
    folder, listing, made = formats
    path, pillow_error = made[fmt]
    assert path in list_images(listing)
    stub = fmt in STUB_HEADERS
    # A folder is read by suffix: every suffix of a format Pillow decodes here; stubs without a handler are not.
    assert (path in list_images(folder)) == (path.suffix in image_suffixes() and not stub)
    if pillow_error is None:
        pixels = preprocess_image(path, 32)
        assert pixels.shape == (3, 32, 32) and np.isfinite(pixels).all()
        return
    with pytest.raises(InputError) as error:
        load_image(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    # A stub's header says 0x0 pixels: dsdkit's own check refuses it before Pillow is asked to decode.
    assert pillow_error in message or (stub and "no pixels" in message), message


# -- decoders that raise ---------------------------------------------------------------------------------------------

#: Each exception type Pillow is known to raise while reading a file, the name the skip reason must give, and where
#: it comes from (grep of PIL/*.py in Pillow 13; "implicit": raised by the code, not by a raise statement).
RAISED = [
    (lambda: OSError("decoder error -2"), "OSError"),  # ImageFile.load and every C decoder (79 raises)
    (lambda: SyntaxError("not a PNG file"), "SyntaxError"),  # every plugin's _open on a bad header (117)
    (lambda: ValueError("unsupported BMP compression"), "ValueError"),  # modes, sizes, compressions (216)
    (lambda: TypeError("unsupported image mode"), "TypeError"),  # Cur-, Jpeg-, TiffImagePlugin
    (lambda: EOFError("no more images"), "EOFError"),  # Gif/Fli/Tiff seek, Psd, ImageFile (15)
    (
        lambda: struct.error("unpack requires a buffer of 4 bytes"),
        "struct.error",
    ),  # _binary on short headers (implicit)
    (lambda: IndexError("list index out of range"), "IndexError"),  # PdfParser, ImageSequence, tables (implicit)
    (lambda: KeyError("RGBX"), "KeyError"),  # mode tables such as BmpImagePlugin's (implicit)
    (lambda: ZeroDivisionError("division by zero"), "ZeroDivisionError"),  # header fields as divisors (implicit)
    (lambda: NotImplementedError("Unimplemented DXGI format 98"), "NotImplementedError"),  # DdsImagePlugin (15)
    (lambda: BlpImagePlugin.BLPFormatError("unsupported BLP compression"), "BLPFormatError"),  # BlpImagePlugin
    (lambda: RuntimeError("encoder error -2 in tobytes"), "RuntimeError"),  # Image.tobytes, PngImagePlugin (9)
    (lambda: PdfParser.PdfFormatError("trailer not found"), "PdfFormatError"),  # PdfParser
    (lambda: AttributeError("no such attribute"), "AttributeError"),  # ImageSequence, PdfParser
    (lambda: OverflowError("size does not fit in an int"), "OverflowError"),  # C size arithmetic (implicit)
    (lambda: MemoryError(), "MemoryError"),  # C: failed allocations sized by the header (implicit)
    (lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "UnicodeDecodeError"),  # text chunks
    (lambda: zlib.error("Error -3 while decompressing data"), "zlib.error"),  # PNG text and profile chunks
    (lambda: Image.DecompressionBombError("too many pixels"), "DecompressionBombError"),  # Image.py
    (lambda: Exception("Not allowing setting of legacy api"), "Exception"),  # TiffImagePlugin's bare Exception
    (lambda: subprocess.CalledProcessError(1, "gs"), "subprocess.CalledProcessError"),  # EpsImagePlugin (Ghostscript)
    (lambda: ImportError("No module named 'defusedxml'"), "ImportError"),  # optional helpers
    (lambda: StopIteration("end of sequence"), "StopIteration"),  # ContainerIO, ImageSequence
]
#: Raised by a plugin's _open, these mean "not this format" to Pillow (ImageFile turns them into SyntaxError, and
#: Image.open tries the next plugin, then raises UnidentifiedImageError).
OPEN_IDENTIFIES = {"SyntaxError", "IndexError", "TypeError", "KeyError", "EOFError", "struct.error"}
TARGET = (17, 13)  # the size of the one file the patched decoder fails on; the others are decoded as usual


def _patch_stage(stage: str, make):
    """Patch the stage's Pillow call to raise ``make()`` for the target file only."""

    def failing(original):
        def call(self, *args, **kwargs):
            if stage == "open":
                original(self, *args, **kwargs)
                if self.size == TARGET:
                    raise make()
                return None
            if self.size == TARGET:
                raise make()
            return original(self, *args, **kwargs)

        return call

    where = {
        "open": (PngImagePlugin.PngImageFile, "_open"),
        "load": (ImageFile.ImageFile, "load"),
        "convert": (Image.Image, "convert"),
        "pixels": (Image.Image, "tobytes"),  # what np.asarray reads a 16-bit image through
    }[stage]
    return mock.patch.object(where[0], where[1], failing(getattr(*where)))


def _target_image(stage: str) -> Image.Image:
    """The target file's image: grayscale (converted to RGB: the convert stage), 16-bit for the pixels stage."""
    if stage == "pixels":
        return Image.fromarray(np.full(TARGET[::-1], 40000, dtype=np.uint16))
    return Image.new("L", TARGET, 128)


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """Images decoded next to the target: RGB, grayscale, palette with transparency, RGBA, 16-bit, EXIF-rotated."""
    folder = tmp_path_factory.mktemp("others")
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    rgb.save(folder / "rgb.png")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("P").save(folder / "palette.png", transparency=0)
    rgb.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((20, 24), 30000, dtype=np.uint16)).save(folder / "sixteen.png")
    exif = rgb.getexif()
    exif[0x0112] = 6
    rgb.save(folder / "rotated.jpg", exif=exif.tobytes())
    return sorted(folder.iterdir())


@pytest.mark.parametrize("stage", ["open", "load", "convert", "pixels"])
@pytest.mark.parametrize("make, expected", RAISED, ids=[name for _, name in RAISED])
def test_a_decoder_raising_skips_only_its_file(tmp_path, others, stage, make, expected):
    target = tmp_path / "target.png"
    _target_image(stage).save(target)
    with _patch_stage(stage, make):
        with pytest.raises(InputError) as error:
            preprocess_image(target, 32)
        for path in others:  # decoded as usual, the patch in place
            assert preprocess_image(path, 32).shape == (3, 32, 32)
    message = str(error.value)
    if stage == "open" and expected in OPEN_IDENTIFIES:
        expected = "UnidentifiedImageError"
    if stage == "pixels" and expected == "AttributeError":
        # numpy takes an AttributeError from __array_interface__ for "no such interface" and fails on its own.
        expected = "TypeError"
    assert message.startswith(f"{target}: ") and "\n" not in message
    assert f"({expected}" in message, message


def test_a_damaged_exif_block_is_ignored_and_noted(tmp_path):
    from dsdkit.runtime.decode_warnings import collecting

    path = tmp_path / "exif.png"
    Image.new("RGB", (8, 6), "red").save(path)
    with mock.patch.object(ImageOps, "exif_transpose", side_effect=struct.error("bad EXIF")), collecting() as notes:
        assert load_image(path).size == (8, 6)
    assert notes == ["EXIF orientation ignored: the EXIF block is damaged (struct.error)"]


# -- damaged files (hypothesis) --------------------------------------------------------------------------------------

#: Formats plain Pillow reads here, as small files to damage.
READABLE = [fmt for fmt in FORMATS if fmt not in STUB_HEADERS and fmt != "EPS"]
_SCRATCH = tempfile.TemporaryDirectory(prefix="dsdkit-damaged-")


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(READABLE),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    keep=st.one_of(st.none(), st.floats(0, 1)),
)
def test_damaged_files_are_decoded_or_skipped_never_crash(fmt, flips, keep):
    data = bytearray(_encoded(fmt))
    for where, value in flips:
        data[int(where * len(data))] = value
    if keep is not None:
        data = data[: int(keep * len(data))]
    path = Path(_SCRATCH.name) / f"damaged{_suffix(fmt)}"
    path.write_bytes(bytes(data))
    # A flipped header byte can claim a huge size: keep the decoded buffers small on a shared machine.
    with mock.patch.object(images_module, "MAX_IMAGE_PIXELS", 2_000_000):
        try:
            pixels = preprocess_image(path, 16)
        except InputError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        else:
            assert pixels.shape == (3, 16, 16) and np.isfinite(pixels).all()


@settings(derandomize=True, max_examples=30, deadline=None)
@given(data=st.binary(max_size=600), fmt=st.sampled_from(READABLE))
def test_random_bytes_after_a_format_signature_never_crash(data, fmt):
    header = _encoded(fmt)[:16]
    path = Path(_SCRATCH.name) / f"random{_suffix(fmt)}"
    path.write_bytes(header + data)
    with mock.patch.object(images_module, "MAX_IMAGE_PIXELS", 2_000_000):
        try:
            preprocess_image(path, 16)
        except InputError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)


# -- dsdkit's own code ---------------------------------------------------------------------------------------------


def test_an_exception_in_dsdkit_code_is_not_a_skip(tmp_path, monkeypatch):
    path = tmp_path / "gray.png"
    Image.new("L", (8, 6), 90).save(path)
    # The kinds of exception a decoder raises too: raised by dsdkit's own steps, they must not become skips.
    with mock.patch.object(images_module, "to_rgb", side_effect=KeyError("a dsdkit bug")), pytest.raises(KeyError):
        load_image(path)
    with mock.patch.object(Image.Image, "resize", side_effect=ValueError("a dsdkit bug")), pytest.raises(ValueError):
        preprocess_image(path, 32)
    assert preprocess_image(path, 32).shape == (3, 32, 32)  # and without the patches, the file is fine


def test_an_exception_in_dsdkit_code_is_an_internal_error_in_the_cli(tmp_path, micro_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from dsdkit.cli import app

    Image.new("L", (8, 6), 90).save(tmp_path / "gray.png")
    (tmp_path / "captions.txt").write_text("a grey square\n")
    monkeypatch.setattr(images_module, "to_rgb", mock.Mock(side_effect=KeyError("a dsdkit bug")))
    result = CliRunner().invoke(
        app,
        ["match", str(tmp_path), str(tmp_path / "captions.txt"), "--model", str(micro_model_dir), "--timesteps", "1"],
    )
    assert result.exit_code == 1, result.output
    assert "internal error: KeyError" in result.output and "skipped" not in result.output


# -- end to end: one match over a folder and one over an image list ------------------------------------------------


def test_match_over_a_folder_and_a_list_scores_every_readable_format(formats, others, micro_model_dir, tmp_path):
    """Every format, plus the other images with a decoder failing on one of them and a NotImplementedError from a
    DDS-like decoder on another: the bad files are skipped with name and type, every other file is scored."""
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.jobs.match import match

    folder, listing, made = formats
    job = tmp_path / "job"
    job.mkdir()
    for path, _ in made.values():
        (job / path.name).write_bytes(path.read_bytes())
    for path in others:
        (job / path.name).write_bytes(path.read_bytes())
    _target_image("load").save(job / "target.png")
    image_list = tmp_path / "images.txt"
    image_list.write_text("".join(f"job/{p.name}\n" for p in sorted(job.iterdir())))
    config = ScoringConfig(num_timesteps=1, denoise_term=False)
    expected_bad = {path.name: error for path, error in made.values() if error is not None}
    expected_bad["target.png"] = "NotImplementedError"
    with _patch_stage("load", lambda: NotImplementedError("unsupported texture format")):
        for source in (job, image_list):
            out = tmp_path / f"{Path(source).stem}.json"
            result = match(source, CAPTIONS, model=micro_model_dir, config=config, output=out, batch_size=8)
            listed = list_images(source)
            skipped = {Path(item["image"]).name: item["reason"] for item in result.meta["skipped"]["images"]}
            scored = {Path(name).name for name in result.images}
            assert scored | set(skipped) == {p.name for p in listed}
            assert np.isfinite(result.scores).all()
            for name, error in expected_bad.items():
                if (job / name) not in listed:
                    continue  # a stub format in a folder: not listed (see the parametrized test)
                assert name in skipped, (name, sorted(skipped))
                assert str(job / name) in skipped[name]
                assert error in skipped[name] or "no pixels" in skipped[name], skipped[name]
            assert set(skipped) <= set(expected_bad)
            report = json.loads((tmp_path / f"{Path(source).stem}.skipped.json").read_text())
            assert [item["reason"] for item in report["images"]] == [
                item["reason"] for item in result.meta["skipped"]["images"]
            ]
