"""The GPU kit's wheelhouse: what dsdkit needs besides torch, as wheels for the GPU machine's interpreter.

The GPU machine is offline and may run another Python than ours, so its packages travel as wheels built for *its*
interpreter. Three commands:

``build`` (here, where pip reaches an index; ``wheelhouse.sh`` calls it)
    Walks the requirement tree from ``pyproject.toml`` (the base dependencies and the ``[torch]`` extra, torch
    itself left out: the machine brings its own CUDA build), evaluating each ``Requires-Dist`` marker for the
    target interpreter, and downloads one wheel per distribution into ``benchmarks/gpu/wheels/``. Each
    distribution gets the version installed in this environment when that satisfies every requirement on it
    (the versions our tests ran with), else the newest that does. ``--have FILE`` names distributions the target
    already has (``pip freeze`` style); they and everything beneath them are left out, which is what keeps the
    wheelhouse small enough to travel. ``WHEELHOUSE.json`` records the target, every wheel and the total size.

``missing DIR`` (there; standard library only)
    Prints the wheels of DIR whose distribution this interpreter does not have. Only those are installed: the
    machine's own packages (its torch above all, and whatever torch was built against) are never shadowed.

``layout SITE`` (there; standard library only)
    Lays dsdkit out under SITE straight from this checkout, as ``pyproject.toml``'s ``package-dir`` maps it
    (``train/`` -> ``dsdkit.train``, ...), with symbolic links: no build step, and the demo model's weights, which
    travel with the checkout, do not travel a second time inside a dsdkit wheel.
"""

from __future__ import annotations

import argparse
import datetime
import email.parser
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("wheelhouse")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = Path(__file__).resolve().parent / "wheels"
MANIFEST = "WHEELHOUSE.json"
# Never in the wheelhouse: the machine's own torch stack (its CUDA build and the libraries it was built with) and
# dsdkit itself (laid out from the checkout).
NEVER = re.compile(r"^(torch|triton|pytorch-triton|nvidia-.*|dsdkit)$")
# manylinux tags are matched exactly by pip: name every glibc from CentOS 7's (2.17) to RHEL 8's (2.28).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 16, -1)] + ["manylinux2014_x86_64"]


def normalize(name: str) -> str:
    """PEP 503 name: what pip and importlib.metadata agree on."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(path: Path) -> str:
    """The normalized distribution name of a wheel file (its name's first field)."""
    return normalize(path.name.split("-", 1)[0])


def target_environment(python_version: str) -> dict[str, str]:
    """PEP 508 marker variables of a CPython ``python_version`` on x86-64 Linux."""
    full = python_version if python_version.count(".") == 2 else f"{python_version}.0"
    return {
        "python_version": ".".join(python_version.split(".")[:2]),
        "python_full_version": full,
        "implementation_name": "cpython",
        "implementation_version": full,
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "platform_release": "",
        "platform_version": "",
        "os_name": "posix",
    }


def read_have(path: Path | None) -> set[str]:
    """Distribution names in a ``pip freeze``-style file (``name``, ``name==version``, ``#`` comments)."""
    if path is None:
        return set()
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(re.split(r"[\s=<>!~;\[@]", line, maxsplit=1)[0]))
    return names


def root_requirements() -> list[str]:
    """dsdkit's base dependencies and its ``[torch]`` extra, from ``pyproject.toml``."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["torch"])


def requires_dist(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        metadata = email.parser.Parser().parsestr(archive.read(name).decode("utf-8"))
    return metadata.get_all("Requires-Dist") or []


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def build(python_version: str, dest: Path, have: set[str]) -> dict:
    """Download the wheelhouse (see the module doc); returns the manifest it writes."""
    from packaging.requirements import Requirement

    environment = target_environment(python_version)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    # name -> every requirement on it (specifiers accumulate across parents), and who asked.
    wanted: dict[str, list] = {}
    required_by: dict[str, set[str]] = {}
    files: dict[str, Path] = {}
    walked: dict[str, set[str]] = {}  # the extras each fetched wheel's requirements were walked for
    left_out: dict[str, str] = {}

    def consider(lines: Iterable[str], parent: str, extras: tuple[str, ...] = ("",)) -> list[str]:
        new = []
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in extras
            ):
                continue
            name = normalize(requirement.name)
            if NEVER.match(name) or name in have:
                left_out.setdefault(name, "the GPU machine's own" if name in have else "never carried")
                continue
            required_by.setdefault(name, set()).add(parent)
            first = name not in wanted
            wanted.setdefault(name, []).append(requirement)
            if first:
                new.append(name)
            elif name in files:
                if not _satisfies(files[name], wanted[name]):
                    logger.warning("%s: %s needs %s, beyond the wheel already chosen", files[name].name, parent, line)
                extra = tuple(sorted(set(requirement.extras) - walked[name]))
                if extra:  # a later parent asks for an extra of a wheel already walked: walk it for that extra
                    walked[name] |= set(extra)
                    new += consider(requires_dist(files[name]), name, extra)
        return new

    level = consider(root_requirements(), "dsdkit")
    while level:
        pins = [_pin(name, wanted[name]) for name in level]
        before = set(dest.glob("*.whl"))
        _download(pins, python_version, dest)
        fetched = {wheel_distribution(p): p for p in set(dest.glob("*.whl")) - before}
        following = []
        for name in level:
            if name not in fetched:
                raise SystemExit(f"pip downloaded no wheel for {name}")
            files[name] = fetched[name]
            walked[name] = {"", *(e for r in wanted[name] for e in r.extras)}
            following += consider(requires_dist(files[name]), name, tuple(sorted(walked[name])))
        level = following
    wheels = [
        {
            "file": path.name,
            "bytes": path.stat().st_size,
            "distribution": name,
            "required_by": sorted(required_by[name]),
        }
        for name, path in sorted(files.items())
    ]
    manifest = {
        "python_version": python_version,
        "platforms": PLATFORMS,
        "built": datetime.date.today().isoformat(),
        "have_file_left_out": sorted(n for n, why in left_out.items() if why != "never carried"),
        "never_carried": sorted(n for n, why in left_out.items() if why == "never carried"),
        "wheels": wheels,
        "total_bytes": sum(w["bytes"] for w in wheels),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _pin(name: str, requirements: list) -> str:
    """``name==ours`` where this environment's version satisfies every requirement on ``name``, else their
    combined specifiers (pip then takes the newest that fits)."""
    from packaging.specifiers import SpecifierSet

    specifiers = SpecifierSet(",".join(str(r.specifier) for r in requirements if str(r.specifier)))
    ours = installed_version(name)
    if ours is not None and specifiers.contains(ours, prereleases=True):
        return f"{name}=={ours}"
    return f"{name}{specifiers}"


def _satisfies(wheel: Path, requirements: list) -> bool:
    version = wheel.name.split("-")[1]
    return all(r.specifier.contains(version, prereleases=True) for r in requirements)


def _download(pins: list[str], python_version: str, dest: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    command += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    logger.info("downloading %s", " ".join(pins))
    subprocess.run(command + pins, check=True)


def missing(folder: Path) -> list[Path]:
    """Wheels in ``folder`` whose distribution this interpreter has not installed (see the module doc)."""
    return [
        wheel
        for wheel in sorted(folder.glob("*.whl"))
        if not NEVER.match(wheel_distribution(wheel)) and installed_version(wheel_distribution(wheel)) is None
    ]


def package_dirs() -> dict[str, str]:
    """``pyproject.toml``'s ``[tool.setuptools.package-dir]``: package -> folder of the checkout."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the table is flat "name" = "folder" lines
        table = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
        return dict(re.findall(r'^"([\w.]+)"\s*=\s*"([\w./-]+)"', table, flags=re.M))
    return tomllib.loads(text)["tool"]["setuptools"]["package-dir"]


def layout(site: Path) -> Path:
    """Lay dsdkit out under ``site`` from this checkout (see the module doc); returns the package folder."""
    mapping = package_dirs()
    package = site / "dsdkit"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / mapping["dsdkit"]).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "dsdkit":
            (package / name.split(".", 1)[1]).symlink_to(ROOT / folder)
    return package


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="download the wheelhouse (here)")
    make.add_argument("--python-version", default="3.12")
    make.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    make.add_argument("--have", type=Path, help="distributions the GPU machine already has (pip freeze style)")
    find = commands.add_parser("missing", help="print the wheels this interpreter lacks (there)")
    find.add_argument("folder", type=Path)
    lay = commands.add_parser("layout", help="lay dsdkit out from the checkout under SITE (there)")
    lay.add_argument("site", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        manifest = build(args.python_version, args.dest, read_have(args.have))
        for wheel in manifest["wheels"]:
            print(f"{wheel['bytes'] / 2**20:8.2f} MiB  {wheel['file']}")
        print(
            f"{manifest['total_bytes'] / 2**20:8.2f} MiB  in {len(manifest['wheels'])} wheels for CPython "
            f"{args.python_version} in {os.path.relpath(args.dest)}"
            + (f"; left out as the machine's own: {', '.join(manifest['have_file_left_out'])}" if args.have else "")
        )
    elif args.command == "missing":
        print("\n".join(str(p) for p in missing(args.folder)))
    else:
        print(layout(args.site))


if __name__ == "__main__":
    main()
