"""TensorRT engines (``trt`` + ``gpu`` markers): build a tiny engine per graph and compare it with ONNX Runtime.

These run wherever ``import tensorrt`` works and a CUDA GPU is visible; elsewhere they skip with the reason (our CI
machines cannot install TensorRT: its libraries come only from NVIDIA's package index).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.trt, pytest.mark.gpu]


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


@pytest.mark.parametrize("case", ["discffusion-kv-prompt", "discffusion-fp16"])
def test_tiny_engines_match_onnxruntime(case, export_case, tmp_path):
    import shutil

    from dsdkit.export import add_engines
    from dsdkit.runtime.backends import OrtRunner
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    source, _ = export_case(case)
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    manifest = add_engines(bundle)
    engines = manifest["engines"]
    assert engines["built"] and set(engines["graphs"]) == set(manifest["graphs"])
    for name, meta in engines["graphs"].items():
        saved = json.loads((bundle / "engines" / f"{name}.json").read_text())
        assert saved["key"] == meta["key"] and saved["tensorrt"] == engines["tensorrt"]
        assert saved["profile"] == manifest["graphs"][name]["profile"]
    feeds = _feeds(manifest, batch=3, rng=np.random.default_rng(0))
    for name, graph in manifest["graphs"].items():
        expected = OrtRunner(bundle / graph["file"], ["CPUExecutionProvider"]).infer(feeds[name])
        engine = EngineFromBytes(BytesFromPath(str(bundle / engines["graphs"][name]["file"])))
        with TrtRunner(engine) as runner:
            got = runner.infer(feeds[name])
        for output, value in expected.items():
            atol = 5e-3 if graph["precision"] == "fp16" else 1e-3
            np.testing.assert_allclose(
                np.asarray(got[output], dtype=np.float64), value, atol=atol, rtol=atol, err_msg=f"{name}.{output}"
            )
