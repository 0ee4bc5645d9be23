"""QAT wrappers: quantized conv/linear (with folded BN and fused activation)."""
from qatkit.nn.conv_bn import QConvBn
from qatkit.nn.qlayer import QConv, QLayer, QLinear

__all__ = ["QConv", "QConvBn", "QLayer", "QLinear"]
