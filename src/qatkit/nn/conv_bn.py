"""Conv (or Linear) + BatchNorm folded for QAT (Jacob et al. 2018; Krishnamoorthi 2018).

Deployed, BN disappears into the conv: w_f = w·γ/σ, b_f = β + (b - μ)·γ/σ with running μ, σ.
While BN still learns (training, before `bn_frozen`), the weight is quantized folded with the running
σ, scaled back (the conv output with it) and BN normalises with batch statistics, so the statistics keep
adapting to the quantized weights. After freezing, training and eval use the folded layer as deployed.
"""
from __future__ import annotations

import torch
from torch import nn

from qatkit.config import QuantSpec
from qatkit.devices import HostBuffers
from qatkit.nn.qlayer import QConv, QConvTranspose, QLinear
from qatkit.primitives.fake_quant import per_channel_view
from qatkit.quantizer import FakeQuantizer


class FoldedBn(HostBuffers):
    """A conv (QConv, QConvTranspose) or Linear with the BatchNorm after it folded in, per output channel (the
    weight's `weight_axis`)."""

    host_buffers = ("bn_frozen",)

    def __init__(self, conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm, weight_spec: QuantSpec, **kw):
        super().__init__(conv, weight_spec, **kw)
        self.bn = bn
        self.register_buffer("bn_frozen", torch.tensor(False))

    def _gamma_over_sigma(self) -> torch.Tensor:  # (C,); γ = 1 for a BN without affine parameters
        inv_sigma = torch.rsqrt(self.bn.running_var + self.bn.eps)
        return inv_sigma if self.bn.weight is None else self.bn.weight * inv_sigma

    def folded(self):
        g = self._gamma_over_sigma()
        return self.weight * per_channel_view(g, self.weight, self.weight_axis), self._folded_bias(g)

    def _folded_bias(self, g: torch.Tensor) -> torch.Tensor:
        b = (self.bias if self.bias is not None else torch.zeros_like(g)) - self.bn.running_mean
        return b * g if self.bn.bias is None else b * g + self.bn.bias

    def fake_quant_forward(self, x: torch.Tensor, in_q: FakeQuantizer | None) -> torch.Tensor:
        if not self.training or bool(self.bn_frozen):
            return super().fake_quant_forward(x, in_q)
        g = self._gamma_over_sigma()
        floor = self.scale_floor(in_q, self._folded_bias(g))  # (the deployed layer's)
        s_w = self.weight_scale(in_q, floor)
        g = per_channel_view(g, self.weight, self.weight_axis)
        # conv(x, q(w·g)/g) = conv(x, q(w·g))/g: undoing the running-σ fold on the weight costs a weight-sized op
        # (the output-sized division and its backward cost as much as the convolution); BN then applies
        # batch statistics
        return self.bn(self.op(x, self.weight_quant(self.weight * g, scale=s_w, floor=floor) / g, self.bias))


class QConvBn(FoldedBn, QConv):
    """Conv1d/2d/3d → BatchNorm."""


class QConvTransposeBn(FoldedBn, QConvTranspose):
    """ConvTranspose1d/2d/3d → BatchNorm (groups = 1: with groups an output channel's weights span groups, and prepare
    leaves BN a float op)."""


class QLinearBn(FoldedBn, QLinear):
    """Linear → BatchNorm1d on its (N, C) output (PointNet's and SimCLR's MLP heads, tabular MLPs)."""
