"""Deployment: ONNX export in QDQ form, ONNX Runtime verification, integer reference, benchmarks."""
from qatkit.export.onnx_qdq import export_onnx
from qatkit.export.ort import verify

__all__ = ["export_onnx", "verify"]
