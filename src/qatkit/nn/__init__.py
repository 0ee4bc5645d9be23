"""QAT wrappers: quantized conv/linear (with folded BN and fused activation), residual add, global pool."""
from qatkit.nn.conv_bn import QConvBn
from qatkit.nn.qlayer import QConv, QLayer, QLinear
from qatkit.nn.requant import QAdd, QGlobalAvgPool

__all__ = ["QAdd", "QConv", "QConvBn", "QGlobalAvgPool", "QLayer", "QLinear"]
