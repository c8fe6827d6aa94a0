"""Bundles: ``export`` (ONNX scoring graphs with verified parity), ``inspect`` and ``build-engines``."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..jobs.specs import EngineSpec
from ..runtime.errors import ConfigError
from .app import app, command
from .options import CREATES_FOLDERS, IO_PANEL, argument, engine_options, option, prepare_output
from .ui import StageProgress, say


class ExporterChoice(str, Enum):
    dynamo = "dynamo"
    torchscript = "torchscript"


@command(app, "export", "Export a model (adapters folded) as a verified bundle.")
@engine_options(only=("model", "adapters", "device", "threads"), defaults={"device": "cpu"})
def export_command(
    out: Annotated[Path, option("--out", "-o", help="The bundle folder to write. " + CREATES_FOLDERS, panel=IO_PANEL)],
    engine: EngineSpec,
    fp16: Annotated[bool, option("--fp16", help="fp16 scorer graph with fp32 score islands.")] = False,
    opset: Annotated[int, option("--opset", help="ONNX opset.")] = 18,
    batch: Annotated[
        str, option("--batch", help="Batch profile MIN:OPT:MAX (OPT is the runtime's batch).")
    ] = "1:8:32",
    engines: Annotated[
        bool | None,
        option("--engines/--no-engines", help="Build TensorRT engines (default: when TensorRT and a GPU are here)."),
    ] = None,
    exporter: Annotated[
        ExporterChoice, option("--exporter", help="torch ONNX exporter.", choices=ExporterChoice)
    ] = ExporterChoice.dynamo,
    parity_size: Annotated[int, option("--parity-size", help="Parity check on N generated images x N captions.")] = 4,
    parity_timesteps: Annotated[
        int, option("--parity-timesteps", help="Timesteps of the end-to-end parity check.")
    ] = 1,
    licence: Annotated[
        str | None, option("--license", help="The base model's licence, if its folder does not state it.")
    ] = None,
    overwrite: Annotated[
        bool, option("--overwrite", help="Replace an existing bundle at --out.", panel=IO_PANEL)
    ] = False,
    shortlist: Annotated[
        str | None,
        option(
            "--shortlist",
            help="Also export a CLIP model's image and text towers (a CLIPModel folder, a hub id, or demo), so "
            "that dsdkit match --bundle ... --shortlist-k K searches a gallery without torch.",
        ),
    ] = None,
) -> None:
    """Export ONNX scoring graphs (adapters folded), check parity with PyTorch, build engines: a bundle.

    The scoring config is the adapter's own (else the preset's) with the knobs given here; S (--timesteps) is the
    runtime's default, which dsdkit match --bundle --timesteps can change."""
    from ..export import ExportConfig, ParitySettings, export_bundle, parse_batch

    if parity_size < 1 or parity_timesteps < 1:
        raise ConfigError("--parity-size and --parity-timesteps must be >= 1 (parity is always checked)")
    prepare_output(out, "--out")
    config = ExportConfig(
        precision="fp16" if fp16 else "fp32",
        opset=opset,
        batch=parse_batch(batch),
        exporter=exporter.value,
        engines=engines,
        device=engine.device,
        licence=licence,
        parity=ParitySettings(images=parity_size, captions=parity_size, timesteps=parity_timesteps),
        shortlist=shortlist,
    )
    with StageProgress("exporting") as progress:
        manifest = export_bundle(
            engine.model,
            out,
            adapters=engine.adapters,
            preset=engine.preset,
            overrides=engine.knobs,
            config=config,
            overwrite=overwrite,
            progress=progress,
        )
    # The reason engines were not built was logged as a warning while exporting: the summary points to it.
    say(bundle_summary(out, manifest, verified=True, engines_noted=True))


@command(app, "inspect", "Show a bundle's manifest and verify its files.")
def inspect_command(
    bundle: Annotated[Path, argument("BUNDLE", help="A bundle folder from dsdkit export.")],
    as_json: Annotated[bool, option("--json", help="Print the whole manifest as JSON.")] = False,
    verify: Annotated[
        bool, option("--verify/--no-verify", help="Check every file's size and sha256 (default: on).")
    ] = True,
) -> None:
    """Print a bundle's manifest readably, then every file with its size and sha256 (verified unless
    --no-verify)."""
    from ..runtime.bundle import Bundle

    opened = Bundle.open(bundle, verify=verify)
    # What inspect prints was asked for: it is printed under -q too.
    if as_json:
        typer.echo(json.dumps(opened.manifest, indent=1))
        return
    typer.echo(bundle_summary(bundle, opened.manifest, verified=verify))
    files = opened.manifest.get("files", {})
    width = max((len(name) for name in files), default=0)
    for name, record in sorted(files.items()):
        typer.echo(f"  {name:<{width}}  {record['size']:>14,} B  sha256 {record['sha256']}")


@command(app, "build-engines", "Build TensorRT engines into a bundle (GPU machine).")
def build_engines_command(
    bundle: Annotated[Path, argument("BUNDLE", help="A bundle folder from dsdkit export.")],
    workspace_gb: Annotated[
        float | None, option("--workspace-gb", help="TensorRT builder workspace limit in GB.")
    ] = None,
) -> None:
    """Build TensorRT engines into a bundle, on the GPU machine that will run them."""
    from ..export import add_engines

    manifest = add_engines(bundle, workspace_gb)
    say(bundle_summary(bundle, manifest, verified=True))


def _scoring_line(manifest: dict[str, Any]) -> str:
    scoring = manifest["scoring"]
    return (
        f"scoring   preset {scoring['preset']}, pooling {scoring['pooling']}, layers {len(manifest['layers'])}, "
        f"heads {scoring['heads']}, timesteps {scoring['timesteps']}"
        + (f" S={scoring['num_timesteps']}" if scoring["timesteps"] == "discffusion" else "")
        + f", denoise {'on' if scoring['denoise_term'] else 'off'}, normalize {scoring['normalize']}"
    )


def _parity_lines(parity: dict[str, Any]) -> list[str]:
    lines = []
    for name, outputs in parity.get("graphs", {}).items():
        worst = max(outputs.items(), key=lambda item: item[1]["max_abs"])
        lines.append(
            f"parity    {name}: max abs {worst[1]['max_abs']:.2g} ({worst[0]}), "
            f"{'ok' if all(o['ok'] for o in outputs.values()) else 'FAILED'}"
        )
    if parity.get("end_to_end"):
        end = parity["end_to_end"]
        lines.append(
            f"parity    scores {end['matrix'][0]}x{end['matrix'][1]} at t={end['timesteps']}: max abs "
            f"{end['scores']['max_abs']:.2g}, max rel {end['scores']['max_rel']:.2g}, top-1 agreement "
            f"{end['ranking']['top1_agreement']:.3f}, Spearman {end['ranking']['spearman_mean']:.4f}"
        )
    return lines


def _engines_line(engines: dict[str, Any], noted: bool) -> str:
    if engines.get("built"):
        return (
            f"engines   TensorRT {engines['tensorrt']} for {engines['gpu']} (sm {engines['compute_capability']}): "
            + ", ".join(engines["graphs"])
        )
    reason = engines.get("reason", "not built")
    if noted and reason != "--no-engines":
        return "engines   none (why: the warning above)"  # each notice once
    return f"engines   none ({reason})"


def bundle_summary(path: Path, manifest: dict[str, Any], verified: bool, engines_noted: bool = False) -> str:
    """A bundle's manifest in a few readable lines (``engines_noted``: why no engines were built was just logged)."""
    model, files, adapter = manifest["model"], manifest.get("files", {}), manifest.get("adapter")
    size = sum(record["size"] for record in files.values())
    lines = [
        f"bundle    {path}  ({manifest['format']}, dsdkit {manifest['dsdkit_version']}, "
        f"{manifest.get('created', '?')})",
        f"model     {model['source']}  identity {model['identity'][:12]}  {model['resolution']}px  "
        f"licence: {model['licence']}",
        "adapter   "
        + (
            f"{adapter['file']} ({adapter['header'].get('kind', '?')}, sha256 {adapter['sha256'][:12]}), folded"
            if adapter
            else "none (zero-shot)"
        ),
        _scoring_line(manifest),
        f"export    {manifest['precision']}, {manifest['export']['exporter']} exporter, "
        f"opset {manifest['export']['opset']}, "
        f"batch {':'.join(map(str, manifest['export']['batch']))}, noise bank {manifest['noise']['bank_size']}",
    ]
    for name, graph in manifest["graphs"].items():
        inputs = ", ".join(f"{k}{v['shape']}" for k, v in graph["inputs"].items())
        outputs = ", ".join(f"{k}{v['shape']}" for k, v in graph["outputs"].items())
        lines.append(f"graph     {name} ({graph['precision']}): {inputs} -> {outputs}")
    lines += _parity_lines(manifest.get("parity", {}))
    lines.append(_engines_line(manifest.get("engines", {}), engines_noted))
    state = "verified (size and sha256)" if verified else "not verified"
    lines.append(f"files     {len(files)} files, {size / 1e6:.1f} MB, {state}")
    return "\n".join(lines)
