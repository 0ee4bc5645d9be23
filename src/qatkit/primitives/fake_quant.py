"""Uniform affine fake quantization with straight-through / LSQ gradients.

    q  = clamp(round(x / s) + z, qmin, qmax)      round half to even (ONNX QuantizeLinear's rule)
    x̂ = (q - z) * s

Gradients (one autograd Function; per-tensor float32 on the CPU: one fused loop each way, see cpu_kernel):
    dx̂/dx = 1 inside the clamp range, 0 outside              (straight-through estimator)
    dx̂/ds = round(x/s) - x/s inside, qmin - z below, qmax - z above      (LSQ, Esser et al. 2019)
    dx̂/dz = 0 inside, -s outside                              (learnable zero point, LSQ+)
The scale and zero-point gradients are multiplied by `grad_scale` (LSQ: 1/sqrt(N * qmax)).
`s` and `z` are per-tensor (0-d) or per-channel (1-d, length x.shape[axis]); `z` holds integers.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qatkit.primitives import cpu_kernel


def per_channel_view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View a (C,) parameter so it broadcasts along `axis` of x; 0-d parameters pass through."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.view(shape)


def _forward(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def _backward(x: torch.Tensor, grad: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
              dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, Σ dL/dx̂·dx̂/ds, Σ dL/dx̂ where clamped) recomputed from x: nothing but x is saved."""
    xs = x / s
    unclamped = torch.round(xs) + z
    codes = torch.clamp(unclamped, qmin, qmax)
    inside = unclamped == codes
    grad_x = torch.where(inside, grad, 0.0)
    grad_s = (grad * torch.where(inside, codes - z - xs, codes - z)).sum(dims)
    grad_clamped = torch.where(inside, 0.0, grad).sum(dims)
    return grad_x, grad_s, grad_clamped


def _flat(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """t as one flat run in the memory order of `like` (a view when t is laid out as `like` is dense,
    e.g. channels-last), and the function that gives a flat result like's shape and layout back."""
    if like.is_contiguous():
        return t.reshape(-1), lambda flat: flat.view(like.shape)
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    inverse = [order.index(d) for d in range(like.dim())]
    permuted = t.permute(order)
    return permuted.reshape(-1), lambda flat: flat.view(permuted.shape).permute(inverse)


class _FakeQuantize(torch.autograd.Function):
    """Per-tensor float32 on the CPU (activations): the fused kernel of primitives.cpu_kernel, x seen as one
    flat run of memory whatever its shape and layout; otherwise the eager formulas above."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_scale):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange, ctx.axis, ctx.grad_scale = (qmin, qmax), axis, grad_scale
        if cpu_kernel.usable(x, scale):
            z = float(zero_point)
            flat, restore = _flat(x, x)
            return restore(cpu_kernel.forward(flat, float(scale), z, qmin, qmax))
        s, z = per_channel_view(scale, x, axis), per_channel_view(zero_point, x, axis)
        return _forward(x, s, z, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        (qmin, qmax), axis = ctx.qrange, ctx.axis
        if cpu_kernel.usable(x, scale) and grad.dtype == x.dtype:
            z = float(zero_point)
            (flat_x, restore), (flat_grad, _) = _flat(x, x), _flat(grad, x)
            grad_x, sum_s, sum_clamped = cpu_kernel.backward(flat_x, flat_grad, float(scale), z, qmin, qmax)
            grad_x, grad_s, grad_clamped = restore(grad_x), scale.new_tensor(sum_s), scale.new_tensor(sum_clamped)
        else:
            s, z = per_channel_view(scale, x, axis), per_channel_view(zero_point, x, axis)
            dims = tuple(range(x.dim())) if scale.dim() == 0 else tuple(d for d in range(x.dim()) if d != axis % x.dim())
            grad_x, grad_s, grad_clamped = _backward(x, grad, s, z, qmin, qmax, dims)
        grad_s = grad_s * ctx.grad_scale if ctx.needs_input_grad[1] else None
        grad_z = grad_clamped * -scale * ctx.grad_scale if ctx.needs_input_grad[2] else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_s, grad_z, None, None, None, None


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
