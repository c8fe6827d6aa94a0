"""Atomic writes: a full disk is a one-line OutputError naming the file, the previous file under the final name is
byte-identical afterwards, and no temporary file or folder is left behind -- for every kind of artifact dsdkit writes.

A full disk is simulated two ways: ``os.fsync`` failing with ENOSPC (where network and copy-on-write file systems
report it), and a short write (half the bytes reach the temporary file, then ENOSPC). The last tests use the real
``/dev/full`` device, whose writes the kernel fails with ENOSPC.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime import files
from dsdkit.runtime.errors import DsdkitError, OutputError
from dsdkit.runtime.results import MatchResult, write_result

NO_SPACE = "No space left on device"


# -- helpers -------------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``, hidden ones included: file -> bytes, folder -> None."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of the atomic writers (``.NAME.XXXX.tmp``, ``.staging``, ``.old``)."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob(".*") if p.name.endswith((".tmp", ".staging", ".old"))
    )


def assert_disk_full_error(error: BaseException, path: Path) -> None:
    assert isinstance(error, OutputError) and isinstance(error, DsdkitError), repr(error)
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert "disk is full" in message and "no space left" in message, message


def fail_fsync(monkeypatch):
    """Every fsync fails with ENOSPC."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(os, "fsync", fsync)


class _ShortWriter:
    """A file handle whose first write stores half of the data, then fails with ENOSPC."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: max(1, len(data) // 2)])
        self._handle.flush()
        raise OSError(errno.ENOSPC, NO_SPACE)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()
        return False

    def __getattr__(self, name):
        return getattr(self._handle, name)


def fail_writes(monkeypatch):
    """Handles opened by the atomic writer (runtime.files) store half their data, then fail with ENOSPC."""
    real = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda *args, **kwargs: _ShortWriter(real(*args, **kwargs)))


def fail_path_writes(monkeypatch):
    """``Path.write_bytes``/``write_text`` (used inside staged folders) store half their data, then fail."""
    real_bytes, real_text = Path.write_bytes, Path.write_text

    def write_bytes(self, data):
        real_bytes(self, data[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, NO_SPACE)

    def write_text(self, data, *args, **kwargs):
        real_text(self, data[: max(1, len(data) // 2)], *args, **kwargs)
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)


INJECTIONS = {"fsync": fail_fsync, "short-write": fail_writes}


# -- match results -------------------------------------------------------------------------------------------------


def _result(seed: int) -> MatchResult:
    rng = np.random.default_rng(seed)
    return MatchResult(
        images=["a.png", "b.png"],
        captions=["a cat", "a dog", "a cow"],
        scores=rng.normal(size=(2, 3)),
        meta={"seed": seed},
    )


@pytest.mark.parametrize("inject", INJECTIONS)
@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_match_result_on_a_full_disk(tmp_path, monkeypatch, suffix, inject):
    target = write_result(_result(0), tmp_path / f"scores{suffix}")
    before = snapshot(tmp_path)
    INJECTIONS[inject](monkeypatch)
    with pytest.raises(OutputError) as caught:
        write_result(_result(1), target)
    monkeypatch.undo()
    assert_disk_full_error(caught.value, target)
    assert leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before  # the previous result, byte for byte, and nothing else


def test_match_result_into_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    fail_writes(monkeypatch)
    with pytest.raises(OutputError) as caught:
        write_result(_result(0), tmp_path / "scores.json")
    monkeypatch.undo()
    assert_disk_full_error(caught.value, tmp_path / "scores.json")
    assert list(tmp_path.iterdir()) == []


# -- adapters ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_model(micro_model_dir):
    from dsdkit.pytorch.models import load_model

    return load_model(micro_model_dir, device="cpu", dtype="fp32")


@pytest.mark.parametrize("inject", INJECTIONS)
def test_adapter_save_on_a_full_disk(micro_model, tmp_path, monkeypatch, inject):
    import torch
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.adapters import AdapterConfig, create_adapter, read_adapter_header, save_adapter

    scoring = ScoringConfig.from_preset("discffusion")
    adapter = create_adapter(micro_model, scoring, AdapterConfig(kind="kv-prompt"))
    target = save_adapter(adapter, tmp_path / "adapter.safetensors", micro_model.identity(), scoring)
    before = snapshot(tmp_path)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(1.0)  # a different adapter: the failed save would change the file
    INJECTIONS[inject](monkeypatch)
    with pytest.raises(OutputError) as caught:
        save_adapter(adapter, target, micro_model.identity(), scoring, extra={"trained_steps": 7})
    monkeypatch.undo()
    assert_disk_full_error(caught.value, target)
    assert leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before
    assert "trained_steps" not in read_adapter_header(target)  # still the first, complete file


# -- training checkpoints ------------------------------------------------------------------------------------------


def _training_objects():
    import torch

    weight = torch.nn.Parameter(torch.arange(6, dtype=torch.float32))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.sum().backward()
    optimizer.step()  # optimizer moments exist and are saved
    loss_module = torch.nn.Linear(1, 1)
    generator = torch.Generator().manual_seed(0)
    return weight, optimizer, loss_module, generator


def _adapter_bytes(weight) -> bytes:
    from safetensors.torch import save

    return save({"weight": weight.detach().clone()})


CHECKPOINT_INJECTIONS = {"fsync": fail_fsync, "short-write": fail_path_writes}


@pytest.mark.parametrize("inject", CHECKPOINT_INJECTIONS)
@pytest.mark.parametrize("step", [4, 2], ids=["new-step", "same-step-again"])
def test_checkpoint_on_a_full_disk(tmp_path, monkeypatch, inject, step):
    from dsdkit.train.checkpoint import TrainerState, latest_checkpoint, save_checkpoint

    run = tmp_path / "run"
    weight, optimizer, loss_module, generator = _training_objects()
    good = save_checkpoint(
        run,
        _adapter_bytes(weight),
        optimizer,
        loss_module,
        generator,
        TrainerState(step=2, epoch=0, position=4, history=[{"step": 2}]),
    )
    before = snapshot(tmp_path)
    weight.data.add_(1.0)
    CHECKPOINT_INJECTIONS[inject](monkeypatch)
    with pytest.raises(OutputError) as caught:
        save_checkpoint(
            run,
            _adapter_bytes(weight),
            optimizer,
            loss_module,
            generator,
            TrainerState(step=step, epoch=1, position=0, history=[{"step": step}]),
        )
    monkeypatch.undo()
    assert_disk_full_error(caught.value, run / "checkpoints" / f"step-{step:08d}")
    assert leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before  # the good checkpoint and latest.json, byte for byte; no new step folder
    assert latest_checkpoint(run) == good


# -- bundles -------------------------------------------------------------------------------------------------------


def _fake_export(monkeypatch, tmp_path: Path) -> None:
    """Make ``export_bundle`` cheap: no model, one small 'graph' file, no parity; the staging, the manifest write and
    the move into place are the real ones."""
    from dsdkit.export import bundle as bundle_module
    from dsdkit.runtime.bundle import BUNDLE_FORMAT

    import dsdkit.pytorch.scorer

    model_dir = tmp_path / "model"
    (model_dir / "tokenizer").mkdir(parents=True)
    (model_dir / "tokenizer" / "vocab.json").write_text("{}")
    scorer = types.SimpleNamespace(model=types.SimpleNamespace(folder=model_dir))
    exports = []

    def export_graphs(scorer, staging, manifest, config, *steps):
        exports.append(staging)
        (staging / "onnx").mkdir()
        (staging / "onnx" / "scorer.onnx").write_bytes(b"graph %d\n" % len(exports) * 1000)
        return {"scorer": 0.0}

    monkeypatch.setattr(dsdkit.pytorch.scorer, "build_scorer", lambda *args, **kwargs: scorer)
    monkeypatch.setattr(
        bundle_module, "_base_manifest", lambda *args: {"format": BUNDLE_FORMAT, "export": {}, "graphs": {}}
    )
    monkeypatch.setattr(bundle_module, "_export_graphs", export_graphs)
    # The fake manifest and graph are no real bundle: the export's final read-back checks only the files' hashes.
    monkeypatch.setattr(bundle_module.Bundle, "open", classmethod(lambda cls, path: _files_verified(path)))


def _files_verified(path: Path):
    """The bundle at ``path`` with every listed file's size and sha256 checked (the fakes here are not real bundles,
    so the schema and graph checks of ``Bundle.open`` do not apply)."""
    from dsdkit.runtime.bundle import Bundle

    bundle = Bundle(Path(path), json.loads((Path(path) / "manifest.json").read_text()))
    bundle.verify()
    return bundle


@pytest.mark.parametrize("inject", INJECTIONS)
def test_bundle_export_on_a_full_disk_keeps_the_previous_bundle(tmp_path, monkeypatch, inject):
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle

    _fake_export(monkeypatch, tmp_path)
    config = ExportConfig(engines=False, parity=ParitySettings(enabled=False))
    out = tmp_path / "bundles" / "b"
    export_bundle("model", out, config=config)
    before = snapshot(out.parent)
    INJECTIONS[inject](monkeypatch)
    with pytest.raises(OutputError) as caught:
        export_bundle("model", out, config=config, overwrite=True)
    monkeypatch.undo()
    assert_disk_full_error(caught.value, out)
    assert leftovers(out.parent) == []
    assert snapshot(out.parent) == before  # the previous bundle, byte for byte, and no staging folder
    _files_verified(out)


def test_bundle_manifest_update_on_a_full_disk(tmp_path, monkeypatch):
    """``dsdkit build-engines`` rewrites manifest.json in place: a full disk keeps the old one."""
    import dsdkit.export.bundle as bundle_module
    import dsdkit.export.tensorrt as tensorrt_module
    from dsdkit.export.bundle import add_engines
    from dsdkit.runtime.bundle import BUNDLE_FORMAT, file_records

    bundle = tmp_path / "bundle"
    (bundle / "onnx").mkdir(parents=True)
    (bundle / "onnx" / "scorer.onnx").write_bytes(b"graph" * 100)
    manifest = {"format": BUNDLE_FORMAT, "graphs": {}, "files": file_records(bundle), "engines": {"built": False}}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    old_manifest = (bundle / "manifest.json").read_bytes()

    def build_engines(bundle_dir, manifest, workspace_gb=None):
        (bundle_dir / "engines").mkdir()
        (bundle_dir / "engines" / "scorer.plan").write_bytes(b"plan")
        return {"built": True}

    monkeypatch.setattr(tensorrt_module, "build_engines", build_engines)
    monkeypatch.setattr(bundle_module.Bundle, "open", classmethod(lambda cls, path: _files_verified(path)))
    fail_fsync(monkeypatch)
    with pytest.raises(OutputError) as caught:
        add_engines(bundle)
    monkeypatch.undo()
    assert_disk_full_error(caught.value, bundle / "manifest.json")
    assert (bundle / "manifest.json").read_bytes() == old_manifest
    assert leftovers(tmp_path) == []
    assert _files_verified(bundle).manifest["engines"] == {"built": False}


def _fake_tensorrt(monkeypatch, save):
    """Stand-ins for ``tensorrt`` and Polygraphy's loaders; ``save(path)`` plays SaveEngine writing the plan."""
    trt = types.ModuleType("tensorrt")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    loaders = types.ModuleType("polygraphy.backend.trt")

    class Profile(dict):
        def add(self, name, **shapes):
            self[name] = shapes

    class SaveEngine:
        def __init__(self, engine, path):
            self.path = path

        def __call__(self):
            save(Path(self.path))

    loaders.Profile, loaders.SaveEngine = Profile, SaveEngine
    loaders.CreateConfig = loaders.EngineFromNetwork = loaders.NetworkFromOnnxPath = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "polygraphy", types.ModuleType("polygraphy"))
    monkeypatch.setitem(sys.modules, "polygraphy.backend", types.ModuleType("polygraphy.backend"))
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", loaders)


def test_engine_build_on_a_full_disk_keeps_the_previous_engine(tmp_path, monkeypatch):
    from dsdkit.export.tensorrt import build_engine

    engines = tmp_path / "engines"
    engines.mkdir()
    plan = engines / "scorer.plan"
    plan.write_bytes(b"previous engine" * 100)
    (engines / "timing.cache").write_bytes(b"previous cache")
    before = snapshot(tmp_path)

    def save(path):
        path.write_bytes(b"half an eng")
        raise OSError(errno.ENOSPC, NO_SPACE)

    _fake_tensorrt(monkeypatch, save)
    profile = {"latents": {"min": [1], "opt": [2], "max": [4]}}
    with pytest.raises(OutputError) as caught:
        build_engine(tmp_path / "scorer.onnx", plan, profile, engines / "timing.cache")
    assert_disk_full_error(caught.value, plan)
    assert leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before

    # A successful build replaces the plan whole.
    _fake_tensorrt(monkeypatch, lambda path: path.write_bytes(b"new engine"))
    build_engine(tmp_path / "scorer.onnx", plan, profile, engines / "timing.cache")
    assert plan.read_bytes() == b"new engine" and leftovers(tmp_path) == []


# -- models, data sets, heat maps ----------------------------------------------------------------------------------


def test_tiny_model_on_a_full_disk_keeps_the_previous_model(micro_model_dir, tmp_path, monkeypatch):
    from dsdkit.pytorch.tiny import write_tiny_model

    folder = tmp_path / "model"
    shutil.copytree(micro_model_dir, folder)
    before = snapshot(tmp_path)
    fail_fsync(monkeypatch)
    with pytest.raises(OutputError) as caught:
        write_tiny_model(folder, size="micro", seed=1, overwrite=True)
    monkeypatch.undo()
    assert_disk_full_error(caught.value, folder)
    assert leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


def test_tiny_data_on_a_full_disk_keeps_the_previous_data_file(tmp_path, monkeypatch):
    from dsdkit.world import write_colour_shapes

    data = write_colour_shapes(tmp_path, train=3, test=1, seed=0)
    before = snapshot(tmp_path)
    real = files.atomic_write_text

    def full_for_the_data_file(path, text):  # the images fit; the data file does not
        fail_writes(monkeypatch)
        real(path, text)

    from dsdkit.world import scenes

    monkeypatch.setattr(scenes, "atomic_write_text", full_for_the_data_file)  # the name scenes.py writes through
    with pytest.raises(OutputError) as caught:
        write_colour_shapes(tmp_path, train=3, test=1, seed=0)
    monkeypatch.undo()
    assert_disk_full_error(caught.value, data)
    assert leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


def test_heat_map_png_on_a_full_disk(tmp_path, monkeypatch):
    from dsdkit.pytorch.explain import Explanation, render_heat_maps

    rng = np.random.default_rng(0)
    explanation = Explanation(
        tokens=["a", "cat"],
        maps=rng.random((2, 8, 8), dtype=np.float32),
        layer_scores=np.zeros((1, 2)),
        timesteps=[500],
        pixels=rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32),
    )
    target = render_heat_maps(explanation, tmp_path / "heat.png", caption="a cat")
    before = snapshot(tmp_path)
    fail_writes(monkeypatch)
    with pytest.raises(OutputError) as caught:
        render_heat_maps(explanation, target, caption="another caption")
    monkeypatch.undo()
    assert_disk_full_error(caught.value, target)
    assert leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


# -- the writer itself ---------------------------------------------------------------------------------------------


def test_staged_folder_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("from the previous run")
    with files.staged_folder(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.")
        assert not (target / "new.txt").exists()  # nothing appears under the final name before the end
        (staging / "new.txt").write_text("new")
    assert snapshot(tmp_path) == {"out": None, "out/new.txt": b"new"}


def test_staged_folder_passes_other_errors_through_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("kept")
    with pytest.raises(KeyError):
        with files.staged_folder(target) as staging:
            (staging / "half.txt").write_text("half")
            raise KeyError("not a disk problem")
    assert snapshot(tmp_path) == {"out": None, "out/kept.txt": b"kept"}


def test_staged_folder_keeps_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("kept")
    real = os.replace

    def replace(source, destination):
        if Path(source).name.endswith(".staging"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        real(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match=f"cannot write {target}: Device or resource busy"):
        with files.staged_folder(target) as staging:
            (staging / "new.txt").write_text("new")
    monkeypatch.undo()
    assert snapshot(tmp_path) == {"out": None, "out/kept.txt": b"kept"}


def test_new_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files; a result or bundle must be readable as any other file the user writes."""
    files.atomic_write_text(tmp_path / "new.txt", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "private.txt").write_text("old")
    os.chmod(tmp_path / "private.txt", 0o600)
    files.atomic_write_text(tmp_path / "private.txt", "new")
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600  # an existing file keeps its own


def test_other_write_errors_are_one_line_output_errors(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output\nerror")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputError) as caught:
        files.atomic_write_text(tmp_path / "x.json", "{}")
    monkeypatch.undo()
    assert (
        str(caught.value) == f"cannot write {tmp_path / 'x.json'}: Input/output error; check the folder's "
        "permissions and free space"
    )
    assert list(tmp_path.iterdir()) == []


# -- a real full device ----------------------------------------------------------------------------------------------

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full is Linux-only")


@needs_dev_full
def test_dev_full_fails_writes_with_enospc():
    with pytest.raises(OSError) as caught:
        with open("/dev/full", "wb") as handle:
            handle.write(b"x" * 10)
            handle.flush()
    assert caught.value.errno == errno.ENOSPC


@needs_dev_full
@pytest.mark.parametrize("size", [10, 3 << 20], ids=["buffered", "larger-than-the-buffer"])
def test_atomic_writer_maps_a_real_enospc(tmp_path, monkeypatch, size):
    """The temporary file is opened on /dev/full, so the kernel itself refuses the bytes."""
    target = tmp_path / "scores.csv"
    target.write_bytes(b"previous result\n")
    temporary = tmp_path / ".scores.csv.devfull.tmp"

    def mkstemp(prefix="", suffix="", dir=None):
        return os.open("/dev/full", os.O_WRONLY), str(temporary)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OutputError) as caught:
        files.atomic_write_bytes(target, b"y" * size)
    monkeypatch.undo()
    assert_disk_full_error(caught.value, target)
    assert snapshot(tmp_path) == {"scores.csv": b"previous result\n"}


@needs_dev_full
def test_match_result_to_dev_full_is_an_output_error(tmp_path, monkeypatch):
    """The whole result path (write_result -> atomic_writer) against the real device."""

    def mkstemp(prefix="", suffix="", dir=None):
        return os.open("/dev/full", os.O_WRONLY), str(tmp_path / ".scores.json.devfull.tmp")

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OutputError) as caught:
        write_result(_result(0), tmp_path / "scores.json")
    assert_disk_full_error(caught.value, tmp_path / "scores.json")
    assert list(tmp_path.iterdir()) == []


def test_bytes_of_an_io_buffer_are_written_whole(tmp_path):
    """Sanity: the injections above fail only because of them (a normal write of the same data succeeds)."""
    buffer = io.BytesIO(b"z" * (3 << 20))
    files.atomic_write_bytes(tmp_path / "big.bin", buffer.getvalue())
    assert (tmp_path / "big.bin").read_bytes() == buffer.getvalue() and leftovers(tmp_path) == []
