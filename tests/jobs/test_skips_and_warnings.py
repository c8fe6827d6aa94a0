"""How skips and decoder warnings reach the user: each skip printed once, a bounded number of lines for a folder of
hundreds of odd files, every warning raised while a file is decoded in that file's entry of the skipped report
(never a raw Python warning, never libtiff's own stderr line), the hook thread-safe, and no report when nothing was
skipped."""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile
from typer.testing import CliRunner

from dsdkit.cli import app

CAPTIONS = "a red circle\na blue square\n"


def _good(folder: Path, count: int = 2) -> list[Path]:
    """Small usable images (480 pixels each: under the lowered Pillow limit of the warnings test)."""
    paths = []
    for i in range(count):
        path = folder / f"good-{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _png(size=(24, 20), seed=0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    checksum = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", checksum)


def _invalid_apng() -> bytes:
    """A PNG whose animation chunk claims 0 frames: Pillow warns (UserWarning) and reads the still image."""
    png = _png()
    at = png.index(b"IDAT") - 4
    return png[:at] + _chunk(b"acTL", struct.pack(">II", 0, 0)) + png[at:]


def _damaged_lzw_tiff() -> bytes:
    """An LZW TIFF with random strip data: libtiff prints "Using code not yet in table" to stderr itself."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
        buffer, format="TIFF", compression="tiff_lzw"
    )
    data = bytearray(buffer.getvalue())
    with Image.open(io.BytesIO(bytes(data))) as image:
        start, length = image.tag_v2[273][0], image.tag_v2[279][0]
    data[start + 4 : start + length] = np.random.default_rng(1).bytes(length - 4)
    return bytes(data)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _match(folder: Path, model: Path, *extra: str):
    captions = folder.parent / "captions.txt"
    if not captions.exists():
        captions.write_text(CAPTIONS)
    args = ["match", str(folder), str(captions), "--model", str(model), "--timesteps", "1", "--no-denoise"]
    return CliRunner().invoke(app, [*args, "--batch-size", "8", *extra])


def test_hundreds_of_bad_files_print_a_bounded_number_of_lines(tmp_path, micro_model_dir):
    folder = tmp_path / "odd"
    folder.mkdir()
    _good(folder)
    png = _png()
    bad = []
    for i in range(100):
        for name, data in (
            (f"empty-{i:03d}.png", b""),  # refused by the header screen
            (f"notes-{i:03d}.jpg", b"my notes, not a picture\n"),  # refused by the header screen
            (f"cut-{i:03d}.png", png[: len(png) // 2]),  # passes the screen, fails while decoding
        ):
            (folder / name).write_bytes(data)
            bad.append(name)
    out = tmp_path / "scores.json"
    result = _match(folder, micro_model_dir, "-o", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) <= 40, f"{len(lines)} lines:\n" + "\n".join(lines)
    named = [name for name in bad if name in result.output]
    assert 1 <= len(named) <= 20 and all(result.output.count(name) == 1 for name in named)
    report = tmp_path / "scores.skipped.json"
    assert f"300 images and 0 caption lines skipped, 0 captions truncated: {report}" in result.stdout
    assert {Path(item["image"]).name for item in json.loads(report.read_text())["images"]} == set(bad)


def test_each_skip_is_printed_once(tmp_path, micro_model_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    _good(folder)
    (folder / "unreadable-notes.png").write_bytes(b"not a picture\n")  # skipped when screened
    png = _png(seed=5)
    (folder / "half-written.png").write_bytes(png[: len(png) // 2])  # skipped when decoded
    (tmp_path / "captions.txt").write_text("a red circle\n\na blue square\n")
    out = tmp_path / "scores.json"
    for extra in (["-o", str(out)], []):
        result = _match(folder, micro_model_dir, *extra)
        assert result.exit_code == 0, result.output
        for once in ("unreadable-notes.png", "half-written.png", "blank line"):
            assert result.output.count(once) == 1, (once, result.output)
        if extra:
            assert "(2 images and 1 caption lines skipped" in result.stdout
        else:  # no report to point to: the count comes last
            assert "skipped 2 images and 1 caption lines" in result.stdout


def test_a_job_whose_every_image_is_bad_says_each_reason_once(tmp_path, micro_model_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.png").write_bytes(b"not a picture\n")
    result = _match(folder, micro_model_dir)
    assert result.exit_code == 3, result.output
    reason = "notes.png: not a readable image"
    assert result.output.count(reason) == 1, result.output  # logged as it was skipped, not repeated by the error
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: no usable image: all 1 were skipped") and "notes.png" in error


def test_eval_and_train_print_a_bad_images_reason_once(tmp_path, micro_model_dir, monkeypatch):
    """A dataset row whose image cannot be used: its reason is printed once by eval and once by train (not once
    when the dataset is read and again when the examples are built)."""
    monkeypatch.chdir(tmp_path)
    _good(tmp_path, 1)
    (tmp_path / "notes.png").write_bytes(b"not a picture\n")  # refused by the header screen
    png = _png(seed=3)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])  # passes the screen, fails while decoding
    rows = [
        {"image": name, "captions": ["a red circle", "a blue square"], "positive": 0}
        for name in ("notes.png", "cut.png", *["good-0.png"] * 4)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    scoring = ["--model", str(micro_model_dir), "--timesteps", "1", "--no-denoise"]
    runs = {
        "eval": ["eval", "data.jsonl", *scoring],
        "train": ["train", "data.jsonl", *scoring, "--max-steps", "1", "--output", "run", "--max-eval", "1"],
    }
    for name, arguments in runs.items():
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, (name, result.output)
        for once in ("notes.png", "cut.png: image is truncated or corrupt"):
            assert result.output.count(once) == 1, (name, once, result.output)


def test_decoder_warnings_go_to_the_report_never_raw(tmp_path, micro_model_dir, monkeypatch, capfd):
    folder = tmp_path / "images"
    folder.mkdir()
    _good(folder, 1)
    # The same Pillow warning from two files: each gets it (Python shows a warning once per code location).
    (folder / "apng-1.png").write_bytes(_invalid_apng())
    (folder / "apng-2.png").write_bytes(_invalid_apng())
    Image.new("RGB", (40, 40), "red").save(folder / "large.png")  # 1600 pixels: over Pillow's (lowered) limit
    (folder / "lzw.tif").write_bytes(_damaged_lzw_tiff())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warns between 1000 and 2000 pixels
    out = tmp_path / "scores.json"
    with warnings.catch_warnings(record=True) as shown:
        result = _match(folder, micro_model_dir, "-o", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "scores.skipped.json").read_text())
    noted = {Path(item["image"]).name: item["warnings"] for item in report["warnings"]}
    assert set(noted) == {"apng-1.png", "apng-2.png", "large.png"}
    for name in ("apng-1.png", "apng-2.png"):
        assert noted[name] == ["UserWarning: Invalid APNG, will use default PNG image if possible"]
    assert len(noted["large.png"]) == 1 and noted["large.png"][0].startswith("DecompressionBombWarning: ")
    skipped = {Path(item["image"]).name: item for item in report["images"]}
    assert set(skipped) == {"lzw.tif"}
    assert "libtiff error: Using code not yet in table" in skipped["lzw.tif"]["warnings"]
    # The usable files are scored, and their warnings are logged once each, naming the file.
    assert {Path(name).name for name in json.loads(out.read_text())["images"]} == {"good-0.png", *noted}
    assert result.output.count("Invalid APNG") == 2 and result.output.count("DecompressionBombWarning") == 1
    # Never raw: no warning reached Python's display, nothing from libtiff reached the process's stderr.
    assert [f"{w.category.__name__}: {w.message}" for w in shown if "PIL" in w.filename] == []
    assert "PngImagePlugin.py" not in result.output and "warnings.warn" not in result.output
    assert "Using code not yet in table" not in capfd.readouterr().err
    assert "1 images and 0 caption lines skipped, 0 captions truncated, 3 images with decoder warnings" in (
        result.stdout
    )


def test_warnings_from_decodes_in_threads_land_on_their_own_file(tmp_path, monkeypatch):
    from dsdkit.runtime.decode_warnings import collecting
    from dsdkit.runtime.images import load_image

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"image-{i}.png")
        paths[-1].write_bytes(_png(seed=i))
    barrier = threading.Barrier(len(paths), timeout=60)
    original = ImageFile.ImageFile.load

    def load(self):
        name = Path(self.filename).name
        warnings.warn(f"first warning of {name}", UserWarning, stacklevel=1)
        barrier.wait()  # every thread is inside a decode at once
        warnings.warn(f"second warning of {name}", RuntimeWarning, stacklevel=1)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)

    def decode(path):
        with collecting() as notes:
            load_image(path)
        return notes

    with warnings.catch_warnings(record=True) as shown:
        with ThreadPoolExecutor(len(paths)) as pool:
            futures = [pool.submit(decode, path) for path in paths]
            warnings.warn("a warning outside any decode", UserWarning, stacklevel=1)
            notes = [future.result() for future in futures]
    for path, got in zip(paths, notes, strict=True):
        assert got == [f"UserWarning: first warning of {path.name}", f"RuntimeWarning: second warning of {path.name}"]
    assert [str(w.message) for w in shown] == ["a warning outside any decode"]  # passed on to the display as before


def test_a_datasets_threaded_decoding_keeps_each_files_warnings(tmp_path, monkeypatch):
    from dsdkit.jobs.datasets import load_dataset

    rows = []
    for i in range(6):
        (tmp_path / f"image-{i}.png").write_bytes(_png(seed=i))
        rows.append({"image": f"image-{i}.png", "captions": ["a", "b"], "positive": 0, "id": f"ok-{i}"})
    png = _png(seed=9)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    rows.append({"image": "cut.png", "captions": ["a", "b"], "positive": 0, "id": "cut"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    original = ImageFile.ImageFile.load

    def load(self):
        warnings.warn(f"odd {Path(self.filename).name}", UserWarning, stacklevel=1)
        time.sleep(0.01)  # let the other thread decode in between
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    logged = _Records()
    logger = logging.getLogger("dsdkit.jobs.datasets")
    logger.addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as shown:
            dataset = load_dataset(tmp_path / "data.jsonl")
    finally:
        logger.removeHandler(logged)
    assert [example.id for example in dataset.examples] == [f"ok-{i}" for i in range(6)]
    (where, why), *rest = dataset.skipped
    assert where == "example cut" and not rest
    assert why.endswith("(decoder warnings: UserWarning: odd cut.png)"), why
    assert not shown
    assert [message for message in logged.messages if "are kept" in message] == [
        f"{tmp_path / 'data.jsonl'}: 6 usable image(s) raised decoder warnings and are kept "
        f"(e.g. {tmp_path / 'image-0.png'}: UserWarning: odd image-0.png)"
    ]


def test_no_report_when_nothing_is_skipped(tmp_path, micro_model_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    _good(folder)
    out = tmp_path / "scores.json"
    stale = tmp_path / "scores.skipped.json"
    stale.write_text('{"format": "dsdkit-skipped/1", "images": [{"reason": "an earlier run"}]}\n')
    result = _match(folder, micro_model_dir, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert not stale.exists()  # nothing was skipped: no report, and not an earlier run's either
    assert result.stdout.splitlines()[-1] == f"wrote 2 x 2 scores to {out}"
    assert json.loads(out.read_text())["meta"]["skipped_report"] is None
