"""Reading a dsdkit bundle (torch-free): the manifest, its graphs, its tokenizer, and integrity checks.

A bundle is a folder written by ``dsdkit export``::

    manifest.json   format, versions, model identity and licence, scoring config, graph specs, file hashes, parity
    tokenizer/      vocab.json, merges.txt, tokenizer_config.json (the model's own)
    onnx/           text_encoder.onnx, image_encoder.onnx, scorer.onnx (+ .onnx.data above 2 GB)
    engines/        TensorRT plans with their metadata (optional)

:meth:`Bundle.open` checks, before anything opens a graph or a tokenizer file:

1. the manifest against its schema (:func:`~dsdkit.runtime.schemas.bundle_manifest`);
2. confinement: every path the bundle names (the ``files`` list, graph files, engines, the tokenizer folder) resolves
   inside the bundle folder, symlinks resolved;
3. completeness: every file the runtime will open is in the ``files`` list (a bundle without one is refused);
4. every listed file's size and sha256;
5. what the graphs name themselves: every ONNX external-data location resolves inside the bundle and is a listed (so
   hashed) file, and the fields the scorer graph bakes in (the scoring section, layers, noise bank, model shapes,
   adapter) equal the manifest's (:func:`baked_fields`, recorded in the scorer graph's ``metadata_props`` at export).

A bundle that fails is refused with one line that says how to get a good one. Hashes detect damage and edits, not a
writer who also rewrites the hashes: a bundle is as trustworthy as where it came from (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import schemas
from .errors import BundleError
from .onnxfile import OnnxFormatError, read_references
from .tokenizer import ClipTokenizer

__all__ = ["BUNDLE_FORMAT", "BAKED_KEY", "Bundle", "sha256_file", "file_records", "baked_fields"]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "dsdkit-bundle/1"
#: The scorer graph's ``metadata_props`` key holding :func:`baked_fields` as JSON (written by ``dsdkit export``).
BAKED_KEY = "dsdkit.baked"
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


def baked_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields that the exported graphs fix, as JSON data: what the scorer graph records at export and
    :meth:`Bundle.open` compares with the manifest.

    The whole scoring section is included, free knobs too: S, the schedule and normalisation are changed per run
    (``Matcher(num_timesteps=..., overrides=...)``, the CLI's options), never by editing the manifest, whose values
    are the defaults a run starts from and would otherwise change scores silently.
    """
    model = manifest["model"]
    baked = {
        "scoring": manifest["scoring"],
        "layers": manifest["layers"],
        "noise": {"seed": manifest["noise"]["seed"], "bank_size": manifest["noise"]["bank_size"]},
        "precision": manifest["precision"],
        "model": {
            "identity": model["identity"],
            "resolution": model["resolution"],
            "latent_shape": model["latent_shape"],
            "text_length": model["text_length"],
            "context_tokens": model.get("context_tokens", "all"),  # manifests before it: all
        },
        "adapter": (manifest.get("adapter") or {}).get("sha256"),
    }
    return json.loads(json.dumps(baked))  # plain JSON types, as read back from the graph


def _first_difference(recorded: Any, manifest: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """The first field (dotted path) whose value differs, with the recorded and the manifest's values."""
    if isinstance(recorded, dict) and isinstance(manifest, dict):
        for key in sorted(set(recorded) | set(manifest)):
            inner = _first_difference(recorded.get(key), manifest.get(key), f"{where}.{key}" if where else key)
            if inner is not None:
                return inner
        return None
    return None if recorded == manifest else (where, recorded, manifest)


def _quote(value: Any, limit: int = 80) -> str:
    """A field's value for a one-line message (a long list of layer names is cut)."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Bundle:
    """An opened bundle. Use :meth:`open`."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Read ``manifest.json`` and check the bundle (see the module doc) before anything opens its files.

        ``verify=False`` skips the sha256 of every file (steps 4; for tools that only read the manifest); the
        schema, confinement, completeness and graph checks run either way.

        Raises:
            BundleError: not a bundle, another format version, a damaged manifest, a path outside the bundle, a file
                missing from the list, a missing, truncated or modified file, or a manifest field edited after export.
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
            reason = " ".join(str(exc).split())
            raise BundleError(f"{manifest_path}: unreadable ({reason}); {_REEXPORT}") from None
        found = manifest.get("format") if isinstance(manifest, dict) else None
        if found != BUNDLE_FORMAT:
            raise BundleError(
                f"{path}: bundle format {found!r}, but this dsdkit reads {BUNDLE_FORMAT!r}; {_REEXPORT} with this "
                "dsdkit version"
            )
        schemas.bundle_manifest(manifest, str(manifest_path))
        bundle = cls(path, manifest)
        bundle.check_paths()
        if verify:
            bundle.verify()
        bundle.check_graphs()
        return bundle

    # -- the checks ----------------------------------------------------------------------------------------------

    def _inside(self, relative: str, what: str) -> Path:
        """``relative`` resolved (symlinks followed) and refused unless it stays inside the bundle folder."""
        root = self.path.resolve()
        try:
            resolved = (root / relative).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
            raise BundleError(f"{self.path}: {what} {relative} cannot be resolved ({exc}); {_REEXPORT}") from None
        if resolved == root or not resolved.is_relative_to(root):
            raise BundleError(
                f"{self.path}: {what} {relative} resolves outside the bundle ({resolved}); a bundle holds all its "
                f"files itself: {_REEXPORT}"
            )
        return resolved

    def _listed(self, relative: str, what: str) -> None:
        if relative not in self.manifest["files"]:
            raise BundleError(
                f"{self.path}: {what} {relative} is not in the manifest's file list, so it cannot be verified; "
                f"{_REEXPORT}"
            )

    def check_paths(self) -> None:
        """Confinement and completeness of the paths the manifest names (nothing is opened)."""
        for relative in self.manifest["files"]:
            self._inside(relative, "bundle file")
        for name, graph in self.manifest["graphs"].items():
            self._inside(graph["file"], f"the {name} graph")
            self._listed(graph["file"], f"the {name} graph")
        engines = self.manifest.get("engines") or {}
        for name, engine in (engines.get("graphs") or {}).items() if engines.get("built") else ():
            self._inside(engine["file"], f"the {name} engine")
            self._listed(engine["file"], f"the {name} engine")
        self._check_folder(self.manifest["tokenizer"]["folder"], "tokenizer", ("vocab.json", "merges.txt"))
        shortlist = self.manifest.get("shortlist")
        if shortlist:
            required = ("vocab.json", "merges.txt", "preprocessor_config.json")
            self._check_folder(shortlist["folder"], "shortlist CLIP", required)
            # Each tower must be a graph of its own with the inputs and output the runtime feeds and reads.
            expected = {"image": ("pixels", "embeddings"), "text": ("input_ids", "embeddings")}
            for role, graph in shortlist["graphs"].items():
                if graph not in self.manifest["graphs"]:
                    raise BundleError(
                        f"{self.path}: the shortlist names graph {graph!r}, which the bundle lacks; {_REEXPORT}"
                    )
                declared = self.manifest["graphs"][graph]
                needed_input, needed_output = expected.get(role, (None, None))
                if needed_input not in (declared.get("inputs") or {}) or needed_output not in (
                    declared.get("outputs") or {}
                ):
                    raise BundleError(
                        f"{self.path}: the shortlist's {role} tower names graph {graph!r}, which is not a CLIP "
                        f"{role} tower (it takes no {needed_input!r} or gives no {needed_output!r}); {_REEXPORT}"
                    )

    def _check_folder(self, folder: str, what: str, required: tuple[str, ...]) -> None:
        """A folder whose reader takes what it finds there (a tokenizer: vocab, merges, an optional config): it
        lies inside the bundle and every file in it is listed, the ones it cannot do without among them."""
        resolved = self._inside(folder, f"the {what} folder")
        for name in required:
            self._listed(f"{folder.rstrip('/')}/{name}", f"{what} file")
        if resolved.is_dir():
            for file in sorted(resolved.iterdir()):
                if file.is_file() or file.is_symlink():
                    self._listed(f"{folder.rstrip('/')}/{file.name}", f"{what} file")

    def verify(self) -> None:
        """Check every file the manifest lists (inside the bundle, presence, size, sha256)."""
        for relative, record in self.manifest["files"].items():
            file = self._inside(relative, "bundle file")
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

    def check_graphs(self) -> None:
        """What the graphs name: external-data files (confined and listed) and, in the scorer graph, the fields it
        was exported with (equal to the manifest's)."""
        baked = None
        for name, graph in self.manifest["graphs"].items():
            file = graph["file"]
            try:
                references = read_references(self.path / file)
            except (OnnxFormatError, OSError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise BundleError(
                    f"{self.path}: the {name} graph {file} is not a readable ONNX model ({reason}); {_REEXPORT}"
                ) from None
            folder = Path(file).parent
            for location in references.locations:
                try:
                    schemas.relative_path(location, "location")
                except schemas.SchemaError as exc:
                    raise BundleError(
                        f"{self.path}: the {name} graph {file} names external data {exc.problem}; {_REEXPORT}"
                    ) from None
                relative = (folder / location).as_posix()
                self._inside(relative, f"external data of the {name} graph:")
                self._listed(relative, f"external data of the {name} graph:")
            if name == "scorer":
                baked = references.metadata.get(BAKED_KEY)
        self._check_baked(baked)

    def _check_baked(self, recorded_text: str | None) -> None:
        scorer = self.manifest["graphs"]["scorer"]["file"]
        if recorded_text is None:
            logger.warning(
                "%s: exported before dsdkit recorded the scoring fields in the scorer graph, so its manifest's "
                "scoring section cannot be checked against the graph; re-export it with `dsdkit export` to get the "
                "check",
                self.path,
            )
            return
        try:
            recorded = json.loads(recorded_text)
        except json.JSONDecodeError:
            raise BundleError(f"{self.path}: {scorer} holds unreadable export fields; {_REEXPORT}") from None
        difference = _first_difference(recorded, baked_fields(self.manifest))
        if difference is not None:
            where, exported, now = difference
            raise BundleError(
                f"{self.path}: manifest.json says {where} = {_quote(now)}, but {scorer} was exported with "
                f"{_quote(exported)} (the manifest was edited after export); change S, the schedule or "
                "normalisation with the run's options (`num_timesteps`, `normalize`, ...), not in the manifest, or "
                "re-export the bundle with `dsdkit export`"
            )

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
