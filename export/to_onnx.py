"""torch -> ONNX for one graph: the exporter, dynamic batch, external data above 2 GB, checker, shape inference."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import torch

from ..runtime.errors import ConfigError
from .specs import BATCH, ExportSpec

__all__ = ["export_graph", "EXPORTERS"]

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
_TWO_GB = 2**31 - 1


def _dummy(spec, shape):
    if spec.dtype == "int64":
        # Valid for every int64 input: token ids, timesteps (< 1000) and noise-bank indices (< bank size).
        return torch.zeros(shape, dtype=torch.int64)
    return torch.randn(shape, dtype=torch.float32)


def export_graph(
    module: torch.nn.Module, spec: ExportSpec, path: Path, exporter: str = "dynamo", opset: int = 18, device=None
) -> dict:
    """Export ``module`` to ``path`` (ONNX, dynamic batch) and check it; returns timing and file information.

    The dynamo exporter's weights go to ``<name>.onnx.data``; the TorchScript exporter's weights are kept inline below
    2 GB and moved to one ``.onnx.data`` file above.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = tuple(t.to(device) if device is not None else t for t in spec.dummy_inputs(2, _dummy))
    if exporter == "dynamo":
        module = _Namespaced(module)
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; results are checked below
        if exporter == "dynamo":
            # diffusers' upsampler branches on batch >= 64, so the symbolic batch stays below it.
            batch = torch.export.Dim(BATCH, min=1, max=63)
            program = torch.onnx.export(
                module,
                inputs,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamo=True,
                opset_version=opset,
                optimize=False,  # see _simplify
                verbose=False,
                # One entry for the wrapper's ``*inputs``: a tuple with each input's dynamic batch axis.
                dynamic_shapes={"inputs": tuple({0: batch} for _ in spec.input_names)},
            )
            _simplify(program.model)
            program.save(str(path), external_data=True)
        else:
            axes = {name: {0: BATCH} for name in spec.input_names + spec.output_names}
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamo=False,
                opset_version=opset,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
            _gather_external_data(path)
    seconds = time.perf_counter() - started
    onnx.checker.check_model(str(path))  # by path: works above 2 GB
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    files = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name)]
    logger.info("exported %s in %.1f s (%s)", path.name, seconds, ", ".join(sorted(files)))
    return {"seconds": round(seconds, 2), "files": sorted(files)}


class _Namespaced(torch.nn.Module):
    """``module`` one level down, under a name of ours.

    The dynamo exporter turns the module into a ``torch.fx.GraphModule`` whose top-level attributes are the module's
    top-level children, parameters and buffers. Names that the GraphModule itself uses (``meta``, ``graph``, ``code``,
    ``shape_env``, ...) collide: ``fx`` refuses the graph with "references nonexistent attribute 0 of meta" (the
    kv-prompt adapter's meta-network was such a child). One level down, children are plain modules, where any name
    works, so no graph module's naming can break the export.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.exported = module

    def forward(self, *inputs):
        return self.exported(*inputs)


def _simplify(model) -> None:
    """The exporter's own ``optimize`` without its pattern rewriter, in place on the ``onnx_ir`` model.

    Constant folding does nearly all of the clean-up: on the micro model's scorer it takes 3,200 nodes to 1,320 in
    3 s. The rewriter's rules remove some 80 more no-op nodes (divisions by 1, identities, reshapes to the same shape)
    but take 12 s more, a fifth of that graph's whole export, because they try every rule at every node. ONNX Runtime
    and TensorRT remove such nodes themselves when they load a graph.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript.optimizer as optimizer

    optimizer.inline(model)
    for _ in range(2):  # the exporter's default: a second round folds what the first one exposed
        folded = optimizer.fold_constants(model, onnx_shape_inference=True)
        optimizer.remove_unused_nodes(model)
        if not folded.modified:
            break
    ir.passes.Sequential(
        common.IdentityEliminationPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The dynamo exporter and onnxscript log every pass at INFO and warn about optional torchvision ops; our own log
    line says what was exported, and the checker and parity report say whether it is right."""
    names = ("torch.onnx", "onnxscript", "onnx_ir")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _gather_external_data(path: Path) -> None:
    """Large TorchScript exports scatter one file per tensor; keep them in a single ``.onnx.data`` file."""
    import onnx

    scattered = [
        p for p in path.parent.iterdir() if p != path and not p.suffix == ".onnx" and not p.name.startswith(path.name)
    ]
    if not scattered and path.stat().st_size < _TWO_GB:
        return
    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    referenced = {path.name, path.name + ".data"}
    for stray in scattered:
        if stray.name not in referenced and stray.is_file():
            stray.unlink()
