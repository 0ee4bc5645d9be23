"""Deployment: ONNX export in QDQ form, ONNX Runtime verification, integer reference, benchmarks."""
from qatkit.export.integer_reference import IntegerReference
from qatkit.export.onnx_qdq import export_onnx
from qatkit.export.ort import verify

__all__ = ["IntegerReference", "export_onnx", "verify"]
