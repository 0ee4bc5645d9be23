"""QAT wrappers: quantized conv/linear (with folded BN and fused activation), embedding, residual add, global pool,
matmul of two activations."""
from qatkit.nn.conv_bn import QConvBn
from qatkit.nn.qlayer import QConv, QEmbedding, QLayer, QLinear
from qatkit.nn.requant import QAdd, QGlobalAvgPool, QMatMul

__all__ = ["QAdd", "QConv", "QConvBn", "QEmbedding", "QGlobalAvgPool", "QLayer", "QLinear", "QMatMul"]
