"""Reading a dsdkit bundle (torch-free): the manifest, its graphs, its tokenizer, and integrity checks.

A bundle is a folder written by ``dsdkit export``::

    manifest.json   format, versions, model identity and licence, scoring config, graph specs, file hashes, parity
    tokenizer/      vocab.json, merges.txt, tokenizer_config.json (the model's own)
    onnx/           text_encoder.onnx, image_encoder.onnx, scorer.onnx (+ .onnx.data above 2 GB)
    engines/        TensorRT plans with their metadata (optional)

Every file the manifest lists is checked for presence, size and sha256 before use; a bundle that fails is refused
with a message that says how to get a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError
from .tokenizer import ClipTokenizer

__all__ = ["BUNDLE_FORMAT", "Bundle", "sha256_file", "file_records"]

BUNDLE_FORMAT = "dsdkit-bundle/1"
_REEXPORT = "re-export it with `dsdkit export` (or copy the bundle folder again)"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(root: Path, exclude: set[str] = frozenset({"manifest.json"})) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "size"}}`` of every file under ``root`` (for the manifest)."""
    records = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative in exclude:
            continue
        records[relative] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return records


@dataclass
class Bundle:
    """An opened bundle. Use :meth:`open`."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Read ``manifest.json`` and (``verify``) check every listed file's presence, size and sha256.

        Raises:
            BundleError: not a bundle, another format version, or a missing, truncated or modified file.
        """
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle folder; create one with `dsdkit export`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(
                f"{path}: not a dsdkit bundle (no manifest.json); create one with `dsdkit export`"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: unreadable ({exc}); {_REEXPORT}") from None
        found = manifest.get("format") if isinstance(manifest, dict) else None
        if found != BUNDLE_FORMAT:
            raise BundleError(
                f"{path}: bundle format {found!r}, but this dsdkit reads {BUNDLE_FORMAT!r}; {_REEXPORT} with this "
                "dsdkit version"
            )
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every file the manifest lists (presence, size, sha256)."""
        for relative, record in self.manifest.get("files", {}).items():
            file = self.path / relative
            if not file.is_file():
                raise BundleError(f"{self.path}: bundle file {relative} is missing; {_REEXPORT}")
            size = file.stat().st_size
            if size != record["size"]:
                raise BundleError(
                    f"{self.path}: bundle file {relative} has {size} bytes, the manifest says {record['size']} "
                    f"(truncated or replaced); {_REEXPORT}"
                )
            if sha256_file(file) != record["sha256"]:
                raise BundleError(f"{self.path}: bundle file {relative} was modified (sha256 mismatch); {_REEXPORT}")

    # -- accessors -------------------------------------------------------------------------------------------------

    @property
    def scoring(self) -> dict[str, Any]:
        return self.manifest["scoring"]

    def graph(self, name: str) -> dict[str, Any]:
        try:
            return self.manifest["graphs"][name]
        except KeyError:
            raise BundleError(f"{self.path}: the bundle has no {name!r} graph; {_REEXPORT}") from None

    def graph_path(self, name: str) -> Path:
        return self.path / self.graph(name)["file"]

    def tokenizer(self):

        return ClipTokenizer.from_folder(self.path / self.manifest.get("tokenizer", {}).get("folder", "tokenizer"))
