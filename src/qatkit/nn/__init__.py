"""QAT wrappers: quantized conv/linear (with folded BN and fused activation), embedding, residual add, global pool,
matmul of two activations."""
from qatkit.nn.conv_bn import FoldedBn, QConvBn, QConvTransposeBn, QLinearBn
from qatkit.nn.qlayer import QConv, QConvTranspose, QEmbedding, QLayer, QLinear
from qatkit.nn.requant import QAdd, QGlobalAvgPool, QMatMul

__all__ = ["FoldedBn", "QAdd", "QConv", "QConvBn", "QConvTranspose", "QConvTransposeBn", "QEmbedding", "QGlobalAvgPool",
           "QLayer", "QLinear", "QLinearBn", "QMatMul"]
