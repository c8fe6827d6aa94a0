"""MkDocs hook: stage the installed package layout for the API reference.

The repository keeps ``train/``, ``export/`` and ``runtime/`` at the top level and installs them as
``dsdkit.train``, ``dsdkit.export`` and ``dsdkit.runtime`` (``pyproject.toml``'s package-dir). The docstrings' reader
(griffe, through mkdocstrings) finds packages by their folders, so before a build this hook writes
``build/api-src/dsdkit/``: links to everything in ``dsdkit/`` plus the three folders under their installed names.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("mkdocs.hooks.dsdkit")

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"train": "train", "export": "export", "runtime": "runtime"}  # installed name -> repository folder


def stage(root: Path = ROOT) -> Path:
    """Write ``build/api-src/dsdkit`` (links, or copies where links are not allowed) and return ``build/api-src``."""
    source = root / "build" / "api-src"
    package = source / "dsdkit"
    if package.exists() or package.is_symlink():
        shutil.rmtree(package) if package.is_dir() and not package.is_symlink() else package.unlink()
    package.mkdir(parents=True)
    entries = {p.name: p for p in (root / "dsdkit").iterdir() if p.name != "__pycache__"}
    entries.update({name: root / folder for name, folder in MAPPED.items()})
    for name, target in entries.items():
        try:
            os.symlink(target, package / name, target_is_directory=target.is_dir())
        except OSError:  # no symlinks here (some Windows setups): copy instead
            if target.is_dir():
                shutil.copytree(target, package / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(target, package / name)
    return source


def on_startup(command, dirty):  # noqa: ARG001 - MkDocs' hook signature
    logger.debug("staged the package layout in %s", stage())


def on_config(config):
    stage()  # also for `mkdocs build` run from an older MkDocs without on_startup
    return config
