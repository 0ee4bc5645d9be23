"""Integer ops an int8 runtime requantizes: residual add (QLinearAdd), global average pooling
(QLinearGlobalAveragePool) and the matmul of two activations (QLinearMatMul: attention's Q·Kᵀ, weights·V).
Training: float op → output quantizer; eval, once the input quantizers are initialised: the runtime's own
integer arithmetic from `qatkit.kernels`, as the integer model runs it.
"""
from __future__ import annotations

import torch
from torch import nn

from qatkit import kernels
from qatkit.config import QuantSpec
from qatkit.quantizer import FakeQuantizer


def _integer(*quantizers: FakeQuantizer | None) -> bool:
    return all(q is not None and q.active for q in quantizers)


class QAdd(nn.Module):
    """a + b (→ ReLU) → output quantizer."""

    def __init__(self, out_spec: QuantSpec, act: str | None = None):
        super().__init__()
        assert act in (None, "relu"), act
        self.out_quant = FakeQuantizer(out_spec, kind="act")
        self.act = act

    def forward(self, a, b, qa: FakeQuantizer | None = None, qb: FakeQuantizer | None = None):
        if not self.training and _integer(qa, qb, self.out_quant):
            return self.integer_forward(a, b, qa, qb)
        y = a + b
        return self.out_quant(y, relu=bool(self.act))

    @torch.no_grad()
    def integer_forward(self, a, b, qa: FakeQuantizer, qb: FakeQuantizer):
        (s_a, z_a), (s_b, z_b), (s_y, z_y) = qa.qparams(), qb.qparams(), self.out_quant.qparams()
        lo, hi = kernels.activation_bounds(self.act, s_y, z_y, *self.out_quant.qrange)
        signed = tuple(q.qrange[0] < 0 for q in (qa, qb, self.out_quant))
        codes = kernels.add_requant(qa.codes(a), z_a, s_a, qb.codes(b), z_b, s_b, s_y, z_y, lo, hi, signed)
        return (codes - z_y) * s_y


class QGlobalAvgPool(nn.Module):
    """Mean over every spatial axis, keeping them as size 1 (AdaptiveAvgPool to 1) → output quantizer."""

    def __init__(self, out_spec: QuantSpec):
        super().__init__()
        self.out_quant = FakeQuantizer(out_spec, kind="act")

    def forward(self, x, in_q: FakeQuantizer | None = None):
        if not self.training and _integer(in_q, self.out_quant):
            return self.integer_forward(x, in_q)
        return self.out_quant(x.mean(dim=tuple(range(2, x.dim())), keepdim=True))

    @torch.no_grad()
    def integer_forward(self, x, in_q: FakeQuantizer):
        (s_x, z_x), (s_y, z_y) = in_q.qparams(), self.out_quant.qparams()
        lo, hi = kernels.activation_bounds(None, s_y, z_y, *self.out_quant.qrange)
        codes = kernels.global_avgpool_requant(in_q.codes(x), z_x, s_x, s_y, z_y, lo, hi)
        return (codes - z_y) * s_y


class QMatMul(nn.Module):
    """a @ b of two activations (neither a weight) → output quantizer."""

    def __init__(self, out_spec: QuantSpec):
        super().__init__()
        self.out_quant = FakeQuantizer(out_spec, kind="act")

    def forward(self, a, b, qa: FakeQuantizer | None = None, qb: FakeQuantizer | None = None):
        if not self.training and _integer(qa, qb, self.out_quant):
            return self.integer_forward(a, b, qa, qb)
        return self.out_quant(a @ b)

    @torch.no_grad()
    def integer_forward(self, a, b, qa: FakeQuantizer, qb: FakeQuantizer):
        (s_a, z_a), (s_b, z_b), (s_y, z_y) = qa.qparams(), qb.qparams(), self.out_quant.qparams()
        lo, hi = kernels.activation_bounds(None, s_y, z_y, *self.out_quant.qrange)
        codes = kernels.matmul_requant(qa.codes(a), z_a, s_a, qb.codes(b), z_b, s_b, s_y, z_y, lo, hi)
        return (codes - z_y) * s_y
