"""Offline use never touches the network; code and pickles shipped in a model folder never run (issue 7).

- With ``HF_HUB_OFFLINE=1``, loading a model folder and scoring, resolving a hub id that is not cached, and opening
  and scoring an exported bundle make no connection and no DNS lookup (``socket`` is patched to record and refuse).
- A model folder carrying Python files (a custom pipeline, custom model classes) referenced from ``auto_map`` /
  ``model_index.json``, and pickled ``.bin`` weights whose unpickling would run code, loads from its safetensors
  with nothing of that executed, and ``trust_remote_code`` is never requested.

Each guard is shown to work in the test that relies on it (a connection attempt is caught, the planted code and
pickles do create their sentinel files when run), so none of these checks can pass vacuously.
"""

from __future__ import annotations

import json
import pickle
import runpy
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from dsdkit.runtime.errors import ModelError

CAPTIONS = ["a red circle", "a blue square"]


class NetworkAttempted(RuntimeError):
    """Raised (and recorded) by the patched socket functions."""


@pytest.fixture
def no_network(monkeypatch):
    """Patch every Python-level way to resolve a name or open a connection; returns the list of attempts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[tuple[str, tuple]] = []

    def refuse(name):
        def guard(*args, **kwargs):
            attempts.append((name, args))
            raise NetworkAttempted(f"{name}{args!r}: dsdkit tried to use the network while offline")

        return guard

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))

    # The guard really catches each way in (the check cannot pass because the patch missed).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(NetworkAttempted):
            sock.connect(("127.0.0.1", 9))
        with pytest.raises(NetworkAttempted):
            sock.connect_ex(("127.0.0.1", 9))
    with pytest.raises(NetworkAttempted):
        socket.create_connection(("huggingface.co", 443), timeout=0.1)
    with pytest.raises(NetworkAttempted):
        socket.getaddrinfo("huggingface.co", 443)
    import urllib.request

    with pytest.raises(Exception):  # noqa: B017 - urllib wraps the guard's error in URLError
        urllib.request.urlopen("https://huggingface.co/api/models/stabilityai/stable-diffusion-2-1-base", timeout=1)
    assert [name for name, _ in attempts][:4] == [
        "socket.connect",
        "socket.connect_ex",
        "socket.create_connection",
        "socket.getaddrinfo",
    ]
    assert len(attempts) >= 5  # urllib got as far as a lookup or a connect, and was caught
    attempts.clear()
    return attempts


def test_offline_model_load_and_scoring_open_no_connection(no_network, tiny_model_dir, shape_images):
    from dsdkit import Scorer, ScoringConfig, load_model

    model = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    scores = Scorer(model, ScoringConfig.from_preset("discffusion", num_timesteps=1), batch_size=2).score(
        shape_images[:1], CAPTIONS
    )
    assert scores.shape == (1, 2) and np.isfinite(scores).all()
    # A hub id that is not in the cache: refused with the offline explanation, still without a connection.
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1"):
        load_model("stabilityai/stable-diffusion-2-1-base", device="cpu")
    assert no_network == []


@pytest.fixture(scope="module")
def bundle(export_case):
    """The session's tiny kv-prompt bundle (shared with tests/runtime, so exported once per run), made before the
    network guard is in place: only opening and scoring it are under test here."""
    pytest.importorskip("onnxruntime")
    return export_case("discffusion-kv-prompt")[0]


def test_offline_bundle_open_and_scoring_open_no_connection(bundle, no_network, shape_images):
    from dsdkit.runtime import Matcher

    with Matcher.from_bundle(bundle, num_timesteps=1) as matcher:
        scores = matcher.score(shape_images[:1], CAPTIONS)
    assert scores.shape == (1, 2) and np.isfinite(scores).all()
    assert no_network == []


# -- no code from model folders ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``code`` (what a malicious ``.bin`` weights file does)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _plant(folder: Path, sentinels: Path) -> dict[str, Path]:
    """Python files and pickles in ``folder`` that each create ``sentinels/<name>`` when run; configs pointing at
    them the way diffusers / transformers find custom code. Returns {name: planted file}."""
    sentinels.mkdir()

    def code(name: str) -> str:
        return f"from pathlib import Path\nPath({str(sentinels / name)!r}).write_text('ran')\n"

    planted = {}
    for relative in (
        "pipeline.py",
        "__init__.py",
        "unet/modeling_custom.py",
        "vae/modeling_custom.py",
        "text_encoder/modeling_custom.py",
        "text_encoder/configuration_custom.py",
        "tokenizer/tokenization_custom.py",
        "scheduler/scheduling_custom.py",
    ):
        name = relative.replace("/", "__")
        path = folder / relative
        path.write_text(
            code(name)
            + "class Custom:\n    pass\n"
            + "".join(
                f"{cls} = Custom\n"
                for cls in (
                    "CustomPipeline",
                    "CustomUNet",
                    "CustomVAE",
                    "CustomTextModel",
                    "CustomTextConfig",
                    "CustomTokenizer",
                    "CustomScheduler",
                )
            )
        )
        planted[name] = path
    for relative in (
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
    ):
        name = relative.replace("/", "__")
        (folder / relative).write_bytes(pickle.dumps(_Payload(code(name))))
        planted[name] = folder / relative

    def edit(relative: str, **changes):
        path = folder / relative
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config, indent=2))

    # A custom pipeline and custom components, as DiffusionPipeline.from_pretrained would honour them.
    edit(
        "model_index.json",
        _class_name=["pipeline", "CustomPipeline"],
        unet=["modeling_custom", "CustomUNet"],
        vae=["modeling_custom", "CustomVAE"],
        scheduler=["scheduling_custom", "CustomScheduler"],
        auto_map={"AutoModel": "modeling_custom.CustomUNet"},
    )  # diffusers' AutoModel reads it here first
    # diffusers' AutoModel and transformers' Auto* classes load these with trust_remote_code=True.
    edit("unet/config.json", auto_map={"AutoModel": "modeling_custom.CustomUNet"})
    edit("vae/config.json", auto_map={"AutoModel": "modeling_custom.CustomVAE"})
    edit(
        "text_encoder/config.json",
        auto_map={
            "AutoConfig": "configuration_custom.CustomTextConfig",
            "AutoModel": "modeling_custom.CustomTextModel",
        },
    )
    edit("tokenizer/tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]})
    edit("scheduler/scheduler_config.json", auto_map={"AutoScheduler": "scheduling_custom.CustomScheduler"})
    return planted


def _assert_planted_code_would_be_caught(planted: dict[str, Path], sentinels: Path) -> None:
    """Run each planted file the way a loader would (import / unpickle): each must leave its sentinel."""
    for name, path in planted.items():
        if path.suffix == ".py":
            runpy.run_path(str(path))
        else:
            pickle.loads(path.read_bytes())
        assert (sentinels / name).is_file(), name


def _spy_on_loaders(monkeypatch) -> list[tuple[str, dict]]:
    """Record every from_pretrained call (class, kwargs) on the classes a loader could use."""
    import diffusers
    import transformers

    calls: list[tuple[str, dict]] = []
    classes = [
        diffusers.UNet2DConditionModel,
        diffusers.AutoencoderKL,
        diffusers.DiffusionPipeline,
        transformers.CLIPTextModel,
        transformers.AutoModel,
        transformers.AutoConfig,
        transformers.AutoTokenizer,
        transformers.CLIPTokenizer,
    ]
    if hasattr(diffusers, "AutoModel"):
        classes.append(diffusers.AutoModel)
    for cls in classes:
        original = cls.from_pretrained

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, dict(kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_model_folder_code_and_pickles_never_run(tiny_model_dir, tmp_path, monkeypatch):
    from dsdkit.pytorch.models import load_model

    folder = tmp_path / "booby-trapped"
    shutil.copytree(tiny_model_dir, folder)
    sentinels = tmp_path / "sentinels"
    planted = _plant(folder, sentinels)
    calls = _spy_on_loaders(monkeypatch)

    try:
        model = load_model(folder, device="cpu", dtype="fp32")
    except ModelError as exc:  # refusing the folder is fine too, in one line
        model = None
        assert "\n" not in str(exc)
    assert sorted(p.name for p in sentinels.iterdir()) == [], "code shipped in the model folder was executed"
    if model is not None:
        assert [name for name, _ in calls] == ["UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"]
        assert model.unet.__class__.__name__ == "UNet2DConditionModel"
        assert model.text_encoder.__class__.__name__ == "CLIPTextModel"
    for name, kwargs in calls:
        assert not kwargs.get("trust_remote_code"), name
        assert kwargs.get("use_safetensors") is True, name  # the planted .bin pickles are never read
        assert "custom_pipeline" not in kwargs, name

    _assert_planted_code_would_be_caught(planted, sentinels)


def test_pickle_only_model_folder_is_refused_without_unpickling(tiny_model_dir, tmp_path):
    from dsdkit.pytorch.models import load_model

    folder = tmp_path / "pickles-only"
    shutil.copytree(tiny_model_dir, folder)
    sentinels = tmp_path / "sentinels"
    planted = _plant(folder, sentinels)
    for path in folder.glob("*/*.safetensors"):
        path.unlink()

    with pytest.raises(ModelError, match="does not unpickle") as info:
        load_model(folder, device="cpu", dtype="fp32")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in sentinels.iterdir()) == [], "a pickle in the model folder was loaded"

    _assert_planted_code_would_be_caught(planted, sentinels)
