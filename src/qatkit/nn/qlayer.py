"""Quantized Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear (and Embedding, at the end) for QAT.

Training forward (fake quantization, STE/LSQ gradients):
    y = op(x̂, q(w), b̂) → fused ReLU/ReLU6 → output quantizer (if the next op consumes integers)
with b̂ the bias rounded to int32 at scale s_x·s_w, as the integer runtime adds it.
Eval forward, once every quantizer is initialised: the integer path of `qatkit.kernels`, the same
code the converted integer model runs, so the two agree bit for bit.
The layer's input quantizer belongs to whoever produced x (passed as `in_q`); a layer prepared by
module swap, with no graph to say who that is, owns one (`input_quant`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from qatkit import kernels
from qatkit.config import QuantSpec
from qatkit.errors import ConfigError
from qatkit.primitives.fake_quant import per_channel_view
from qatkit.quantizer import FakeQuantizer

class QLayer(nn.Module):
    out_axis = 1  # axis of the output channels in the layer's output
    weight_axis = 0  # and in its weight (per-channel scales)

    def __init__(self, float_module: nn.Module, weight_spec: QuantSpec, *, act: str | None = None,
                 out_spec: QuantSpec | None = None, input_spec: QuantSpec | None = None,
                 layer_scale: nn.Parameter | None = None):
        super().__init__()
        assert act in kernels.ACTIVATIONS, act
        self.weight, self.bias = float_module.weight, float_module.bias
        self.layer_scale = layer_scale  # γ of `γ * layer(x)` (LayerScale), one per output channel: folded in
        if weight_spec.per_channel and weight_spec.axis != self.weight_axis:
            weight_spec = dataclasses.replace(weight_spec, axis=self.weight_axis)
        self.weight_quant = FakeQuantizer(weight_spec, kind="weight", channels=self.weight.shape[self.weight_axis])
        self.out_quant = FakeQuantizer(out_spec, kind="act") if out_spec else None
        self.input_quant = FakeQuantizer(input_spec, kind="act") if input_spec else None
        self.act = act
        self._last_input_quant: tuple[FakeQuantizer, ...] = ()  # a tuple, so that it is no submodule
        if parametrize.is_parametrized(float_module, "weight"):  # weight_norm, spectral_norm: the weight is computed
            self.weight = nn.Parameter(self.weight.detach())  # (a placeholder the parametrization replaces)
            parametrize.transfer_parametrizations_and_params(float_module, self, "weight")  # from what trains

    @property
    def last_input_quant(self) -> FakeQuantizer | None:
        """Quantizer of the last forward's input (None if it was float), for the error regulariser and trackers."""
        return self._last_input_quant[0] if self._last_input_quant else None

    def scale_floor(self, in_q: FakeQuantizer | None, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The least weight scale (per channel, or for the tensor) at which the bias's int32 code at s_x·s_w leaves
        room for the products' sum: |b|/(s_x·2^30) (kernels.bias_scale_floor). A pruned channel (all-zero weights, a BN
        γ of 0) has its own scale at the floor of 1e-8, where a bias of 1 saturated the code (the output 45 steps
        off) and tiny weights beside it wrapped the integer sum; only a scale that small moves. None without a bias
        (the folded one) or a quantized input."""
        if bias is None or in_q is None or not in_q.active:
            return None
        floor = kernels.bias_scale_floor(bias.detach(), in_q.qparams()[0], self.weight_quant.spec.power_of_two)
        return floor if self.weight_quant.scale.numel() > 1 else floor.max()

    def weight_scale(self, in_q: FakeQuantizer | None, floor: torch.Tensor | None) -> torch.Tensor | None:
        """The weight scale where it is not the weight quantizer's own (at least `floor`), else None: with exact
        multipliers (QuantSpec.exact_multiplier) and both the input and the output quantized, s_w nudged so that the
        requantization multiplier s_x·s_w/s_y lies on `kernels.exact_multiplier_scale`'s grid (ONNX Runtime's float32
        requantization and integer-only hardware's fixed-point one then compute the same integers); its value that
        scale, its gradient straight through to the quantizer's own."""
        wq, out_q = self.weight_quant, self.out_quant
        if not (wq.spec.exact_multiplier and bool(wq.initialized) and in_q is not None and in_q.active
                and out_q is not None and out_q.active):
            return None
        s_w = wq.scale_zp(floor)[0]
        exact = kernels.exact_multiplier_scale(in_q.qparams()[0], s_w.detach(), out_q.qparams()[0], int(out_q.bits))
        return exact + (s_w - s_w.detach())

    def weight_qscale(self, in_q: FakeQuantizer | None, bias: torch.Tensor | None) -> torch.Tensor:
        """The weight scale the layer quantizes with (detached); `bias`: the folded one (folded()[1])."""
        floor = self.scale_floor(in_q, bias)
        s_w = self.weight_scale(in_q, floor)
        return self.weight_quant.qparams(floor)[0] if s_w is None else s_w.detach()

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the integer layer holds: γ·w and γ·b with a layer scale γ (QConvBn folds BatchNorm
        in)."""
        if self.layer_scale is None:
            return self.weight, self.bias
        g = self.layer_scale.reshape(-1)
        w = self.weight * per_channel_view(g, self.weight, self.weight_axis)
        return w, None if self.bias is None else self.bias * g

    def forward(self, x: torch.Tensor, in_q: FakeQuantizer | None = None) -> torch.Tensor:
        if self.input_quant is not None:
            x, in_q = self.input_quant(x), self.input_quant
        quantized = in_q is not None and in_q.active and bool(self.weight_quant.enabled)
        self._last_input_quant = (in_q,) if quantized else ()
        if quantized and not self.training and bool(self.weight_quant.initialized):
            return self.integer_forward(x, in_q)
        y = self.fake_quant_forward(x, in_q if quantized else None)
        if self.act == "relu" and self.out_quant is not None:
            return self.out_quant(y, relu=True)  # one fused pass where the fake-quant kernel runs
        y = {"relu": F.relu, "relu6": F.relu6}[self.act](y) if self.act else y
        return self.out_quant(y) if self.out_quant is not None else y

    def fake_quant_forward(self, x: torch.Tensor, in_q: FakeQuantizer | None) -> torch.Tensor:
        w, b = self.folded()
        floor = self.scale_floor(in_q, b)
        s_w = self.weight_scale(in_q, floor)
        w_hat = self.weight_quant(w, scale=s_w, floor=floor)
        if b is not None and in_q is not None:  # bias as int32 at scale s_x·s_w; no gradient to the scales
            bias_scale = in_q.qparams()[0] * (self.weight_quant.qparams(floor)[0] if s_w is None else s_w.detach())
            b = b + (kernels.bias_codes(b, bias_scale).to(b.dtype) * bias_scale - b).detach()
        return self.op(x, w_hat, b)

    @torch.no_grad()
    def integer_forward(self, x: torch.Tensor, in_q: FakeQuantizer) -> torch.Tensor:
        s_x, z_x = in_q.qparams()
        w, b = self.folded()
        s_w = self.weight_qscale(in_q, b)
        q_b = None if b is None else kernels.bias_codes(b, s_x * s_w)
        acc = kernels.wrap_int32(self.op((in_q.codes(x) - z_x).double(), self.weight_quant.codes(w, s_w).double(), q_b))
        if self.out_quant is None:
            return kernels.dequantize_acc(acc, s_x * s_w, self.act, self.out_axis)
        s_y, z_y = self.out_quant.qparams()
        lo, hi = kernels.activation_bounds(self.act, s_y, z_y, *self.out_quant.qrange)
        q_y = kernels.requantize(acc, kernels.multiplier(s_x, s_w, s_y), z_y, lo, hi, self.out_axis)
        return (q_y - z_y) * s_y


class QLinear(QLayer):
    out_axis = -1

    def op(self, x, w, b):
        return F.linear(x, w, b)


class QConv(QLayer):
    """Conv1d / Conv2d / Conv3d (any groups, stride, padding — numbers, 'same' or 'valid' — dilation and padding
    mode)."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, weight_spec: QuantSpec, **kw):
        super().__init__(conv, weight_spec, **kw)
        self.dim = conv.weight.dim() - 2
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.pads, self.padding_mode = kernels.conv_pads(conv), conv.padding_mode  # pads: ONNX order

    def op(self, x, w, b):
        return kernels.conv(x, w, b, self.stride, self.pads, self.padding_mode, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"conv{self.dim}d, stride={self.stride}, pads={self.pads}, padding_mode={self.padding_mode}, "
                f"groups={self.groups}, act={self.act}")


class QConvTranspose(QLayer):
    """ConvTranspose1d / 2d / 3d (stride, padding, output_padding, dilation; zero padding). The weight
    (C_in, C_out/groups, *k) has its output channels on axis 1: per-channel scales there; with groups > 1 an output
    channel's weights span groups, so its scales are per tensor."""

    weight_axis = 1

    def __init__(self, conv: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d, weight_spec: QuantSpec, **kw):
        if conv.padding_mode != "zeros":
            raise ConfigError(f"{conv} pads in mode {conv.padding_mode!r}; allowed: 'zeros' (the only mode PyTorch's "
                              "transposed convs run). Fix: build it with padding_mode='zeros'")
        if conv.groups > 1 and weight_spec.per_channel:
            weight_spec = dataclasses.replace(weight_spec, per_channel=False)
        super().__init__(conv, weight_spec, **kw)
        self.dim = conv.weight.dim() - 2
        self.stride, self.padding, self.output_padding = conv.stride, conv.padding, conv.output_padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def op(self, x, w, b):
        return kernels.conv_transpose(x, w, b, self.stride, self.padding, self.output_padding, self.dilation,
                                      self.groups)

    def extra_repr(self) -> str:
        return (f"conv_transpose{self.dim}d, stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}, groups={self.groups}, act={self.act}")


class QEmbedding(QLayer):
    """An embedding table quantized per row (one scale per token): y = codes[ids]·s[ids].

    Its input is integer ids, not a quantized activation, and its output the float product, which is exact in
    float32 and what the integer runtime computes after gathering int8 (or packed 4/2-bit) codes; training
    looks rows up in the fake-quantized table, which holds the same values.
    """

    def __init__(self, embedding: nn.Embedding, weight_spec: QuantSpec):
        nn.Module.__init__(self)
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ConfigError(f"{embedding} uses max_norm, scale_grad_by_freq or sparse gradients; allowed: a plain "
                              "nn.Embedding. Fix: build it without them, or skip it (LayerRule(pattern=..., skip=True))")
        self.weight, self.bias, self.padding_idx, self.layer_scale = embedding.weight, None, embedding.padding_idx, None
        self.weight_quant = FakeQuantizer(weight_spec, kind="weight", channels=self.weight.shape[0])
        self.out_quant = self.input_quant = self.act = None
        self._last_input_quant = ()

    def forward(self, ids: torch.Tensor, in_q: FakeQuantizer | None = None) -> torch.Tensor:
        wq = self.weight_quant
        if not self.training and bool(wq.enabled) and bool(wq.initialized):
            return self.integer_forward(ids)
        return F.embedding(ids, wq(self.weight), self.padding_idx)  # a disabled quantizer passes the table through

    @torch.no_grad()
    def integer_forward(self, ids: torch.Tensor, in_q: FakeQuantizer | None = None) -> torch.Tensor:
        s_w = self.weight_quant.qparams()[0].expand(self.weight.shape[0]).reshape(-1, 1)  # (V, 1): per row or one
        return F.embedding(ids, self.weight_quant.codes(self.weight)) * F.embedding(ids, s_w)
