"""Uniform affine fake quantization with straight-through / LSQ gradients.

    q  = clamp(round(x / s) + z, qmin, qmax)      round half to even (ONNX QuantizeLinear's rule)
    x̂ = (q - z) * s

Gradients (one autograd Function, so training does no per-op Python work):
    dx̂/dx = 1 inside the clamp range, 0 outside              (straight-through estimator)
    dx̂/ds = round(x/s) - x/s inside, qmin - z below, qmax - z above      (LSQ, Esser et al. 2019)
    dx̂/dz = 0 inside, -s outside                              (learnable zero point, LSQ+)
The scale and zero-point gradients are multiplied by `grad_scale` (LSQ: 1/sqrt(N * qmax)).
`s` and `z` are per-tensor (0-d) or per-channel (1-d, length x.shape[axis]); `z` holds integers.
"""
from __future__ import annotations

import math

import torch


def per_channel_view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View a (C,) parameter so it broadcasts along `axis` of x; 0-d parameters pass through."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.view(shape)


def _reduce_to(g: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum an elementwise gradient down to the shape of a per-tensor or per-channel parameter."""
    if like.dim() == 0:
        return g.sum()
    dims = [d for d in range(g.dim()) if d != axis % g.dim()]
    return g.sum(dim=dims)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_scale):
        s, z = per_channel_view(scale, x, axis), per_channel_view(zero_point, x, axis)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange, ctx.axis, ctx.grad_scale = (qmin, qmax), axis, grad_scale
        return (q - z) * s

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        (qmin, qmax), axis = ctx.qrange, ctx.axis
        s, z = per_channel_view(scale, x, axis), per_channel_view(zero_point, x, axis)
        xs = x / s
        rounded = torch.round(xs)
        q = rounded + z
        below, above = q < qmin, q > qmax
        inside = ~(below | above)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, rounded - xs, torch.where(below, qmin - z, qmax - z))
            grad_s = _reduce_to(grad * ds, scale, axis) * ctx.grad_scale
        if ctx.needs_input_grad[2]:
            grad_z = _reduce_to(grad * (~inside) * -s, zero_point, axis) * ctx.grad_scale
        return grad_x, grad_s, grad_z, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) * s with STE/LSQ gradients (see module doc)."""
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, axis, grad_scale)


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """The integer codes q = clamp(round(x/s) + z, qmin, qmax), as a float tensor of integers."""
    s, z = per_channel_view(scale, x, axis), per_channel_view(zero_point, x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Q_P): N elements share one scale, Q_P = qmax."""
    return 1.0 / math.sqrt(max(numel_per_scale, 1) * max(qmax, 1))
