"""dsdkit.export: ONNX scoring graphs, fp16, TensorRT engines and bundles (see the Export issue; not implemented yet)."""
