"""The fault suite: every kind of bad input the issue lists, generated here, run through every command.

Each (fault, command) run is recorded in its test's ledger with its outcome, and each test fails on a crash or a
lost result among its own records. The records travel with the test reports (pytest's ``user_properties``), and at
the end of the session ``tests/conftest.py`` prints the summary line ``N bad inputs tried, 0 crashes, 0 results
lost`` computed from the records of the tests that ran, whatever their order or selection:

- a **crash** is an exit code outside the documented ones, the internal-error code 1, a traceback, or an
  error message that is not one line naming the offending file or line;
- a **lost result** is a good image whose row is missing from the result or differs from a clean run of the good
  images alone, or a resumed job whose matrix differs from an uninterrupted one.

Most runs go in-process through typer's CLI runner (fast); a few are real subprocesses. Bad images are collected
into one folder and one dataset so each command runs once over all of them, and each fault is then checked on its
own in the outputs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import EXIT_CODES
from PIL import Image
from typer.testing import CliRunner

from dsdkit.cli import app

GOOD = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
CAPTIONS = ["a red circle", "a blue square", "a green triangle"]
MATCH_ARGS = ["--timesteps", "1", "--batch-size", "8"]


# -- the ledger ----------------------------------------------------------------------------------------------------


#: The ``user_properties`` key under which each record reaches the session summary in tests/conftest.py.
LEDGER_PROPERTY = "fault_ledger"


@dataclass
class Ledger:
    """One test's records. Each is also handed to pytest (``publish``) as it is made, so the session summary counts
    the runs of a test that fails halfway too."""

    publish: object = None  # pytest's record_property
    tried: list[tuple[str, str]] = field(default_factory=list)  # (fault, command)
    crashes: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def record(self, fault: str, command: str, crashed: str | None = None, lost: str | None = None) -> None:
        self.tried.append((fault, command))
        if crashed:
            self.crashes.append(f"{fault} / {command}: {crashed}")
        if lost:
            self.lost.append(f"{fault} / {command}: {lost}")
        if self.publish is not None:
            self.publish(LEDGER_PROPERTY, [fault, command, crashed or None, lost or None])

    def assert_clean(self) -> None:
        assert not self.crashes and not self.lost, self.crashes + self.lost


@pytest.fixture()
def ledger(record_property):
    return Ledger(publish=record_property)


def crash_reason(result, expect_codes: set[int], name_in_error: str | None = None) -> str | None:
    """Why a CLI run counts as a crash, or None. ``expect_codes``: the exit codes this input may give."""
    text = result.output if hasattr(result, "output") else (result.stdout + result.stderr)
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    if "Traceback" in text:
        return "traceback in the output"
    if getattr(result, "exception", None) is not None and not isinstance(result.exception, SystemExit):
        return f"exception escaped: {type(result.exception).__name__}: {result.exception}"
    if code not in EXIT_CODES or code == 1:
        return f"undocumented or internal exit code {code}: {text.strip()[-400:]}"
    if code not in expect_codes:
        return f"exit code {code}, expected one of {sorted(expect_codes)}: {text.strip()[-300:]}"
    if code != 0:
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        if len(errors) != 1:
            return f"expected exactly one 'error:' line, got {len(errors)}: {text.strip()[-300:]}"
        if name_in_error and name_in_error not in errors[0]:
            return f"the error does not name {name_in_error!r}: {errors[0]}"
    return None


# -- bad images ----------------------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image, **kw) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=kw.pop("format", "PNG"), **kw)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A header-only PNG claiming ``width x height`` pixels (a few dozen bytes, no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _base(seed: int = 7) -> Image.Image:
    from tests.conftest import make_shape_image

    return make_shape_image("purple", "square", seed=seed)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def make_zero_byte(folder):
    return _write(folder, "zero.png", b"")


def make_truncated_png(folder):
    data = _png_bytes(_base())
    return _write(folder, "truncated.png", data[: len(data) // 2])


def make_truncated_jpeg(folder):
    data = _png_bytes(_base(), format="JPEG", quality=90)
    return _write(folder, "truncated.jpg", data[: int(len(data) * 0.6)])


def make_corrupt(folder):
    return _write(folder, "corrupt.jpg", b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(3000))


def make_not_an_image(folder):
    return _write(folder, "notes-named.png", b"these are my notes, not a picture\n")


def make_bomb(folder):
    return _write(folder, "bomb.png", _bomb_png(20000, 20000))


def make_symlink_loop(folder):
    a, b = folder / "loop-a.png", folder / "loop-b.png"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    return a


def make_broken_link(folder):
    link = folder / "dangling.png"
    link.symlink_to("nowhere/missing.png")
    return link


def make_unreadable(folder):
    path = folder / "locked.png"
    _base().save(path)
    path.chmod(0)
    return path


def make_animated_gif(folder):
    frames = [_base(seed=i).convert("P") for i in range(3)]
    path = folder / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def make_palette(folder):
    path = folder / "palette.png"
    _base().convert("P").save(path)
    return path


def make_grayscale(folder):
    path = folder / "gray.png"
    _base().convert("L").save(path)
    return path


def make_cmyk(folder):
    path = folder / "cmyk.jpg"
    _base().convert("CMYK").save(path, quality=95)
    return path


def make_rgba(folder):
    rgba = _base().convert("RGBA")
    alpha = np.zeros(rgba.size[::-1], dtype=np.uint8)
    alpha[10:-10, 10:-10] = 255
    rgba.putalpha(Image.fromarray(alpha))
    path = folder / "rgba.png"
    rgba.save(path)
    return path


def make_sixteen_bit(folder):
    array = (np.asarray(_base().convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    path = folder / "sixteen.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def make_exif_rotated(folder):
    image = _base()
    exif = image.getexif()
    exif[0x0112] = 6
    path = folder / "exif-rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def make_one_pixel(folder):
    path = folder / "one-pixel.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    return path


def make_other_file(folder):
    return _write(folder, "README.txt", b"not an image suffix: never listed\n")


def make_folder_named_png(folder):
    path = folder / "album.png"
    path.mkdir()
    return path


@dataclass(frozen=True)
class ImageFault:
    name: str
    make: object
    expect: str  # "skip": reported and left out; "score": handled and scored; "ignore": never listed


IMAGE_FAULTS = [
    ImageFault("zero-byte file", make_zero_byte, "skip"),
    ImageFault("truncated PNG", make_truncated_png, "skip"),
    ImageFault("truncated JPEG", make_truncated_jpeg, "skip"),
    ImageFault("corrupt JPEG", make_corrupt, "skip"),
    ImageFault("text file with an image suffix", make_not_an_image, "skip"),
    ImageFault("20000x20000 header-only PNG (decompression bomb)", make_bomb, "skip"),
    ImageFault("symlink loop", make_symlink_loop, "skip"),
    ImageFault("dangling symlink", make_broken_link, "skip"),
    ImageFault("unreadable permissions", make_unreadable, "skip"),
    ImageFault("animated GIF", make_animated_gif, "score"),
    ImageFault("palette PNG", make_palette, "score"),
    ImageFault("grayscale PNG", make_grayscale, "score"),
    ImageFault("CMYK JPEG", make_cmyk, "score"),
    ImageFault("RGBA PNG", make_rgba, "score"),
    ImageFault("16-bit PNG", make_sixteen_bit, "score"),
    ImageFault("EXIF-rotated JPEG", make_exif_rotated, "score"),
    ImageFault("1x1 image", make_one_pixel, "score"),
    ImageFault("non-image file in the folder", make_other_file, "ignore"),
    ImageFault("folder with an image suffix", make_folder_named_png, "ignore"),
]

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def active_faults() -> list[ImageFault]:
    """Root reads any file, so the permission case can only be tried as a normal user."""
    return [f for f in IMAGE_FAULTS if not (f.make is make_unreadable and RUNNING_AS_ROOT)]


def dataset_faults() -> dict[str, ImageFault]:
    """The image faults a dataset row can point at. A dangling link is a *missing* image there, and missing images
    stop a dataset at once (a wrong --image-root, not a bad file): see test_dataset_with_a_dangling_link."""
    return {f.name: f for f in active_faults() if f.expect != "ignore" and f.make is not make_broken_link}


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    return CliRunner()


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from dsdkit.pytorch.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("fault-model") / "micro", size="micro", seed=0)


@pytest.fixture(scope="module")
def micro_bundle(micro_model, tmp_path_factory):
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle

    out = tmp_path_factory.mktemp("fault-bundle") / "bundle"
    config = ExportConfig(exporter="torchscript", parity=ParitySettings(images=2, captions=2, timesteps=1))
    export_bundle(micro_model, out, config=config)
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """``good/``: the good images alone; ``mixed/``: the good images and every bad one; captions; a dataset."""
    from tests.conftest import make_shape_image

    root = tmp_path_factory.mktemp("faults")
    good, mixed = root / "good", root / "mixed"
    good.mkdir()
    mixed.mkdir()
    for i, (colour, shape) in enumerate(GOOD):
        image = make_shape_image(colour, shape, seed=i)
        image.save(good / f"good-{i}.png")
        image.save(mixed / f"good-{i}.png")
    made = {fault.name: fault.make(mixed) for fault in active_faults()}
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    rows = [
        {"image": f"mixed/{p.name}", "captions": CAPTIONS, "positive": 0, "id": fault}
        for fault, p in made.items()
        if fault in dataset_faults()
    ]
    rows += [{"image": f"good/good-{i}.png", "captions": CAPTIONS, "positive": i, "id": f"good-{i}"} for i in range(3)]
    rows.append({"image": "../../outside.png", "captions": CAPTIONS, "positive": 0, "id": "escapes the root"})
    dataset = root / "data.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yield root, good, mixed, made, captions, dataset
    for path in made.values():  # let pytest clean up the permission case
        if path.exists() and not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def match_run(cli, images, captions, out, engine_args, *extra):
    return cli.invoke(app, ["match", str(images), str(captions), *engine_args, *MATCH_ARGS, "-o", str(out), *extra])


def engines(micro_model, micro_bundle):
    return {"match --model": ["--model", str(micro_model)], "match --bundle": ["--bundle", str(micro_bundle)]}


# -- images through match (both engines), eval, train and explain ---------------------------------------------------


@pytest.mark.parametrize("engine", ["match --model", "match --bundle"])
def test_bad_images_through_match(cli, job, micro_model, micro_bundle, tmp_path, engine, ledger):
    root, good, mixed, made, captions, _ = job
    args = engines(micro_model, micro_bundle)[engine]
    clean = match_run(cli, good, captions, tmp_path / "clean.json", args)
    assert clean.exit_code == 0, clean.output
    reference = json.loads((tmp_path / "clean.json").read_text())
    result = match_run(cli, mixed, captions, tmp_path / "mixed.json", args)
    run_crash = crash_reason(result, {0})
    document = json.loads((tmp_path / "mixed.json").read_text()) if result.exit_code == 0 else None
    report = json.loads((tmp_path / "mixed.skipped.json").read_text()) if result.exit_code == 0 else None
    rows = {} if document is None else dict(zip(document["images"], document["scores"], strict=True))
    reasons = {} if report is None else {Path(item["image"]).name: item["reason"] for item in report["images"]}
    for fault in active_faults():
        path = made[fault.name]
        lost = None
        crashed = run_crash
        if not crashed and fault.expect == "skip":
            if path.name not in reasons:
                crashed = "not listed in the skipped-items report"
            elif str(path) not in reasons[path.name] or "\n" in reasons[path.name]:
                crashed = f"reason is not one line naming the file: {reasons[path.name]!r}"
            elif str(path) in rows:
                crashed = "skipped but still has a row"
        elif not crashed and fault.expect == "score":
            if str(path) not in rows or not np.isfinite(rows[str(path)]).all():
                crashed = "a usable image was not scored"
        elif not crashed and (str(path) in rows or path.name in reasons):
            crashed = "a file that is not an image was listed"
        for name, row in zip(reference["images"], reference["scores"], strict=True):
            twin = str(mixed / Path(name).name)
            if twin not in rows:
                lost = f"good image {twin} has no row"
            elif not np.allclose(rows[twin], row, rtol=1e-5, atol=1e-6):
                lost = f"good image {twin} scores differ from the clean run"
        ledger.record(fault.name, engine, crashed, lost)
    assert not run_crash, run_crash
    ledger.assert_clean()
    # Every skip fault made one bad file, except the symlink loop: two links, each a loop.
    skipped = len([f for f in active_faults() if f.expect == "skip"]) + 1
    assert len(report["images"]) == skipped
    assert f"{skipped} images and 0 caption lines skipped" in result.output


def test_per_layer_with_a_chunk_of_only_bad_images(cli, job, micro_model, tmp_path, ledger):
    """Per-layer terms stay aligned with rows when a whole chunk is skipped (not the last chunk)."""
    root, good, mixed, made, captions, _ = job
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(made["corrupt JPEG"], folder / "0-corrupt.jpg")
    shutil.copy(made["zero-byte file"], folder / "1-zero.png")
    for i in range(2):
        shutil.copy(good / f"good-{i}.png", folder / f"{2 + i}-good.png")
    out = tmp_path / "layers.json"
    result = match_run(cli, folder, captions, out, ["--model", str(micro_model)], "--per-layer", "--chunk-size", "2")
    crashed = crash_reason(result, {0})
    document = json.loads(out.read_text()) if out.exists() else {}
    if not crashed and (len(document.get("scores", [])) != 2 or len(document.get("layer_scores", [])) != 2):
        crashed = "rows and per-layer terms do not line up"
    ledger.record("a chunk of only bad images", "match --per-layer", crashed)
    assert not crashed, crashed


def test_resuming_a_skipping_run_with_strict_is_refused(job, micro_bundle, tmp_path, monkeypatch, ledger):
    import dsdkit.runtime.resume as jobs
    from dsdkit.runtime.errors import InputError

    from dsdkit.jobs.match import match

    root, good, mixed, made, captions, _ = job
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(made["truncated PNG"], folder / "0-truncated.png")  # passes the header screen, fails to decode
    shutil.copy(good / "good-0.png", folder / "1-good.png")
    shutil.copy(good / "good-1.png", folder / "2-good.png")
    original = jobs._save
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise Interrupt("after the chunk with the bad image")

    monkeypatch.setattr(jobs, "_save", save_then_die)
    with pytest.raises(Interrupt):
        match(folder, captions, output=tmp_path / "s.json", bundle=micro_bundle, num_timesteps=1, chunk_size=1)
    monkeypatch.undo()
    crashed = None
    try:
        match(
            folder,
            captions,
            output=tmp_path / "s.json",
            bundle=micro_bundle,
            num_timesteps=1,
            chunk_size=1,
            resume=True,
            strict=True,
        )
        crashed = "--strict accepted an image skipped by the earlier run"
    except InputError as exc:
        crashed = None if "0-truncated.png" in str(exc) and "`strict`" in str(exc) else f"unclear: {exc}"
    ledger.record("skipped image, then --resume --strict", "match", crashed)
    assert not crashed, crashed
    resumed = match(
        folder, captions, output=tmp_path / "s.json", bundle=micro_bundle, num_timesteps=1, chunk_size=1, resume=True
    )
    assert [Path(n).name for n in resumed.images] == ["1-good.png", "2-good.png"]


def test_empty_image_list_is_an_input_error(job, micro_bundle, ledger):
    from dsdkit.runtime.errors import InputError

    from dsdkit.jobs.match import match

    with pytest.raises(InputError, match="nothing to score"):
        match([], CAPTIONS, bundle=micro_bundle, num_timesteps=1)
    ledger.record("empty image list", "match (API)")


def test_strict_refuses_the_first_bad_image(cli, job, micro_bundle, tmp_path, ledger):
    root, good, mixed, made, captions, _ = job
    result = match_run(cli, mixed, captions, tmp_path / "strict.json", ["--bundle", str(micro_bundle)], "--strict")
    crashed = crash_reason(result, {3}, name_in_error=str(mixed))
    ledger.record("any skipped image", "match --strict", crashed)
    assert not crashed, crashed
    assert "--strict" in result.output and not (tmp_path / "strict.json").exists()


def test_bad_images_through_eval_and_train(cli, job, micro_model, tmp_path, ledger):
    root, good, mixed, made, captions, dataset = job
    out = tmp_path / "eval.json"
    result = cli.invoke(
        app, ["eval", str(dataset), "--model", str(micro_model), "--timesteps", "1", "--no-denoise", "-o", str(out)]
    )
    eval_crash = crash_reason(result, {0})
    report = json.loads(out.read_text()) if out.exists() else {"skipped": [], "examples": []}
    run = tmp_path / "train"
    trained = cli.invoke(
        app,
        [
            "train",
            str(dataset),
            "--model",
            str(micro_model),
            "--timesteps",
            "1",
            "--max-steps",
            "1",
            "--no-eval",
            "--device",
            "cpu",
            "-o",
            str(run),
        ],
    )
    train_crash = crash_reason(trained, {0})
    train_skipped = json.loads((run / "skipped.json").read_text()) if (run / "skipped.json").exists() else []
    for command, crashed, skipped in (("eval", eval_crash, report["skipped"]), ("train", train_crash, train_skipped)):
        where = {item["where"]: item["reason"] for item in skipped}
        for fault in dataset_faults().values():
            problem = crashed
            # A bad file is found when decoding (reported as its example) or, for a link loop, already when its
            # row is read (reported as the row, the reason naming the path).
            reported = any(w == f"example {fault.name}" or made[fault.name].name in why for w, why in where.items())
            if not problem and fault.expect == "skip" and not reported:
                problem = "example with an unusable image not reported as skipped"
            if not problem and fault.expect == "score" and reported:
                problem = "example with a usable image was skipped"
            ledger.record(fault.name, command, problem)
        escape = next((why for w, why in where.items() if "escapes the image root" in why), None)
        ledger.record("dataset path escaping the image root", command, crashed or (None if escape else "not refused"))
    assert not eval_crash and not train_crash, (eval_crash, train_crash)
    ledger.assert_clean()
    assert len(ledger.tried) == 2 * (len(dataset_faults()) + 1)
    scored = {record["id"] for record in report["examples"]}
    assert {"good-0", "good-1", "good-2"} <= scored  # results of the good rows are all there
    assert (run / "adapter.safetensors").is_file()


def test_dataset_with_a_dangling_link(cli, job, micro_model, tmp_path, ledger):
    root, good, mixed, made, captions, dataset = job
    data = tmp_path / "data.jsonl"
    link = made["dangling symlink"]
    data.write_text(
        json.dumps({"image": str(link), "captions": CAPTIONS})
        + "\n"
        + json.dumps({"image": str(good / "good-0.png"), "captions": CAPTIONS})
        + "\n"
    )
    result = cli.invoke(
        app, ["eval", str(data), "--image-root", str(root), "--model", str(micro_model), "--timesteps", "1"]
    )
    crashed = crash_reason(result, {3}, name_in_error="missing.png")
    ledger.record("dangling symlink", "eval", crashed)
    assert not crashed, crashed


def test_bad_images_through_explain(cli, job, micro_model, tmp_path, ledger):
    root, good, mixed, made, captions, _ = job
    problems = []
    for fault in active_faults():
        if fault.expect == "ignore":
            continue
        path = made[fault.name]
        out = tmp_path / f"{path.stem}.heat.png"
        result = cli.invoke(
            app,
            ["explain", str(path), "a purple square", "--model", str(micro_model), "--timesteps", "1", "-o", str(out)],
        )
        expect = {0} if fault.expect == "score" else {3}
        crashed = crash_reason(result, expect, name_in_error=str(path) if fault.expect == "skip" else None)
        if not crashed and fault.expect == "score" and not out.is_file():
            crashed = "no heat map written"
        ledger.record(fault.name, "explain", crashed)
        if crashed:
            problems.append(f"{fault.name}: {crashed}")
    assert not problems, problems


def test_permission_case_under_root_is_reported():
    if not RUNNING_AS_ROOT:
        pytest.skip("not root: the unreadable-file case runs with the other image faults")
    pytest.skip(
        "running as root, which reads any file: the unreadable-permissions case cannot be produced here "
        "(it runs in the image fault table as a normal user)"
    )


# -- captions ------------------------------------------------------------------------------------------------------


CAPTION_FAULTS = {
    "blank and whitespace-only lines": (b"a red circle\n\n   \n\t\na blue square\n", 0),
    "BOM and CRLF": (b"\xef\xbb\xbfa red circle\r\na blue square\r\n", 0),
    "non-UTF-8 bytes": (b"a red circle\na bl\xffe square\n", 3),
    "caption over 77 tokens": (("a red circle " + "and a very long tail " * 30 + "\na blue square\n").encode(), 0),
    "duplicate captions": (b"a red circle\na blue square\na red circle\n", 0),
    "empty captions file": (b"", 3),
    "only blank lines": (b"\n \n\t\n", 3),
}


@pytest.mark.parametrize("fault", list(CAPTION_FAULTS))
def test_bad_captions(cli, job, micro_bundle, tmp_path, fault, ledger):
    root, good, *_ = job
    data, code = CAPTION_FAULTS[fault]
    captions = tmp_path / "captions.txt"
    captions.write_bytes(data)
    out = tmp_path / "scores.json"
    result = match_run(cli, good, captions, out, ["--bundle", str(micro_bundle)])
    crashed = crash_reason(result, {code}, name_in_error=str(captions) if code else None)
    if not crashed and code == 0:
        document = json.loads(out.read_text())
        report_path = tmp_path / "scores.skipped.json"  # written only when something was skipped or truncated
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        scores = np.array(document["scores"])
        if fault == "blank and whitespace-only lines":
            crashed = (
                None
                if (document["captions"] == ["a red circle", "a blue square"] and len(report["caption_lines"]) == 3)
                else "blank lines not skipped and reported"
            )
        elif fault == "BOM and CRLF":
            crashed = None if document["captions"] == ["a red circle", "a blue square"] else "BOM/CRLF kept"
        elif fault == "caption over 77 tokens":
            crashed = None if report["truncated_captions"] else "truncation not reported"
        elif fault == "duplicate captions":
            crashed = (
                None
                if len(document["captions"]) == 3 and np.array_equal(scores[:, 0], scores[:, 2])
                else "duplicates not kept with equal scores"
            )
    if not crashed and fault == "non-UTF-8 bytes" and "line 2" not in result.output:
        crashed = "the error does not name the line"
    ledger.record(fault, "match", crashed)
    assert not crashed, crashed


# -- models, adapters, bundles -------------------------------------------------------------------------------------


def _model_copy(micro_model, tmp_path, name) -> Path:
    copy = tmp_path / name
    shutil.copytree(micro_model, copy)
    return copy


def _partial(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()


def _sdxl(folder):
    (folder / "text_encoder_2").mkdir()


def _pickle_only(folder):
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))


def _truncated_weights(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _v_prediction(folder):
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))


MODEL_FAULTS = {
    "model folder without UNet weights": (_partial, 4, "unet"),
    "SDXL folder": (_sdxl, 4, "SDXL"),
    "pickle-only weights": (_pickle_only, 4, "safetensors"),
    "truncated weights": (_truncated_weights, 4, None),
    "v-prediction SD2 (768-v), supported: it scores": (_v_prediction, 0, None),
}


@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
def test_bad_model_folders(cli, job, micro_model, tmp_path, fault, ledger):
    root, good, mixed, made, captions, _ = job
    damage, code, mention = MODEL_FAULTS[fault]
    folder = _model_copy(micro_model, tmp_path, "model")
    damage(folder)
    result = match_run(cli, good, captions, tmp_path / "scores.json", ["--model", str(folder)])
    crashed = crash_reason(result, {code}, name_in_error=str(folder) if code else None)
    if not crashed and mention and mention not in result.output:
        crashed = f"the message does not say what was found ({mention!r})"
    ledger.record(fault, "match --model", crashed)
    assert not crashed, crashed


def test_adapters_for_another_model_or_scoring_are_refused(cli, job, micro_model, tmp_path, ledger):
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.adapters import AdapterConfig, create_adapter, save_adapter
    from dsdkit.pytorch.models import load_model

    root, good, mixed, made, captions, _ = job
    model = load_model(micro_model, device="cpu")
    scoring = ScoringConfig()
    adapter = create_adapter(model, scoring, AdapterConfig(kind="kv-prompt"))
    other_model = save_adapter(adapter, tmp_path / "other-model.safetensors", "sha256:another-base-model", scoring)
    paper = ScoringConfig.from_preset("paper")
    lora = create_adapter(model, paper, AdapterConfig(kind="lora"))
    other_layers = save_adapter(lora, tmp_path / "other-scoring.safetensors", model.identity(), paper)
    # Without --preset, match scores the way the adapter was trained (paper preset here): that works. Its schedule
    # is noise levels, which --timesteps does not size (refused), so the run is kept short with one level instead.
    own = cli.invoke(
        app,
        ["match", str(good), str(captions), "--model", str(micro_model), "--adapters", str(other_layers)]
        + ["--noise-levels", "0.5", "-o", str(tmp_path / "own.json")],
    )
    assert own.exit_code == 0, own.output
    assert json.loads((tmp_path / "own.json").read_text())["meta"]["scoring"]["preset"] == "paper"
    # The paper preset scores every cross-attention layer with other pooling; discffusion is another definition.
    for fault, path, flags in (
        ("adapter trained on another base model", other_model, []),
        ("adapter trained with another scoring config", other_layers, ["--preset", "discffusion"]),
    ):
        result = match_run(
            cli,
            good,
            captions,
            tmp_path / "scores.json",
            ["--model", str(micro_model)],
            "--adapters",
            str(path),
            *flags,
        )
        crashed = crash_reason(result, {2, 4}, name_in_error=str(path))
        ledger.record(fault, "match --adapters", crashed)
        assert not crashed, crashed


def _bundle_copy(micro_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(micro_bundle, copy)
    return copy


def _graph(bundle: Path) -> Path:
    return next((bundle / "onnx").glob("scorer*.onnx"))


BUNDLE_FAULTS = {
    "bundle with a modified file": lambda b: _graph(b).write_bytes(_graph(b).read_bytes()[:-1] + b"\x00"),
    "bundle with a missing file": lambda b: (b / "tokenizer" / "vocab.json").unlink(),
    "bundle with a truncated file": lambda b: _graph(b).write_bytes(_graph(b).read_bytes()[:-100]),
    "bundle of another format version": lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"dsdkit-bundle/1"', '"dsdkit-bundle/99"')
    ),
    "bundle without a manifest": lambda b: (b / "manifest.json").unlink(),
}


@pytest.mark.parametrize("fault", list(BUNDLE_FAULTS))
def test_damaged_bundles(cli, job, micro_bundle, tmp_path, fault, ledger):
    root, good, mixed, made, captions, _ = job
    bundle = _bundle_copy(micro_bundle, tmp_path)
    BUNDLE_FAULTS[fault](bundle)
    result = match_run(cli, good, captions, tmp_path / "scores.json", ["--bundle", str(bundle)])
    crashed = crash_reason(result, {7}, name_in_error=str(bundle))
    ledger.record(fault, "match --bundle", crashed)
    assert not crashed, crashed
    inspected = cli.invoke(app, ["inspect", str(bundle)])
    crashed = crash_reason(inspected, {7}, name_in_error=str(bundle))
    ledger.record(fault, "inspect", crashed)
    assert not crashed, crashed


# -- interruption and faults while writing ---------------------------------------------------------------------------


class Interrupt(BaseException):
    """Stands for a kill: a BaseException, so nothing in dsdkit may swallow it."""


@pytest.mark.parametrize(
    "point",
    ["after a chunk is saved", "in the middle of a chunk", "between scores and state", "while writing the result"],
)
def test_match_interrupted_anywhere_resumes_to_the_same_result(
    job, micro_bundle, tmp_path, monkeypatch, point, ledger
):
    """Kill a 5-chunk job at one point, resume it: nothing already scored is redone, the result equals a clean run."""
    import dsdkit.runtime.resume as jobs

    import dsdkit.jobs.match as matching
    from dsdkit.jobs.match import match

    root, good, mixed, made, captions, _ = job
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        shutil.copy(good / f"good-{i % 3}.png", folder / f"{i}.png")
        if i >= 3:
            Image.open(folder / f"{i}.png").rotate(90 * (i - 2)).save(folder / f"{i}.png")
    options = dict(bundle=micro_bundle, chunk_size=1, num_timesteps=1)
    counted = []
    whole = match(
        folder, captions, output=tmp_path / "whole.json", progress=lambda total, done: counted.append, **options
    )
    out = tmp_path / "killed.json"
    # Which call of the patched step dies: the 2nd save, the 3rd chunk, the 2nd state write, the result write.
    dies_at = {
        "after a chunk is saved": 2,
        "in the middle of a chunk": 3,
        "between scores and state": 2,
        "while writing the result": 1,
    }[point]
    calls = {"n": 0}

    def trip(where):
        calls["n"] += 1
        if calls["n"] == dies_at:
            raise Interrupt(where)

    if point == "after a chunk is saved":
        original = jobs._save
        monkeypatch.setattr(jobs, "_save", lambda *a, **k: (original(*a, **k), trip(point)))
    elif point == "in the middle of a chunk":
        from dsdkit.runtime.matcher import Matcher

        original_score = Matcher.score_encoded_matrix
        monkeypatch.setattr(
            Matcher, "score_encoded_matrix", lambda self, *a, **k: (trip(point), original_score(self, *a, **k))[1]
        )
    elif point == "between scores and state":
        original_write = jobs.atomic_write_text

        def write_text(path, text):
            if Path(path).name == "state.json":
                trip(point)
            return original_write(path, text)

        monkeypatch.setattr(jobs, "atomic_write_text", write_text)
    else:
        original_result = matching.write_result
        monkeypatch.setattr(matching, "write_result", lambda *a, **k: (trip(point), original_result(*a, **k)))
    with pytest.raises(Interrupt):
        match(folder, captions, output=out, **options)
    monkeypatch.undo()
    assert not out.exists()  # nothing half-written under the final name
    state = json.loads((jobs.partial_folder(out) / "state.json").read_text())
    done_before = state["done_rows"]
    evaluations = []
    resumed = match(
        folder, captions, output=out, resume=True, progress=lambda total, done: evaluations.append, **options
    )
    np.testing.assert_array_equal(resumed.scores, whole.scores)
    # Only the rows not saved before the kill were scored again.
    assert sum(evaluations) == sum(counted) * (5 - done_before) // 5
    assert json.loads(out.read_text())["scores"] == json.loads((tmp_path / "whole.json").read_text())["scores"]
    lost = None if done_before >= 1 or point == "between scores and state" else "no chunk was kept"
    ledger.record(f"match killed {point}", "match --resume", None, lost)
    assert lost is None, lost


@pytest.mark.parametrize("point", ["inside a checkpoint write", "between a checkpoint and latest.json"])
def test_train_killed_while_checkpointing_resumes_to_the_same_adapter(
    micro_model, tmp_path, monkeypatch, point, ledger
):
    """Kill training while its second checkpoint is being written; --resume ends with the same adapter bytes.

    (Kills between steps, with a bit-identical resume, are in tests/train/test_trainer.py.)"""
    import dsdkit.train.checkpoint as checkpoint
    from dsdkit.train import TrainConfig, train

    from dsdkit.pytorch.models import load_model
    from dsdkit.world import write_colour_shapes

    data = write_colour_shapes(tmp_path / "data", train=6, test=4, seed=1)
    model = load_model(micro_model, device="cpu")

    def run(output, resume=False):
        config = TrainConfig(
            data=str(data),
            output=str(output),
            batch_size=2,
            epochs=2,
            checkpoint_every=2,
            lr=1e-2,
            device="cpu",
            seed=3,
            adapter="kv-prompt",
            resume=resume,
            eval_every_epoch=False,
            scoring={"timesteps": "noise-levels", "noise_levels": [0.1, 0.3], "denoise_term": False},
        )
        return train(config, model=model)

    whole = run(tmp_path / "whole")
    calls = {"n": 0}

    def trip():
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt(point)

    if point == "inside a checkpoint write":
        original_staged = checkpoint.staged_folder

        @contextlib.contextmanager
        def staged(final):
            with original_staged(final) as tmp:
                yield tmp
                trip()  # every file of the checkpoint written, the folder not yet renamed into place

        monkeypatch.setattr(checkpoint, "staged_folder", staged)
    else:
        original_write = checkpoint.atomic_write_text

        def write_text(path, text):
            if Path(path).name == "latest.json":
                trip()
            return original_write(path, text)

        monkeypatch.setattr(checkpoint, "atomic_write_text", write_text)
    killed = tmp_path / "killed"
    with pytest.raises(Interrupt):
        run(killed)
    monkeypatch.undo()
    latest = json.loads((killed / "latest.json").read_text())
    assert (killed / latest["path"] / "adapter.safetensors").is_file()  # the previous checkpoint is intact
    assert not [p for p in (killed / "checkpoints").iterdir() if not p.name.startswith("step-")]  # no temp folder
    resumed = run(killed, resume=True)
    same = resumed.adapter_path.read_bytes() == whole.adapter_path.read_bytes()
    ledger.record(f"train killed {point}", "train --resume", None, None if same else "resumed adapter differs")
    assert same


def test_full_disk_while_writing_results(job, micro_bundle, tmp_path, monkeypatch, ledger):
    """ENOSPC from the disk: an OutputError naming the file, the earlier result untouched, no temp file left."""
    import dsdkit.runtime.files as files
    from dsdkit.runtime.errors import OutputError

    from dsdkit.jobs.match import match

    root, good, mixed, made, captions, _ = job
    out = tmp_path / "scores.json"
    match(good, captions, output=out, bundle=micro_bundle, num_timesteps=1)
    before = out.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    crashed = None
    try:
        match(good, captions, output=out, bundle=micro_bundle, num_timesteps=1)
        crashed = "no error on a full disk"
    except OutputError as exc:
        if "no space left" not in str(exc) or "\n" in str(exc):
            crashed = f"unclear message: {exc}"
    monkeypatch.undo()
    lost = None if out.read_bytes() == before else "the earlier result was damaged"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    ledger.record(
        "full disk (ENOSPC) while writing results", "match", crashed or (leftovers and f"left {leftovers}"), lost
    )
    assert not crashed and not lost and not leftovers


# -- a few real processes ------------------------------------------------------------------------------------------


def test_real_processes_give_one_line_errors_and_keep_results(job, micro_bundle, tmp_path, ledger):
    root, good, mixed, made, captions, _ = job
    bad_captions = tmp_path / "bad.txt"
    bad_captions.write_bytes(b"a red circle\n\xff\xfe broken\n")
    command = [
        sys.executable,
        "-m",
        "dsdkit",
        "match",
        str(mixed),
        str(bad_captions),
        "--bundle",
        str(micro_bundle),
        *MATCH_ARGS,
    ]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    crashed = crash_reason(failed, {3}, name_in_error=str(bad_captions))
    ledger.record("non-UTF-8 captions", "dsdkit match (process)", crashed)
    assert not crashed, crashed
    out = tmp_path / "scores.csv"
    command[5] = str(captions)
    ok = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True, timeout=300)
    crashed = crash_reason(ok, {0})
    rows = out.read_text().splitlines()[1:] if out.exists() else []
    lost = (
        None
        if sorted(r.split(",")[0] for r in rows if "good-" in r)
        == sorted(str(mixed / f"good-{i}.png") for i in range(3))
        else "good rows missing"
    )
    ledger.record("folder of bad images", "dsdkit match (process)", crashed, lost)
    assert not crashed and not lost, (crashed, lost, ok.stderr[-2000:])


# -- the summary ---------------------------------------------------------------------------------------------------


def test_summary_does_not_depend_on_the_order_of_the_tests():
    """The session summary (tests/conftest.py) is the same whatever order the records arrive in, and counts each
    crash and lost result."""
    from tests.conftest import FAULT_LEDGER, fault_summary

    assert FAULT_LEDGER == LEDGER_PROPERTY
    records = [
        ["zero-byte file", "match --model", None, None],
        ["truncated PNG", "eval", "exit code 1", None],
        ["match killed mid-chunk", "match --resume", None, "no chunk was kept"],
        ["zero-byte file", "match --bundle", None, None],
    ]
    expected = "4 bad inputs tried, 1 crashes, 1 results lost"
    for order in (records, records[::-1], records[2:] + records[:2]):
        line, problems = fault_summary(order)
        assert line == expected
        assert problems == [
            "match killed mid-chunk / match --resume: no chunk was kept",
            "truncated PNG / eval: exit code 1",
        ]
