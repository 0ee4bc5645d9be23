"""qatkit: quantization-aware training from any float PyTorch model to a packed integer model
that computes exactly what was trained.

    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4), example_x)
    qatkit.calibrate(qat, batches)
    qatkit.fit(qat, train_loader, qatkit.TrainConfig(epochs=10), teacher=model)
    qatkit.save(qatkit.convert(qat), "model.safetensors")
"""
from qatkit.calibrate import calibrate
from qatkit.config import LayerRule, QATConfig, QuantSpec, TrainConfig
from qatkit.convert import IntegerModel, convert, load, save
from qatkit.errors import ConfigError, DataError, ModelFileError, QatkitError
from qatkit.prepare import prepare
from qatkit.regularize import quantization_error_penalty, quantization_errors
from qatkit.report import describe
from qatkit.sensitivity import sensitivity
from qatkit.train import evaluate, fit

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "DataError", "IntegerModel", "LayerRule", "ModelFileError", "QATConfig", "QatkitError",
    "QuantSpec", "TrainConfig", "calibrate", "convert", "describe", "evaluate", "fit", "load", "prepare",
    "quantization_error_penalty", "quantization_errors", "save", "sensitivity",
]


def __getattr__(name: str):
    """qatkit.export (ONNX export, verify; it imports onnx and onnxruntime) on first use, without its own import."""
    if name == "export":
        import importlib

        return importlib.import_module("qatkit.export")
    raise AttributeError(f"module 'qatkit' has no attribute {name!r}")
