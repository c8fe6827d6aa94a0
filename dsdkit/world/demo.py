"""The shipped demo model (``--model demo``) and scoring the demo world's benchmark in memory.

The demo model is a small SD2-architecture text-to-image model that ``dsdkit world train`` trained on the synthetic
world of :mod:`dsdkit.world` (recipe and measured metrics in its ``world_model.json``). Its weights ship with the
package under ``dsdkit/assets/demo/`` as fp16 safetensors, with ``MANIFEST.json`` listing every file's size and
sha256. It matches coloured-shape captions for real, so every command can be tried offline with scores that mean
something; it says nothing about accuracy on real images.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..runtime.bundle import sha256_file
from ..runtime.errors import ModelError
from ..runtime.files import atomic_write_text

__all__ = [
    "DEMO_MODEL",
    "MANIFEST_FILE",
    "demo_model_folder",
    "demo_clip_folder",
    "CLIP_SUBFOLDER",
    "verify_demo_model",
    "write_manifest",
]

#: The name that ``--model`` and ``load_model`` resolve to the shipped demo model.
DEMO_MODEL = "demo"
MANIFEST_FILE = "MANIFEST.json"
#: The shipped mini-CLIP's folder inside the demo model's (a Hugging Face CLIPModel folder; see dsdkit.train.clip).
CLIP_SUBFOLDER = "clip"


def demo_model_folder() -> Path:
    """The installed demo model's folder (a plain diffusers SD2 folder)."""
    folder = Path(str(resources.files("dsdkit.assets").joinpath("demo")))
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"the demo model is not installed ({folder} has no model_index.json); reinstall dsdkit from a checkout "
            "or a wheel that includes its package data"
        )
    return folder


def demo_clip_folder(verify: bool = True) -> Path:
    """The shipped mini-CLIP (``--shortlist demo``, ``text_tower: "demo"``): checked against the demo manifest."""
    folder = demo_model_folder()
    clip = folder / CLIP_SUBFOLDER
    if not (clip / "config.json").is_file():
        raise ModelError(f"the demo mini-CLIP is not installed ({clip} has no config.json); reinstall dsdkit")
    if verify:
        verify_demo_model(folder)
    return clip


def _model_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE and "__pycache__" not in p.parts
    )


def write_manifest(folder: str | Path) -> dict:
    """Write ``MANIFEST.json`` (size and sha256 of every file) into a model folder about to be shipped."""

    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _model_files(folder)
    }
    manifest = {"format": "dsdkit-demo-model/1", "files": files}
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_demo_model(folder: str | Path | None = None) -> dict:
    """Check every file of the demo model against its manifest; raise :class:`ModelError` naming the first
    mismatch. Returns the manifest."""
    folder = Path(folder) if folder is not None else demo_model_folder()
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / MANIFEST_FILE} is unreadable ({exc}); reinstall dsdkit") from None
    listed = manifest.get("files", {})
    present = {p.relative_to(folder).as_posix() for p in _model_files(folder)}
    extra = sorted(present - set(listed))
    if extra:
        raise ModelError(f"{folder}: files not in the demo model's manifest: {', '.join(extra)}; reinstall dsdkit")
    for name, entry in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise ModelError(f"{path} is missing from the demo model; reinstall dsdkit")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ModelError(
                f"{path} does not match the demo model's manifest (modified or truncated); reinstall dsdkit"
            )
    return manifest


def __getattr__(name: str):
    # items_to_examples moved to dsdkit.jobs.datasets (the world's benchmark as a dataset); the old name answers
    # with a DeprecationWarning (dsdkit/_moved.py).
    from .._moved import renamed_attribute

    return renamed_attribute(__name__, name, globals())
