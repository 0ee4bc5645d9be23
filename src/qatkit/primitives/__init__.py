"""Pure quantization math: no nn.Module, no state."""
from qatkit.primitives.fake_quant import fake_quantize, lsq_grad_scale, quantize_codes
from qatkit.primitives.qparams import (
    INIT_METHODS,
    qparams_from_minmax,
    qparams_from_tensor,
)
from qatkit.primitives.ranges import qrange

__all__ = [
    "INIT_METHODS",
    "fake_quantize",
    "lsq_grad_scale",
    "qparams_from_minmax",
    "qparams_from_tensor",
    "qrange",
    "quantize_codes",
]
