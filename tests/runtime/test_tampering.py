"""The tampering suite (issue 29, on disk): every file dsdkit reads, edited, damaged or pointed elsewhere.

Each case expects its documented outcome (docs/security.md): a one-line error with the format's exit code (bundles 7,
adapters 4, datasets 3, job folders 11), or, for resume state, one logged line saying it is discarded and a result
equal to an untouched run. A refused bundle never reaches ONNX Runtime: ``onnxruntime.InferenceSession`` is replaced
by a stand-in that fails the test if it is constructed. Cases that passed before the issue are kept beside the new
ones, so the suite covers every class. Commands run in-process (typer's CLI runner) or through the library.

One bundle (the session's ``discffusion`` export) is copied per case; jobs are planned and scored once per module.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import InputError, ModelError
from typer.testing import CliRunner

from dsdkit.cli import app

CAPTIONS = ["a red circle", "a blue square"]
STEPS = ["--timesteps", "1"]


class ReachedOnnxRuntime(BaseException):
    """Raised by the stand-in for ``onnxruntime.InferenceSession``: a BaseException, so nothing in dsdkit turns it
    into a one-line error and the test sees it."""


@pytest.fixture()
def no_onnxruntime(monkeypatch):
    """``onnxruntime.InferenceSession`` that fails the test if anything constructs it (audit hooks cannot see ONNX
    Runtime's own file opens, so the check is that it is never asked to open anything)."""
    import onnxruntime

    made = []

    def refuse(*args, **kwargs):
        made.append(args[0] if args else kwargs)
        raise ReachedOnnxRuntime(f"ONNX Runtime was asked to load {made[-1]}")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    return made


@pytest.fixture(scope="module")
def cli():
    return CliRunner()


def one_line_error(result, code: int, *names: str) -> str:
    """The single ``error:`` line of a CLI run that must fail with ``code``; it names each of ``names``."""
    assert "Traceback" not in result.output, result.output[-2000:]
    assert result.exit_code == code, result.output[-2000:]
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output[-2000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shape_images):
    """Three images and two captions: small enough that a job is a few scorer runs at S = 1."""
    root = tmp_path_factory.mktemp("tamper-inputs")
    images = root / "images"
    images.mkdir()
    for i, image in enumerate(shape_images[:3]):
        image.save(images / f"im{i}.png")
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return images, captions


@pytest.fixture(scope="module")
def exported(export_case) -> Path:
    return export_case("discffusion")[0]


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _edit(change):
    """A tampering step that edits the manifest with ``change(manifest)``."""

    def tamper(bundle: Path, outside: Path) -> None:
        manifest = _manifest(bundle)
        change(manifest)
        _write_manifest(bundle, manifest)

    return tamper


def _rehash(bundle: Path, relative: str) -> None:
    """Record ``relative``'s new size and sha256 in the manifest, as a writer who rewrites the hashes would."""
    manifest = _manifest(bundle)
    data = (bundle / relative).read_bytes()
    manifest["files"][relative] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _write_manifest(bundle, manifest)


def _external_graph(location: str) -> bytes:
    """A small valid ONNX model whose one initializer lives in external data at ``location``."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [output], initializer=[weight])
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]).SerializeToString()


def _swap_in_graph(location: str, data_at: str | None = None):
    """Replace the text encoder by a graph reading external data at ``location`` (written to ``data_at``, relative
    to the bundle, when given), with its hash rewritten: confinement must hold even when the hashes match."""

    def tamper(bundle: Path, outside: Path) -> None:
        (bundle / "onnx" / "text_encoder.onnx").write_bytes(_external_graph(location))
        if data_at is not None:
            target = (bundle / data_at).resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(struct.pack("<f", 1.0))
        _rehash(bundle, "onnx/text_encoder.onnx")

    return tamper


def _move_out(relative: str):
    """Move ``relative`` out of the bundle and leave a symlink to it (the content, and so its hash, unchanged)."""

    def tamper(bundle: Path, outside: Path) -> None:
        target = outside / Path(relative).name
        shutil.move(bundle / relative, target)
        (bundle / relative).symlink_to(target)

    return tamper


def _flip_byte(relative: str):
    def tamper(bundle: Path, outside: Path) -> None:
        data = bytearray((bundle / relative).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bundle / relative).write_bytes(bytes(data))

    return tamper


def _drop_files_and_flip(bundle: Path, outside: Path) -> None:
    _flip_byte("onnx/text_encoder.onnx")(bundle, outside)
    _edit(lambda m: m.pop("files"))(bundle, outside)


def _set(*path_and_value):
    *path, value = path_and_value

    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return _edit(change)


def _unlisted_tokenizer_file(bundle: Path, outside: Path) -> None:
    (bundle / "tokenizer" / "tokenizer.json").write_text("{}")


def _truncate(bundle: Path, outside: Path) -> None:
    graph = bundle / "onnx" / "scorer.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])


#: case -> (tampering, what the one error line says). Cases marked "before" were refused before issue 29 too.
BUNDLE_CASES = {
    # 5: paths confined
    "graph file climbing out with ..": (_set("graphs", "scorer", "file", "../outside/scorer.onnx"), "climbs out"),
    "graph file at an absolute path": (_set("graphs", "scorer", "file", "/etc/passwd"), "absolute path"),
    "graph file a symlink out of the bundle": (_move_out("onnx/scorer.onnx"), "resolves outside the bundle"),
    "tokenizer folder climbing out": (_set("tokenizer", "folder", "../tokenizer"), "climbs out"),
    "tokenizer folder a symlink out": (_move_out("tokenizer"), "resolves outside the bundle"),
    "external data outside the bundle": (_swap_in_graph("../../outside.bin"), "names external data"),
    "external data at an absolute path": (_swap_in_graph("/etc/passwd"), "names external data"),
    "external data inside but not listed": (_swap_in_graph("weights.bin", "onnx/weights.bin"), "not in the manifest"),
    # 5: a complete file list
    "no file list (and a modified graph)": (_drop_files_and_flip, "missing key(s) files"),
    "a graph missing from the file list": (_edit(lambda m: m["files"].pop("onnx/scorer.onnx")), "not in the manifest"),
    "an unlisted tokenizer file": (_unlisted_tokenizer_file, "tokenizer/tokenizer.json is not in the manifest"),
    # 5: baked fields
    "num_timesteps edited 30 -> 5": (_set("scoring", "num_timesteps", 5), "scoring.num_timesteps = 5"),
    "lse_lambda edited": (_set("scoring", "lse_lambda", 5.0), "scoring.lse_lambda = 5.0"),
    "noise bank edited": (_set("noise", "bank_size", 1000), "noise.bank_size = 1000"),
    "context tokens edited": (_set("model", "context_tokens", "words"), "model.context_tokens"),
    "layers edited": (_edit(lambda m: m["layers"].pop()), "layers = "),
    # 8: manifest schema
    "a size that is not a number": (_set("files", "onnx/scorer.onnx", "size", "big"), "expected an integer"),
    "a graph file that is null": (_set("graphs", "scorer", "file", None), "graphs.scorer.file"),
    "no graphs": (_edit(lambda m: m.pop("graphs")), "missing key(s) graphs"),
    "an extra graph without a file": (_set("graphs", "extra", {"file": None}), "graphs.extra"),
    "num_timesteps not a number": (_set("scoring", "num_timesteps", "abc"), "scoring.num_timesteps"),
    "a batch profile upside down": (_set("export", "batch", [8, 4, 1]), "export.batch"),
    # before: hashes
    "before: a flipped byte in a graph": (_flip_byte("onnx/scorer.onnx"), "was modified (sha256 mismatch)"),
    "before: a truncated graph": (_truncate, "(truncated or replaced)"),
    "before: a missing file": (lambda b, o: (b / "tokenizer" / "vocab.json").unlink(), "is missing"),
    "before: another format version": (_set("format", "dsdkit-bundle/99"), "bundle format 'dsdkit-bundle/99'"),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_a_tampered_bundle_is_refused_before_onnx_runtime(case, exported, inputs, cli, tmp_path, no_onnxruntime):
    tamper, message = BUNDLE_CASES[case]
    bundle, outside = tmp_path / "bundle", tmp_path / "outside"
    shutil.copytree(exported, bundle)
    outside.mkdir()
    tamper(bundle, outside)
    out = tmp_path / "scores.json"
    result = cli.invoke(app, ["match", *map(str, inputs), "--bundle", str(bundle), *STEPS, "-o", str(out)])
    one_line_error(result, 7, str(bundle), message)
    assert no_onnxruntime == [] and not out.exists()


def test_an_untouched_copy_scores(exported, inputs, cli, tmp_path):
    """The control: the suite's copy of the bundle, untouched, is scored (the refusals above are the tampering's)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported, bundle)
    out = tmp_path / "scores.json"
    result = cli.invoke(app, ["match", *map(str, inputs), "--bundle", str(bundle), *STEPS, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["meta"]["scoring"]["lse_lambda"] == _manifest(bundle)["scoring"]["lse_lambda"]


def test_free_knobs_are_run_options_not_manifest_edits(exported):
    """S (within the noise bank) and normalisation change per run; the bundle's own fields stay as exported."""
    from dsdkit.runtime.matcher import Matcher

    with Matcher.from_bundle(exported, num_timesteps=5, overrides={"normalize": "uncond"}) as matcher:
        scoring = matcher.metadata()["scoring"]
    assert scoring["num_timesteps"] == 5 and scoring["normalize"] == "uncond"
    assert _manifest(exported)["scoring"]["num_timesteps"] == 30


def test_a_bundle_from_before_the_check_loads_with_one_line(exported, tmp_path, caplog, no_onnxruntime):
    """A bundle whose scorer graph records no export fields (every bundle written before issue 29) still opens when
    its files match their hashes, saying once that it predates the check and how to get it."""
    from dsdkit.runtime.bundle import Bundle

    from tests.conftest import strip_baked_fields

    bundle = tmp_path / "bundle"
    shutil.copytree(exported, bundle)
    strip_baked_fields(bundle / "onnx" / "scorer.onnx")
    _rehash(bundle, "onnx/scorer.onnx")
    with caplog.at_level("WARNING"):
        Bundle.open(bundle)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "exported before dsdkit recorded the scoring fields" in lines[0], lines
    assert "re-export it with `dsdkit export`" in lines[0] and no_onnxruntime == []


def test_the_onnx_reader_agrees_with_onnx(exported, tmp_path):
    """runtime/onnxfile.py reads ONNX without the onnx package: its field numbers are onnx.proto's, and it finds the
    external-data locations and metadata that onnx itself sees."""
    import onnx
    from dsdkit.runtime import onnxfile

    fields = {
        (onnx.ModelProto, "graph"): 7,
        (onnx.ModelProto, "metadata_props"): onnxfile._MODEL_METADATA,
        (onnx.ModelProto, "training_info"): 20,
        (onnx.ModelProto, "functions"): 25,
        (onnx.GraphProto, "node"): 1,
        (onnx.GraphProto, "initializer"): 5,
        (onnx.GraphProto, "sparse_initializer"): 15,
        (onnx.NodeProto, "attribute"): 5,
        (onnx.AttributeProto, "t"): 5,
        (onnx.AttributeProto, "g"): 6,
        (onnx.AttributeProto, "tensors"): 10,
        (onnx.AttributeProto, "graphs"): 11,
        (onnx.AttributeProto, "sparse_tensor"): 22,
        (onnx.AttributeProto, "sparse_tensors"): 23,
        (onnx.FunctionProto, "node"): 7,
        (onnx.FunctionProto, "attribute_proto"): 11,
        (onnx.SparseTensorProto, "values"): 1,
        (onnx.SparseTensorProto, "indices"): 2,
        (onnx.TrainingInfoProto, "initialization"): 1,
        (onnx.TrainingInfoProto, "algorithm"): 2,
        (onnx.TensorProto, "external_data"): onnxfile._TENSOR_EXTERNAL,
    }
    for (message, name), number in fields.items():
        assert message.DESCRIPTOR.fields_by_name[name].number == number, (message.__name__, name)
    graph = tmp_path / "g.onnx"
    graph.write_bytes(_external_graph("data/w.bin"))
    assert onnxfile.read_references(graph).locations == ["data/w.bin"]
    scorer = exported / "onnx" / "scorer.onnx"
    model = onnx.load(str(scorer), load_external_data=False)
    assert onnxfile.read_references(scorer).metadata == {p.key: p.value for p in model.metadata_props}


def test_the_scoring_schema_covers_every_knob():
    from dsdkit.runtime import schemas
    from dsdkit.runtime.config import ScoringConfig

    assert set(schemas._SCORING_FIELDS) == set(ScoringConfig.__dataclass_fields__)


# -- resume state (6) -------------------------------------------------------------------------------------------------


class Stop(BaseException):
    """Stands for a kill after the first saved chunk."""


def killed_after_first_save(run) -> None:
    """Run ``run()`` as a job killed right after its first chunk's state is saved."""
    import dsdkit.runtime.resume as resume

    save = resume._save

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise Stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resume, "_save", save_then_stop)
        with pytest.raises(Stop):
            run()


@pytest.fixture(scope="module")
def clean(exported, inputs):
    """An untouched run: its scores and UNet evaluations."""
    from dsdkit.jobs.match import match

    result = match(*inputs, bundle=exported, num_timesteps=1, chunk_size=1)
    return result.scores, result.meta["unet_evaluations"]


@pytest.fixture(scope="module")
def interrupted(exported, inputs, tmp_path_factory) -> Path:
    """The ``.partial`` folder of a run killed after its first chunk (one of three rows done)."""
    import dsdkit.runtime.resume as resume

    from dsdkit.jobs.match import match

    output = tmp_path_factory.mktemp("interrupted") / "scores.csv"
    killed_after_first_save(lambda: match(*inputs, bundle=exported, num_timesteps=1, chunk_size=1, output=output))
    folder = resume.partial_folder(output)
    assert json.loads((folder / "state.json").read_text())["done_rows"] == 1
    return folder


def _scores_edit(change):
    def tamper(folder: Path) -> None:
        scores = np.load(folder / "scores.npy")
        np.save(folder / "scores.npy", change(scores))

    return tamper


def _state_edit(change):
    def tamper(folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        state = change(state) or state
        (folder / "state.json").write_text(json.dumps(state))

    return tamper


def _cell(value):
    def change(scores):
        scores[0, 0] = value
        return scores

    return change


def _huge_scores(folder: Path) -> None:
    """A scores.npy header declaring 2^40 rows (and a state saying so): refused without reading, or allocating."""
    with open(folder / "scores.npy", "wb") as handle:
        np.lib.format.write_array_header_2_0(
            handle, {"descr": "<f8", "fortran_order": False, "shape": (1 << 40, len(CAPTIONS))}
        )
        handle.write(b"\0" * 64)
    _state_edit(lambda s: s.update(shape=[1 << 40, len(CAPTIONS)]))(folder)


def _predates_digest(state):
    state["format"] = "dsdkit-partial/1"
    del state["digest"]
    del state["dtype"]


RESUME_CASES = {
    "a score changed to 42.0": (_scores_edit(_cell(42.0)), "do not match their digest"),
    "a score changed to NaN": (_scores_edit(_cell(np.nan)), "do not match their digest"),
    "a score changed to inf": (_scores_edit(_cell(np.inf)), "do not match their digest"),
    "scores of another dtype": (_scores_edit(lambda s: s.astype(np.float32)), "not float64"),
    "done_rows raised 1 -> 3": (_state_edit(lambda s: s.update(done_rows=3)), "do not match their digest"),
    "an injected skipped image": (
        _state_edit(lambda s: s["notes"]["skipped_images"].update({"1": "injected"})),
        "do not match their digest",
    ),
    "done_rows not a number": (_state_edit(lambda s: s.update(done_rows="abc")), "done_rows: expected an integer"),
    "done_rows null": (_state_edit(lambda s: s.update(done_rows=None)), "done_rows: expected an integer"),
    "the state a list": (_state_edit(lambda s: [s]), "expected an object"),
    "malformed notes": (
        _state_edit(lambda s: s["notes"].update(skipped_images=["0"])),
        "notes.skipped_images: expected an object",
    ),
    "a skipped image out of range": (
        _state_edit(lambda s: s["notes"]["skipped_images"].update({"7": "x"})),
        "not an image index",
    ),
    "unreadable state": (lambda f: (f / "state.json").write_text("{"), "state.json is unreadable"),
    "scores missing": (lambda f: (f / "scores.npy").unlink(), "scores.npy is missing"),
    "a huge array declared": (_huge_scores, "does not hold the"),
    "state from before the digest": (_state_edit(_predates_digest), "written by an earlier dsdkit"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_tampered_resume_state_is_discarded_and_rescored(case, exported, inputs, interrupted, clean, tmp_path, caplog):
    """Decision (docs/security.md): state that does not verify is discarded with one line and the job scored from
    the start; the result equals an untouched run's and nothing of the state reaches it."""
    from dsdkit.jobs.match import match

    tamper, reason = RESUME_CASES[case]
    output = tmp_path / "scores.csv"
    shutil.copytree(interrupted, tmp_path / "scores.csv.partial")
    tamper(tmp_path / "scores.csv.partial")
    with caplog.at_level("WARNING", logger="dsdkit.runtime.resume"):
        result = match(*inputs, bundle=exported, num_timesteps=1, chunk_size=1, output=output, resume=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "dsdkit.runtime.resume"]
    assert len(lines) == 1 and "discarding the partial results" in lines[0] and reason in lines[0], lines
    scores, evaluations = clean
    np.testing.assert_array_equal(result.scores, scores)
    assert result.meta["skipped"]["images"] == [] and result.meta["unet_evaluations"] == evaluations  # all rescored
    assert not (tmp_path / "scores.csv.partial").exists()


def test_untampered_resume_state_is_used(exported, inputs, interrupted, clean, tmp_path):
    """The control: the same folder untouched resumes (its row is kept, only the other two are scored)."""
    from dsdkit.jobs.match import match

    shutil.copytree(interrupted, tmp_path / "scores.csv.partial")
    output = tmp_path / "scores.csv"
    result = match(*inputs, bundle=exported, num_timesteps=1, chunk_size=1, output=output, resume=True)
    np.testing.assert_array_equal(result.scores, clean[0])
    assert result.meta["unet_evaluations"] < clean[1]


# -- job folders (6, 7, 8) --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned(exported, inputs, tmp_path_factory) -> Path:
    """A job of two shards ([0, 1) and [1, 3)) on the bundle, planned, nothing scored."""
    from dsdkit.jobs.shards import plan_job

    folder = tmp_path_factory.mktemp("planned") / "job"
    plan_job(*inputs, folder, 2, bundle=exported, num_timesteps=1, chunk_size=1)
    return folder


@pytest.fixture(scope="module")
def done(planned, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The job with both shards scored, and its merged scores."""
    from dsdkit.jobs.shards import merge_job, run_shard

    folder = tmp_path_factory.mktemp("done") / "job"
    shutil.copytree(planned, folder)
    run_shard(folder, 0)
    run_shard(folder, 1)
    return folder, merge_job(folder).scores


def _marker_edit(change, shard: int = 1):
    def tamper(job: Path) -> None:
        path = job / "scores" / f"part-{shard:05d}.done.json"
        marker = json.loads(path.read_text())
        change(marker)
        path.write_text(json.dumps(marker))

    return tamper


def _rewrite_part(change):
    """Rewrite shard 1's part with ``change(result)`` applied, and its marker's size and sha256 with it (a writer
    who keeps the two consistent): what must then be caught is the rows' labels."""

    def tamper(job: Path) -> None:
        from dsdkit.runtime.results import read_result, write_result

        part = job / "scores" / "part-00001.parquet"
        write_result(change(read_result(part)), part)
        data = part.read_bytes()
        _marker_edit(lambda m: m.update(part_bytes=len(data), part_sha256=hashlib.sha256(data).hexdigest()))(job)

    return tamper


def _rows_swapped(result):
    from dsdkit.runtime.results import MatchResult

    return MatchResult(result.images[::-1], result.captions, result.scores[::-1], result.meta)


def _labels_swapped(result):
    result.meta["job"]["image_ids"] = result.meta["job"]["image_ids"][::-1]
    return result


def _job_edit(change, refingerprint: bool = True):
    """Edit job.json; with ``refingerprint``, recompute its fingerprint as a careful writer would, so that the
    check under test is the schema's, not the fingerprint's."""

    def tamper(job: Path) -> None:
        from dsdkit.runtime.resume import job_fingerprint

        from dsdkit.jobs.shards import JobManifest

        document = json.loads((job / "job.json").read_text())
        change(document)
        if refingerprint:
            document["fingerprint"] = job_fingerprint({k: document.get(k) for k in JobManifest._COVERED})
        (job / "job.json").write_text(json.dumps(document))

    return tamper


def _flip_part(job: Path) -> None:
    _flip_byte("scores/part-00000.parquet")(job, job)


def _another_shards_marker(job: Path) -> None:
    shutil.copy(job / "scores" / "part-00000.done.json", job / "scores" / "part-00001.done.json")


JOB_CASES = {
    # 7: marker, part and job checked against each other
    "image_ids swapped": (_marker_edit(lambda m: m.update(image_ids=[2, 1])), "not strictly increasing"),
    "image_ids duplicated": (_marker_edit(lambda m: m.update(image_ids=[1, 1])), "not strictly increasing"),
    "image_ids out of the shard": (_marker_edit(lambda m: m.update(image_ids=[1, 7])), "image_ids[1]: 7 is outside"),
    "a part's rows swapped": (_rewrite_part(_rows_swapped), "row 0 is"),
    "a part's own labels swapped": (_rewrite_part(_labels_swapped), "its rows are images [2, 1]"),
    # 8: marker and job schemas
    "rows not a number": (_marker_edit(lambda m: m.update(rows="two")), "rows: expected an integer"),
    "evaluations not numbers": (_marker_edit(lambda m: m.update(unet_evaluations="many")), "unet_evaluations"),
    "an evaluation count not a number": (
        _marker_edit(lambda m: m["evaluations"].update(conditional="x")),
        "evaluations.conditional",
    ),
    "a skipped image outside the shard": (
        _marker_edit(lambda m: m["skipped"].append({"index": 99, "image": "x", "reason": "r"})),
        "skipped[0].index",
    ),
    "before: a marker that is a list": (
        lambda job: (job / "scores" / "part-00001.done.json").write_text("[]"),
        "marker",
    ),
    "job captions not a list": (_job_edit(lambda d: d.update(captions="abc")), "manifest (captions: expected a list"),
    "job shards outside the images": (
        _job_edit(lambda d: d.update(shards=[[0, 1], [1, 9]])),
        "manifest (shards: cover 9",
    ),
    "job pair ids out of range": (
        _job_edit(lambda d: d["scoring"].update(pairs={"source": "x", "pairs": [[5, 0]], "duplicates": 0})),
        "scoring.pairs.pairs[0]",
    ),
    "job image path not a string": (_job_edit(lambda d: d["images"][0].update(path=5)), "images[0].path"),
    # before
    "before: a part edited": (_flip_part, "is not the part its done marker"),
    "before: another shard's marker": (_another_shards_marker, "part-00001.done.json"),
    "before: a marker of another job": (_marker_edit(lambda m: m.update(job="f" * 64)), "belongs to another job"),
    "before: job.json edited": (
        _job_edit(lambda d: d["engine"].update(batch_size=64), refingerprint=False),
        "was changed after it was planned",
    ),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_a_tampered_job_folder_is_refused_at_merge(case, done, cli, tmp_path):
    tamper, message = JOB_CASES[case]
    job = tmp_path / "job"
    shutil.copytree(done[0], job)
    tamper(job)
    out = tmp_path / "merged.csv"
    result = cli.invoke(app, ["merge", str(job), "-o", str(out)])
    one_line_error(result, 11, message)
    assert not out.exists()


def test_an_untouched_job_merges(done, cli, tmp_path):
    """The control, and the part's own labels: each part records its job, shard and rows."""
    from dsdkit.runtime.results import read_result

    job = tmp_path / "job"
    shutil.copytree(done[0], job)
    result = cli.invoke(app, ["merge", str(job), "-o", str(tmp_path / "merged.csv")])
    assert result.exit_code == 0, result.output
    label = read_result(job / "scores" / "part-00001.parquet").meta["job"]
    assert label["shard"] == 1 and label["image_ids"] == [1, 2]


def test_a_shard_resumed_from_tampered_state_rescores_it(planned, done, exported, tmp_path, caplog):
    """A shard killed after its first chunk, its saved score edited: the rerun discards the state (one line) before
    anything of it reaches the part, whose hash the marker then records; the merge equals the untouched job's."""

    from dsdkit.jobs.shards import merge_job, run_shard

    job = tmp_path / "job"
    shutil.copytree(planned, job)
    for name in ("part-00000.parquet", "part-00000.done.json"):
        shutil.copy(done[0] / "scores" / name, job / "scores" / name)
    killed_after_first_save(lambda: run_shard(job, 1))
    _scores_edit(_cell(42.0))(job / "scores" / "part-00001.parquet.partial")
    with caplog.at_level("WARNING", logger="dsdkit.runtime.resume"):
        run_shard(job, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "dsdkit.runtime.resume"]
    assert len(lines) == 1 and "do not match their digest" in lines[0], lines
    np.testing.assert_array_equal(merge_job(job).scores, done[1])


# -- adapters (8, and the pickles refused before) ---------------------------------------------------------------------

FORMATS = Path(__file__).parents[1] / "data" / "formats"


def _adapter_header() -> dict:
    from safetensors import safe_open

    with safe_open(str(FORMATS / "kv-prompt.safetensors"), framework="numpy") as handle:
        return json.loads(handle.metadata()["dsdkit"])


def _adapter_file(path: Path, header_text: str) -> Path:
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, dtype=np.float32)}, str(path), metadata={"dsdkit": header_text})
    return path


def _header_edit(change):
    def make(path: Path) -> Path:
        header = _adapter_header()
        change(header)
        return _adapter_file(path, json.dumps(header))

    return make


ADAPTER_CASES = {
    "a header that is a list": (lambda p: _adapter_file(p, "[1, 2]"), "adapter format None"),
    "no scoring section": (_header_edit(lambda h: h.pop("scoring")), "missing key(s) scoring"),
    "num_timesteps not a number": (_header_edit(lambda h: h["scoring"].update(num_timesteps="abc")), "num_timesteps"),
    "layers not a list": (_header_edit(lambda h: h.update(layers="all")), "layers: expected a list"),
    "a rank that is not a number": (_header_edit(lambda h: h["adapter"].update(rank="8")), "adapter.rank"),
    "kinds that disagree": (_header_edit(lambda h: h["adapter"].update(kind="lora")), "adapter.kind"),
    "before: another format version": (_header_edit(lambda h: h.update(format="dsdkit-adapter/9")), "adapter format"),
    "before: not a safetensors file": (lambda p: (p.write_bytes(b"\x00" * 64), p)[1], "not a safetensors"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_a_bad_adapter_header_is_one_line(case, cli, tmp_path):
    make, message = ADAPTER_CASES[case]
    path = make(tmp_path / "adapter.safetensors")
    one_line_error(cli.invoke(app, ["adapters", "info", str(path)]), ModelError.exit_code, str(path), message)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_before_a_pickled_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    from dsdkit.pytorch.adapters import read_tensors_safely

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    torch = pytest.importorskip("torch")
    torch.save({"weight": _Exploit()}, path)
    with pytest.raises(ModelError, match="never executes pickled code"):
        read_tensors_safely(path)
    assert not (tmp_path / "pwned").exists()


# -- RefCOCOg pickles (8, and the restriction that held before) -------------------------------------------------------


def _declaring(opcode: bytes, size: int) -> bytes:
    """A protocol-5 pickle of a few bytes whose ``opcode`` declares a ``size``-byte string."""
    return b"\x80\x05" + opcode + struct.pack("<Q", size) + b"abc."


REFCOCOG_CASES = {
    "a 2^40-byte bytes object declared": (_declaring(b"\x8e", 1 << 40), "expected 1099511627776 bytes"),
    "a 2^40-byte bytearray declared": (_declaring(b"\x96", 1 << 40), "expected 1099511627776 bytes"),
    "a 2^40-byte string declared": (_declaring(b"\x8d", 1 << 40), "expected 1099511627776 bytes"),
    "before: not a list of refs": (pickle.dumps({"refs": []}, protocol=2), "expected a list of referring expressions"),
    "before: a pickle that runs code": (pickle.dumps([_Exploit()], protocol=2), "never executes code"),
    "before: a truncated pickle": (pickle.dumps([{"a": 1}], protocol=2)[:-3], "not a readable pickle"),
}


@pytest.mark.parametrize("case", list(REFCOCOG_CASES))
def test_a_bad_refcocog_pickle_is_one_line(case, tmp_path, monkeypatch):
    from dsdkit.jobs.datasets import load_dataset

    data, message = REFCOCOG_CASES[case]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "refs(google).p"
    path.write_bytes(data)
    with pytest.raises(InputError) as caught:
        load_dataset(path, fmt="refcocog")
    assert str(path) in str(caught.value) and message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 3 and not (tmp_path / "pwned").exists()


def test_malformed_refcocog_records_are_skipped_with_their_reason(tmp_path):
    """A record of the wrong shape is a bad row of the dataset (reported, skipped), never a crash."""
    from dsdkit.jobs.datasets import read_refcocog

    good = {"image_id": 1, "ref_id": 0, "split": "train", "sentences": [{"sent": "a red circle"}]}
    refs = [
        good,
        {**good, "ref_id": 1, "sentences": [{"sent": "a blue square"}]},
        {**good, "image_id": "x"},
        {**good, "image_id": 10**13},
        {**good, "sentences": "a sentence"},
        "not a ref",
    ]
    path = tmp_path / "refs(google).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    dataset = read_refcocog(path, tmp_path)
    assert len(dataset.examples) == 2
    reasons = [why for _, why in dataset.skipped]
    assert len(reasons) == 4 and "image_id: expected an integer" in reasons[0] and "is outside" in reasons[1]
