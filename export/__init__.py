"""dsdkit.export: ONNX scoring graphs with folded adapters, fp16, parity reports, TensorRT engines and bundles.

Heavy imports (torch, onnx) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from .bundle import ExportConfig, Progress, add_engines, export_bundle, parse_batch
from .parity import ParitySettings

__all__ = ["ExportConfig", "ParitySettings", "Progress", "export_bundle", "add_engines", "parse_batch"]
