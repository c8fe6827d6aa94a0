"""TensorRT engines: the cache key an engine is checked against (plain data, runs everywhere) and, with the ``trt`` +
``gpu`` markers, a tiny engine per graph compared with ONNX Runtime.

The engine tests run wherever ``import tensorrt`` works and a CUDA GPU is visible; elsewhere they skip with the
reason (our CI machines cannot install TensorRT: its libraries come only from NVIDIA's package index). The key tests
need neither: the loading path is driven with stand-ins for the ``tensorrt`` module and Polygraphy's loaders.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime import backends
from dsdkit.runtime.bundle import Bundle
from dsdkit.runtime.engine_key import ENGINE_KEY_FIELDS, check_engine_key, engine_cache_key, engine_key_fields
from dsdkit.runtime.errors import BundleError

MANIFEST = Path(__file__).parents[1] / "data" / "formats" / "bundle-kv-prompt.manifest.json"
ENGINE = Path("/bundles/b/engines/scorer.plan")
BUNDLE = Path("/bundles/b")


@pytest.fixture()
def manifest():
    return json.loads(MANIFEST.read_text())


def needed_for(manifest, tensorrt="10.9.0", compute_capability="9.0"):
    """What the scorer engine of the committed kv-prompt manifest needs, written out from the manifest's own
    records (not through engine_key_fields, which the tests check against this)."""
    return {
        "model": manifest["model"]["identity"],
        "adapter": manifest["adapter"]["sha256"],
        "graph": manifest["files"]["onnx/scorer.onnx"]["sha256"],
        "precision": "fp32",
        "profile": manifest["graphs"]["scorer"]["profile"],
        "tensorrt": tensorrt,
        "compute_capability": compute_capability,
    }


def built_like(fields):
    """Engine metadata as ``dsdkit build-engines`` writes it for ``fields``."""
    return {**fields, "gpu": "NVIDIA H200", "file": "engines/scorer.plan", "key": engine_cache_key(fields)}


# -- the key, as plain data ----------------------------------------------------------------------------------------


def test_key_fields_come_from_the_manifest(manifest):
    assert engine_key_fields(manifest, "scorer", "10.9.0", "9.0") == needed_for(manifest)
    # Without machine fields only the bundle's are stated (the runtime adds what it can find out itself).
    assert set(engine_key_fields(manifest, "scorer")) == set(ENGINE_KEY_FIELDS) - {"tensorrt", "compute_capability"}
    zero_shot = {**manifest, "adapter": None}
    assert engine_key_fields(zero_shot, "scorer")["adapter"] is None
    # Each graph has its own file, so its own key.
    keys = {engine_cache_key(engine_key_fields(manifest, name, "10.9.0", "9.0")) for name in manifest["graphs"]}
    assert len(keys) == len(manifest["graphs"])


def test_key_is_canonical_and_covers_every_field(manifest):
    fields = needed_for(manifest)
    key = engine_cache_key(fields)
    assert key == engine_cache_key(dict(reversed(list(fields.items()))))  # field order does not matter
    assert len(key) == 64 and int(key, 16) >= 0
    wider = copy.deepcopy(fields["profile"])
    wider["latents"]["max"][0] = 64
    for changed in (
        {"precision": "fp16"},
        {"profile": wider},
        {"tensorrt": "10.10.0"},
        {"compute_capability": "8.9"},
        {"adapter": None},
    ):
        assert engine_cache_key({**fields, **changed}) != key, changed


def test_matching_engine_is_accepted(manifest):
    check_engine_key(ENGINE, built_like(needed_for(manifest)), needed_for(manifest), BUNDLE)


def _other(field, value):
    if field == "profile":
        wider = copy.deepcopy(value)
        wider["latents"]["max"][0] = 64
        return wider
    if field == "adapter":
        return None  # a zero-shot bundle must not run an engine with an adapter folded in
    return {"precision": "fp16", "tensorrt": "10.10.0", "compute_capability": "8.9"}.get(field, "0" * 64)


LABELS = {
    "model": "model identity",
    "adapter": "adapter sha256",
    "graph": "graph sha256",
    "precision": "precision",
    "profile": "batch profile",
    "tensorrt": "TensorRT",
    "compute_capability": "compute capability",
}


@pytest.mark.parametrize("field", ENGINE_KEY_FIELDS)
def test_each_field_mismatch_is_refused(manifest, field):
    needed = needed_for(manifest)
    built = built_like({**needed, field: _other(field, needed[field])})
    with pytest.raises(BundleError) as caught:
        check_engine_key(ENGINE, built, needed, BUNDLE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{ENGINE}: ")
    assert LABELS[field] in message and message.count("built for") == 1
    assert f"`dsdkit build-engines {BUNDLE}`" in message
    if field in ("precision", "tensorrt", "compute_capability"):
        assert f"built for {built[field]}, needed {needed[field]}" in message
    if field == "graph":
        assert f"built for {'0' * 12}, needed {needed['graph'][:12]}" in message
    if field == "profile":  # the input whose shapes differ, not the whole profile
        assert 'batch profile of latents built for {"max":[64,4,16,16],' in message
        assert "states" not in message


def test_several_mismatches_name_the_first_ones(manifest):
    needed = needed_for(manifest)
    stale = {field: _other(field, needed[field]) for field in ENGINE_KEY_FIELDS}
    with pytest.raises(BundleError, match=r"model identity built for .* and 4 more\); rebuild") as caught:
        check_engine_key(ENGINE, built_like(stale), needed, BUNDLE)
    assert "precision" not in str(caught.value)  # the 4th field and later are only counted


def test_unrecorded_fields_and_edited_metadata_are_refused(manifest):
    needed = needed_for(manifest)
    old = built_like(needed)
    del old["compute_capability"]
    with pytest.raises(BundleError, match="compute capability built for not recorded, needed 9.0"):
        check_engine_key(ENGINE, old, needed, BUNDLE)
    edited = built_like(needed)
    edited["key"] = engine_cache_key({**needed, "precision": "fp16"})
    with pytest.raises(BundleError, match="metadata does not match its cache key"):
        check_engine_key(ENGINE, edited, needed, BUNDLE)


def test_a_field_the_machine_cannot_state_is_not_compared(manifest):
    needed = needed_for(manifest)
    built = built_like({**needed, "compute_capability": "8.9"})
    del needed["compute_capability"]  # no driver answered; deserialization still refuses a plan the GPU cannot run
    check_engine_key(ENGINE, built, needed, BUNDLE)


# -- the loading path: the key is checked before anything is deserialized ------------------------------------------


class FakeDriver:
    """The few CUDA driver calls gpu_compute_capability makes, answering for an sm 9.0 device."""

    def cuInit(self, flags):
        return 0

    def cuDeviceGet(self, handle, ordinal):
        handle._obj.value = ordinal
        return 0

    def cuDeviceGetAttribute(self, value, attribute, device):
        value._obj.value = {75: 9, 76: 0}[attribute]
        return 0


def test_compute_capability_from_the_driver(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver())
    assert backends.gpu_compute_capability() == "9.0"

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert backends.gpu_compute_capability() is None


@pytest.fixture()
def fake_tensorrt(monkeypatch):
    """``import tensorrt`` gives version 10.9.0; the GPU is sm 9.0; Polygraphy's engine loader records its calls."""
    import polygraphy.backend.trt as polygraphy_trt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(backends, "gpu_compute_capability", lambda device=0: "9.0")
    loaded = []

    class Runner:
        def __init__(self, engine):
            self.engine = engine

        def activate(self):
            pass

        def deactivate(self):
            pass

    monkeypatch.setattr(polygraphy_trt, "EngineFromBytes", lambda data: lambda: loaded.append(data) or "engine")
    monkeypatch.setattr(polygraphy_trt, "TrtRunner", Runner)
    return loaded


def _bundle_with_engine(manifest, tmp_path, built):
    manifest["engines"] = {"built": True, "tensorrt": built.get("tensorrt"), "graphs": {"scorer": built}}
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "scorer.plan").write_bytes(b"plan")
    return Bundle(tmp_path, manifest)


def test_trt_runner_loads_an_engine_that_matches(manifest, tmp_path, fake_tensorrt):
    bundle = _bundle_with_engine(manifest, tmp_path, built_like(needed_for(manifest)))
    runner = backends.make_runners(bundle, backend="tensorrt")["scorer"]
    runner.activate()
    assert len(fake_tensorrt) == 1 and runner._runner.engine == "engine"
    runner.close()


@pytest.mark.parametrize(
    "stale, fragment",
    [
        ({"tensorrt": "10.3.0"}, "TensorRT built for 10.3.0, needed 10.9.0"),
        ({"compute_capability": "8.6"}, "compute capability built for 8.6, needed 9.0"),
        ({"graph": "f" * 64}, "graph sha256 built for ffffffffffff"),
        ({"precision": "fp16"}, "precision built for fp16, needed fp32"),
    ],
)
def test_trt_runner_refuses_a_stale_engine_before_loading_it(manifest, tmp_path, fake_tensorrt, stale, fragment):
    bundle = _bundle_with_engine(manifest, tmp_path, built_like({**needed_for(manifest), **stale}))
    runner = backends.make_runners(bundle, backend="tensorrt")["scorer"]
    with pytest.raises(BundleError) as caught:
        runner.activate()
    assert fragment in str(caught.value)
    assert str(tmp_path / "engines" / "scorer.plan") in str(caught.value)
    assert f"`dsdkit build-engines {tmp_path}`" in str(caught.value)
    assert fake_tensorrt == []  # refused before deserializing


def test_key_of_an_exported_bundle_names_its_files_on_disk(export_case, adapter_files, tiny_model):
    """The fields an engine of a real export is keyed on are those of the files on disk and of the export."""
    path, manifest = export_case("discffusion-kv-prompt")
    manifest = Bundle.open(path).manifest
    adapter_sha = hashlib.sha256(Path(adapter_files["kv-prompt"]).read_bytes()).hexdigest()
    for name, graph in manifest["graphs"].items():
        fields = engine_key_fields(manifest, name, "10.9.0", "9.0")
        assert fields["graph"] == hashlib.sha256((path / graph["file"]).read_bytes()).hexdigest()
        assert fields["model"] == tiny_model.identity()
        assert fields["adapter"] == adapter_sha
        assert fields["precision"] == "fp32"
        batch = manifest["export"]["batch"]
        assert all(
            [shapes["min"][0], shapes["opt"][0], shapes["max"][0]] == batch for shapes in fields["profile"].values()
        )


# -- real engines (TensorRT and a GPU) -----------------------------------------------------------------------------


def _feeds(manifest, batch: int, rng):
    feeds = {}
    for name, graph in manifest["graphs"].items():
        feed = {}
        for tensor, spec in graph["inputs"].items():
            shape = [batch if d == "batch" else d for d in spec["shape"]]
            if spec["dtype"] == "int64":
                high = {"input_ids": 49407, "timestep": 1000, "noise_index": manifest["noise"]["bank_size"]}[tensor]
                feed[tensor] = rng.integers(0, high, shape).astype(np.int64)
            elif tensor == "token_mask":
                feed[tensor] = (rng.random(shape) > 0.3).astype(np.float32)
            else:
                feed[tensor] = rng.standard_normal(shape).astype(np.float32)
        feeds[name] = feed
    return feeds


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["discffusion-kv-prompt", "discffusion-fp16"])
def test_tiny_engines_match_onnxruntime(case, export_case, tmp_path):
    import tensorrt
    import torch
    from dsdkit.export import add_engines
    from dsdkit.runtime.backends import OrtRunner

    source, _ = export_case(case)
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    manifest = add_engines(bundle)
    engines = manifest["engines"]
    assert engines["built"] and set(engines["graphs"]) == set(manifest["graphs"])
    major, minor = torch.cuda.get_device_capability(0)
    assert backends.gpu_compute_capability() == f"{major}.{minor}"  # the runtime's driver probe agrees with torch
    for name, graph in manifest["graphs"].items():
        saved = json.loads((bundle / "engines" / f"{name}.json").read_text())
        assert saved["graph"] == hashlib.sha256((bundle / graph["file"]).read_bytes()).hexdigest()
        assert saved["tensorrt"] == tensorrt.__version__ and saved["compute_capability"] == f"{major}.{minor}"
        assert saved["precision"] == ("fp16" if "fp16" in case else "fp32")
        assert saved["key"] == engine_cache_key({field: saved[field] for field in ENGINE_KEY_FIELDS})
    feeds = _feeds(manifest, batch=3, rng=np.random.default_rng(0))
    # Through the runtime's own loading path, so the key check accepts engines built on this machine.
    runners = backends.make_runners(Bundle.open(bundle), backend="tensorrt")
    for name, graph in manifest["graphs"].items():
        expected = OrtRunner(bundle / graph["file"], ["CPUExecutionProvider"]).infer(feeds[name])
        with runners[name] as runner:
            got = runner.infer(feeds[name])
        for output, value in expected.items():
            atol = 5e-3 if graph["precision"] == "fp16" else 1e-3
            np.testing.assert_allclose(
                np.asarray(got[output], dtype=np.float64), value, atol=atol, rtol=atol, err_msg=f"{name}.{output}"
            )
