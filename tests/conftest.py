"""Shared fixtures: seeded random-weight SD2-architecture models built once per session, generated images."""

from __future__ import annotations

import contextlib
import os

# Tests never touch the network: hub lookups must fail fast and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on one worker per core (pytest-xdist, `-n auto` in pyproject.toml): each worker and the command
    # lines it starts compute on one thread, so the workers do not spin against each other's thread pools (a second
    # busy process makes torch's spinning pool 10-100x slower). Set before torch loads; a value the user exported
    # wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    """`gpu`, `trt` and `ray` tests skip with a reason where the hardware or library is absent."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
        import ray.serve  # noqa: F401

        has_ray = True
    except ImportError:
        has_ray = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (`import tensorrt` fails on this machine)"))
        if "ray" in item.keywords and not has_ray:
            item.add_marker(pytest.mark.skip(reason='needs Ray Data and Serve: pip install -e ".[ray]"'))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dsdkit.pytorch.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """The smallest random-weight SD2-architecture model (fewer layers and channels than tiny)."""
    from dsdkit.pytorch.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("micro") / "model", size="micro", seed=0)


@pytest.fixture(scope="session")
def full_model_dir(tmp_path_factory):
    """The full-size SD2-2.1-base architecture with random weights (about 5 GB on disk; slow tests only)."""
    from dsdkit.pytorch.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("full") / "sd2-full", size="full")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from dsdkit.pytorch.models import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="fp32")


@contextlib.contextmanager
def one_torch_thread():
    """Score in this process with one torch thread, as sharded and Ray workers do: fp32 kernels may round
    differently with another thread count, and the job tests compare bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_shape_image(color: str, shape: str, size: tuple[int, int] = (96, 80), seed: int = 0):
    """A coloured shape on a lightly textured background (a deterministic function of its arguments)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    background = (235 + rng.integers(0, 20, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(w // 2, h // 4), (3 * w // 4, 3 * h // 4), (w // 4, 3 * h // 4)], fill=color)
    return image


@pytest.fixture(scope="session")
def shape_images():
    specs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    return [make_shape_image(c, s, seed=i) for i, (c, s) in enumerate(specs)]


@pytest.fixture(scope="session")
def image_factory():
    return make_shape_image


# -- exported bundles (shared by tests/export and tests/runtime) ---------------------------------------------------


def perturbed_adapter(model, scoring, kind: str, seed: int = 0, scale: float = 0.05):
    """An adapter of ``kind`` with every parameter random and non-zero, as after training."""
    import torch

    from dsdkit.pytorch.adapters import AdapterConfig, create_adapter

    adapter = create_adapter(model, scoring, AdapterConfig(kind=kind, init_seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return adapter


@pytest.fixture(scope="session")
def adapter_files(tiny_model, tmp_path_factory):
    """Trained-looking kv-prompt (discffusion config) and LoRA (paper config) adapter files."""
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.adapters import save_adapter

    folder = tmp_path_factory.mktemp("adapters")
    files = {}
    for kind, preset in (("kv-prompt", "discffusion"), ("lora", "paper")):
        scoring = ScoringConfig.from_preset(preset)
        adapter = perturbed_adapter(tiny_model, scoring, kind)
        files[kind] = save_adapter(adapter, folder / f"{kind}.safetensors", tiny_model.identity(), scoring)
    return files


@pytest.fixture(scope="session")
def export_case(tiny_model_dir, adapter_files, tmp_path_factory):
    """``export_case(name)`` -> (bundle path, manifest), exported at most once per session."""
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle

    cases = {
        "discffusion-kv-prompt": dict(adapters=adapter_files["kv-prompt"], config={}),
        "paper-lora": dict(adapters=adapter_files["lora"], preset="paper", config={}),
        "discffusion-fp16": dict(config={"precision": "fp16"}),
        "discffusion": dict(config={}),  # zero-shot fp32: comparable with the naive reference
    }
    done = {}

    def get(name):
        if name not in done:
            case = dict(cases[name])
            config = ExportConfig(
                exporter="torchscript", parity=ParitySettings(images=3, captions=3, timesteps=2), **case.pop("config")
            )
            out = tmp_path_factory.mktemp("bundles") / name
            manifest = export_bundle(tiny_model_dir, out, config=config, **case)
            done[name] = (out, manifest)
        return done[name]

    return get


@pytest.fixture(scope="session")
def pytorch_scores():
    """``pytorch_scores(model, manifest, adapters, images, captions, S)``: the unfolded PyTorch scorer with a bundle's
    scoring config (and an adapter file, if any) -- the reference every bundle test compares with."""

    def compute(model, bundle_manifest, adapters, images, captions, num_timesteps=None):
        from dsdkit.runtime.config import ScoringConfig

        from dsdkit.pytorch.adapters import load_adapter
        from dsdkit.pytorch.scorer import Scorer

        scoring = dict(bundle_manifest["scoring"])
        if num_timesteps is not None:
            scoring["num_timesteps"] = num_timesteps
        config = ScoringConfig.from_dict(scoring)
        adapter = load_adapter(adapters, model)[0] if adapters is not None else None
        return Scorer(model, config, batch_size=5, adapter=adapter).score(images, captions)

    return compute


# -- the fault suite's summary (records made by tests/test_fault_suite.py) ---------------------------------------

#: The ``user_properties`` key of a fault-suite record: ``[fault, command, crash or None, lost result or None]``.
FAULT_LEDGER = "fault_ledger"


def fault_summary(records) -> tuple[str, list[str]]:
    """The summary line and the sorted problem lines of fault-suite records.

    Built from the reports at the end of the session, not from a list that earlier tests fill, so that neither the
    line nor the problems depend on the order (or the selection) in which the tests ran.
    """
    tried, crashes, lost = 0, [], []
    for fault, command, crashed, missing in records:
        tried += 1
        if crashed:
            crashes.append(f"{fault} / {command}: {crashed}")
        if missing:
            lost.append(f"{fault} / {command}: {missing}")
    line = f"{tried} bad inputs tried, {len(crashes)} crashes, {len(lost)} results lost"
    return line, sorted(crashes + lost)


def pytest_terminal_summary(terminalreporter):
    """Print the fault suite's summary line when any of its tests ran (docs/match.md quotes it)."""
    records = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == FAULT_LEDGER
    ]
    if not records:
        return
    line, problems = fault_summary(records)
    terminalreporter.write_sep("-", "fault suite")
    terminalreporter.write_line(f"fault suite: {line}")
    for problem in problems:
        terminalreporter.write_line(f"  {problem}")


# -- bundles as dsdkit wrote them before the scorer graph recorded its export fields --------------------------------


def strip_baked_fields(graph) -> None:
    """Remove the export fields that ``dsdkit export`` appends to a scorer graph (``dsdkit.baked``), leaving the
    graph as earlier versions wrote it."""
    from dsdkit.runtime.bundle import BAKED_KEY
    from dsdkit.runtime.onnxfile import metadata_entry, read_references

    entry = metadata_entry(BAKED_KEY, read_references(graph).metadata[BAKED_KEY])
    data = graph.read_bytes()
    assert data.endswith(entry), "the export fields are not the last bytes of the graph"
    graph.write_bytes(data[: -len(entry)])
