"""Every adapter kind x exporter x precision exports, and its bundle scores like PyTorch.

3 adapter kinds (none, kv-prompt, LoRA) x 2 exporters (dynamo, TorchScript) x 2 precisions (fp32, fp16) = 12 exports
of the micro model, each done once per module. Each bundle must open (every hash checked) and its runtime
:class:`~dsdkit.runtime.Matcher` must score fresh images and captions like the unfolded PyTorch scorer with the same
adapter file. One case goes through ``dsdkit export`` with its defaults (the dynamo exporter), one records the
library's progress callback.

Time: a dynamo export of the micro model takes ~80 s of CPU (``torch.export`` traces the UNet twice, both times with
a symbolic batch, in Python), a TorchScript one ~10 s. The exports are independent and single-threaded, so all but the
two in-process cases run in worker processes, one per CPU this process may use (two at most).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from tests.conftest import perturbed_adapter

KINDS = ("none", "kv-prompt", "lora")
EXPORTERS = ("dynamo", "torchscript")
PRECISIONS = ("fp32", "fp16")
CASES = list(itertools.product(KINDS, EXPORTERS, PRECISIONS))
CLI_CASE = ("none", "dynamo", "fp32")  # exported by `dsdkit export` with the default exporter
PROGRESS_CASE = ("kv-prompt", "torchscript", "fp32")  # exported here, recording the progress callback
PARITY = dict(images=2, captions=2, timesteps=1)
CAPTIONS = ["a red circle", "a blue square on a table", "two green triangles"]

# fp32: the graphs are the PyTorch computation reordered (folded adapter weights, ONNX Runtime's kernels); on the
# micro model the scores (~4.5) agree to ~1e-5 abs (2.5e-6 relative), as on the tiny model (test_export.py).
FP32_TOLERANCE = dict(atol=1e-5, rtol=1e-5)
# fp16: the export's own fp16 parity gate (export/bundle.py FP16_TOLERANCE). fp16 keeps 11 significant bits (4.9e-4
# relative per rounding) and the UNet's activations go through hundreds of roundings before the fp32 score islands;
# these bundles measure ~5e-4, ten times inside the gate.
FP16_TOLERANCE = dict(atol=5e-3, rtol=5e-3)


def case_id(case) -> str:
    return "-".join(case)


@pytest.fixture(scope="module")
def micro_model(micro_model_dir):
    from dsdkit.pytorch.models import load_model

    return load_model(micro_model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def micro_adapters(micro_model, tmp_path_factory):
    """Trained-looking kv-prompt and LoRA adapter files for the micro model (discffusion config; ``none``: no file).

    Perturbed three times as strongly as conftest's tiny-model adapters: at its scale (0.05) they move the micro
    model's scores (~4.5) by only ~8e-3, less than the fp16 tolerance, so an fp16 bundle that dropped its adapter would
    still agree with PyTorch. At 0.15 they move them by ~0.1 (LoRA) and ~0.7 (kv-prompt).
    """
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.adapters import save_adapter

    folder = tmp_path_factory.mktemp("micro-adapters")
    scoring = ScoringConfig.from_preset("discffusion")
    files = {"none": None}
    for kind in ("kv-prompt", "lora"):
        adapter = perturbed_adapter(micro_model, scoring, kind, scale=0.15)
        files[kind] = save_adapter(adapter, folder / f"{kind}.safetensors", micro_model.identity(), scoring)
    return files


def _export_config(case):
    from dsdkit.export import ExportConfig, ParitySettings

    _, exporter, precision = case
    return ExportConfig(exporter=exporter, precision=precision, parity=ParitySettings(**PARITY))


def _export_with_cli(model_dir, out):
    from typer.testing import CliRunner

    from dsdkit.cli import app

    args = ["export", "--model", str(model_dir), "--out", str(out), "--parity-size", "2", "--parity-timesteps", "1"]
    args += ["--batch", "1:4:8", "--license", "test-licence-1.0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text()), result.output


def _selected_cases(request) -> set:
    """The cases of this module's tests that this session runs (``-k`` and friends may deselect some)."""
    cases = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None and "case" in callspec.params:
            cases.add(callspec.params["case"])
    return cases


@pytest.fixture(scope="module")
def matrix_bundle(micro_model_dir, micro_adapters, tmp_path_factory, request):
    """``matrix_bundle(case)`` -> (bundle path, manifest, extra), each case exported once; ``extra`` is the CLI's
    output for :data:`CLI_CASE`, the progress calls for :data:`PROGRESS_CASE`, else ``None``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dsdkit.export import export_bundle
    from dsdkit.runtime.threads import configure_threads, default_threads

    root = tmp_path_factory.mktemp("matrix")
    # spawn: a fresh interpreter per worker (forking a process that has loaded torch is unsafe); one compute thread
    # each, set before the worker imports torch.
    pool = ProcessPoolExecutor(
        max_workers=min(2, default_threads()),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=configure_threads,
        initargs=(1,),
    )
    futures = {}

    def submit(case):
        adapters = micro_adapters[case[0]]
        futures[case] = pool.submit(
            export_bundle, micro_model_dir, root / case_id(case), adapters=adapters, config=_export_config(case)
        )

    # Every selected case starts now, dynamo first: the longest jobs start first, so the workers finish together.
    for case in sorted(_selected_cases(request) - {CLI_CASE, PROGRESS_CASE}, key=lambda c: (c[1] != "dynamo", c)):
        submit(case)
    done = {}

    def get(case):
        if case not in done:
            out = root / case_id(case)
            if case == CLI_CASE:
                done[case] = (out, *_export_with_cli(micro_model_dir, out))
            elif case == PROGRESS_CASE:
                calls = []
                manifest = export_bundle(
                    micro_model_dir,
                    out,
                    adapters=micro_adapters[case[0]],
                    config=_export_config(case),
                    progress=lambda *call: calls.append(call),
                )
                done[case] = (out, manifest, calls)
            else:
                if case not in futures:
                    submit(case)
                done[case] = (out, futures[case].result(), None)
        return done[case]

    yield get
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def reference(micro_model, micro_adapters, shape_images, pytorch_scores):
    """``reference(kind, manifest)``: the unfolded fp32 PyTorch scorer's matrix (S = 1) with that kind's adapter and
    the bundle's scoring config, computed once per (kind, config)."""
    done = {}

    def get(kind, manifest):
        key = (kind, json.dumps(manifest["scoring"], sort_keys=True))
        if key not in done:
            scores = pytorch_scores(micro_model, manifest, micro_adapters[kind], shape_images, CAPTIONS, 1)
            done[key] = np.asarray(scores)
        return done[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bundle_scores_like_pytorch(case, matrix_bundle, reference, shape_images):
    """The bundle opens, says what was exported, passed its own parity gate, and the runtime's scores on fresh
    inputs match the PyTorch scorer with the same adapter (fp32: 1e-5; fp16: the fp16 gate)."""
    from dsdkit.runtime import Matcher
    from dsdkit.runtime.bundle import Bundle

    kind, exporter, precision = case
    path, _, _ = matrix_bundle(case)
    manifest = Bundle.open(path).manifest  # every file's size and sha256 checked
    assert manifest["export"]["exporter"] == exporter and manifest["precision"] == precision
    assert (manifest["adapter"] or {}).get("header", {}).get("kind", "none") == kind
    assert ("condition" in manifest["graphs"]["scorer"]["inputs"]) == (kind == "kv-prompt")
    end = manifest["parity"]["end_to_end"]
    assert end["scores"]["ok"] and end["ranking"]["flips_beyond_tie"] == 0

    with Matcher.from_bundle(path, backend="onnxruntime", device="cpu", num_timesteps=1) as matcher:
        ours = np.asarray(matcher.score(shape_images, CAPTIONS))
    expected = reference(kind, manifest)
    assert ours.shape == expected.shape == (len(shape_images), len(CAPTIONS))
    np.testing.assert_allclose(ours, expected, **(FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE))
    if kind != "none":
        # The adapter was folded in, not dropped: it moves the scores far more than the export's error.
        effect = np.abs(expected - reference("none", manifest)).max()
        error = np.abs(ours - expected).max()
        assert effect > 10 * error, (effect, error)


def test_cli_export_defaults_to_dynamo(matrix_bundle, micro_model_dir):
    """`dsdkit export` without --exporter: the dynamo exporter, one external-data file, the options in the manifest,
    no progress bar when stderr is not a terminal, and no second export over an existing bundle."""
    from typer.testing import CliRunner

    from dsdkit.cli import app

    path, manifest, output = matrix_bundle(CLI_CASE)
    assert "verified (size and sha256)" in output and "dynamo exporter" in output
    assert "elapsed" not in output and "exporting" not in output  # the progress columns' words
    assert manifest["export"]["exporter"] == "dynamo"
    assert manifest["model"]["licence"] == "test-licence-1.0"
    assert manifest["export"]["batch"] == [1, 4, 8]
    latents = manifest["graphs"]["scorer"]["profile"]["latents"]
    assert latents == {"min": [1, 4, 16, 16], "opt": [4, 4, 16, 16], "max": [8, 4, 16, 16]}
    assert (path / "onnx" / "scorer.onnx.data").is_file()
    assert manifest["engines"]["built"] is False and "TensorRT" in manifest["engines"]["reason"]
    # Why there are no engines is said once per export (issue 31: it was printed twice on every CPU export).
    assert output.count("TensorRT engines not built") == 1 and output.count(manifest["engines"]["reason"]) == 1

    again = CliRunner().invoke(app, ["export", "--model", str(micro_model_dir), "--out", str(path)])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output


def test_export_reports_progress(matrix_bundle):
    """``progress(stage, done, total)``: once before each step, counting up by one, then ``done == total``."""
    _, _, calls = matrix_bundle(PROGRESS_CASE)
    assert [stage for stage, _, _ in calls] == [
        "loading the model",
        "exporting text_encoder",
        "exporting image_encoder",
        "exporting scorer",
        "parity: PyTorch",
        "parity: ONNX Runtime",
        "done",
    ]
    assert [done for _, done, _ in calls] == list(range(len(calls)))
    assert {total for _, _, total in calls} == {len(calls) - 1}


def test_dynamo_exports_children_named_like_graph_module_attributes(tmp_path):
    """The kv-prompt failure's cause on its own: torch.export turns the exported module into a
    ``torch.fx.GraphModule``, whose own attributes (``meta``, ``graph``, ``code``) shadowed top-level children of
    those names ("Node meta_0_weight target meta.0.weight references nonexistent attribute 0 of meta")."""
    import onnxruntime as ort
    import torch
    from dsdkit.export.specs import BATCH, ExportSpec, TensorSpec
    from dsdkit.export.to_onnx import export_graph

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.meta = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
            self.graph = torch.nn.Linear(4, 4)
            self.code = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.code(self.graph(self.meta(x)))

    module = Graph().eval()
    spec = ExportSpec("graph", [TensorSpec("x", "float32", (BATCH, 3))], [TensorSpec("y", "float32", (BATCH, 2))])
    export_graph(module, spec, tmp_path / "graph.onnx", exporter="dynamo")
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)  # another batch than the dummy's 2
    session = ort.InferenceSession(str(tmp_path / "graph.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)
