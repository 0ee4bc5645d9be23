"""Uniform affine fake quantization with straight-through / LSQ gradients.

    q  = clamp(round(x / s) + z, qmin, qmax)      round half to even (ONNX QuantizeLinear's rule)
    x̂ = (q - z) * s

Gradients (one autograd Function; float32 on the CPU: one fused loop each way, see cpu_kernel):
    dx̂/dx = 1 inside the clamp range, 0 outside              (straight-through estimator)
    dx̂/ds = round(x/s) - x/s inside, qmin - z below, qmax - z above      (LSQ, Esser et al. 2019)
    dx̂/dz = 0 inside, -s outside                              (learnable zero point, LSQ+)
The scale and zero-point gradients are multiplied by `grad_scale` (LSQ: 1/sqrt(N * qmax)).
`s` and `z` are per-tensor (0-d) or per-channel (1-d, length x.shape[axis]); `z` holds integers.

With map_scale (ABS or POWER_OF_TWO) / map_zero_point, fake_quantize takes a quantizer's raw parameters instead:
s = max(|scale|, MIN_SCALE) (POWER_OF_TWO: then its nearest power of two, straight through the rounding)
and z = round(clamp(zero_point, qmin, qmax)) (straight through the rounding),
mapped and differentiated inside the same autograd node: the same values and gradients as those small ops in
autograd, without the per-call cost of their nodes (a dozen per quantizer, as much time as fake-quantizing a small
activation).
"""
from __future__ import annotations

import math
import torch

from qatkit.primitives import cpu_kernel
from qatkit.primitives.qparams import MIN_SCALE, power_of_two_nearest

ABS, POWER_OF_TWO = 1, 2  # map_scale: s = max(|scale|, MIN_SCALE); then 2^round(log2 s)


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


def _memory_order(x: torch.Tensor) -> list[int]:
    """x's dimensions from the largest stride to the smallest."""
    return sorted(range(x.dim()), key=lambda d: -x.stride(d))


AS_IS = ()  # the kernel order of a contiguous tensor: read as it is


def _kernel_order(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None) -> list[int] | None:
    """The order in which the fused kernel reads x (one flat run; per-channel: channel by channel): AS_IS for a
    contiguous x, else x's dimensions in memory order; None where it cannot (not float32 on the CPU, or a per-channel
    axis that is not x's outermost in memory)."""
    if not cpu_kernel.usable(x, scale, zero_point):
        return None
    if x.is_contiguous():
        return AS_IS if scale.dim() == 0 or axis % x.dim() == 0 else None
    order = _memory_order(x)
    return order if scale.dim() == 0 or order[0] == axis % x.dim() else None


def _flatten(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """t read in `order` as one dense run (a view of t when t is laid out that way, else a copy: a reshape's flat view
    may step over memory, x[:, ::2], or stand still, a gradient expanded from a sum); AS_IS: t contiguous, in its
    shape (the kernel reads memory, not shapes, and writes its results in that shape)."""
    if order is AS_IS:
        return t.contiguous()
    return t.permute(order).contiguous().view(-1)


def _unflatten(flat: torch.Tensor, like: torch.Tensor, order: list[int]) -> torch.Tensor:
    """The inverse of _flatten: like's shape, in like's layout."""
    if order is AS_IS:
        return flat
    return flat.view([like.shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])


class _FakeQuantize(torch.autograd.Function):
    """Float32 on the CPU: the fused kernel of primitives.cpu_kernel, reading x in memory order (per-tensor: any
    shape and layout; per-channel: the channel axis outermost, as for weights); otherwise the eager formulas."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, how):
        """how: (qmin, qmax, axis, grad_scale, relu, map_scale, map_zero_point, order), one argument (each one costs
        the call time). relu=True (kernel path only): fake-quantize relu(x), with relu's gradient, in the same pass.
        map_scale / map_zero_point: `scale` / `zero_point` are raw parameters (see fake_quantize).
        order: _kernel_order(x, scale, zero_point, axis)."""
        ctx.save_for_backward(x, scale, zero_point)
        ctx.how = how
        qmin, qmax, axis, _, relu, map_scale, map_zero_point, order = how
        if order is not None:
            y = cpu_kernel.forward(_flatten(x, order), scale, zero_point, qmin, qmax, relu, map_scale, map_zero_point)
            return _unflatten(y, x, order)
        assert not relu, "relu is fused on the kernel path only"
        s, z = _mapped(scale, zero_point, qmin, qmax, map_scale, map_zero_point)
        return _forward(x, per_channel_view(s, x, axis), per_channel_view(z, x, axis), qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, axis, grad_scale, relu, map_s, map_z, order = ctx.how
        order = order if grad.dtype == x.dtype else None
        if order is not None:  # the parameter gradients, chain rule and LSQ scale included, come from the kernel
            grad_x, grad_s, grad_z = cpu_kernel.backward(_flatten(x, order), _flatten(grad, order), scale, zero_point,
                                                         qmin, qmax, relu, map_s, map_z, grad_scale)
            grad_x = _unflatten(grad_x, x, order)
        else:
            s, z = _mapped(scale, zero_point, qmin, qmax, map_s, map_z)
            dims = tuple(range(x.dim())) if s.dim() == 0 else tuple(d for d in range(x.dim()) if d != axis % x.dim())
            grad_x, grad_s, grad_clamped = _backward(x, grad, per_channel_view(s, x, axis), per_channel_view(z, x, axis),
                                                     qmin, qmax, dims)
            grad_s, grad_z = grad_s * grad_scale, grad_clamped * -s * grad_scale
            if map_s:  # the chain rule through |.|, the floor (clamp_min), the clamp and round (1): autograd's masks
                if map_s == POWER_OF_TWO:  # d 2^round(log2 a) / da straight through the rounding: 2^round(log2 a) / a
                    grad_s = grad_s * (s / scale.abs().clamp_min(MIN_SCALE))
                grad_s = torch.where(scale.abs() >= MIN_SCALE, grad_s, 0.0) * scale.sgn()
            if map_z:
                grad_z = torch.where((zero_point >= qmin) & (zero_point <= qmax), grad_z, 0.0)
        needs = ctx.needs_input_grad
        return grad_x if needs[0] else None, grad_s if needs[1] else None, grad_z if needs[2] else None, None


def _mapped(scale, zero_point, qmin: int, qmax: int, map_scale: int, map_zero_point: bool):
    s = scale.abs().clamp_min(MIN_SCALE) if map_scale else scale
    s = power_of_two_nearest(s) if map_scale == POWER_OF_TWO else s
    return s, zero_point.clamp(qmin, qmax).round() if map_zero_point else zero_point


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_scale: float = 1.0,
    relu: bool = False,
    *,
    map_scale: int = 0,
    map_zero_point: bool = False,
) -> torch.Tensor:
    """x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) * s with STE/LSQ gradients (see module doc); of relu(x)
    with relu=True (fused into the kernel where it runs: no relu tensor, no second pass). A quantizer's raw
    parameters: map_scale takes s = max(|scale|, MIN_SCALE) (POWER_OF_TWO: its nearest power of two),
    map_zero_point z = round(clamp(zero_point, qmin, qmax)); the gradients then go to the raw `scale` and
    `zero_point`."""
    order = _kernel_order(x, scale, zero_point, axis)
    if relu and order is None:
        x, relu = torch.relu(x), False
    return _FakeQuantize.apply(x, scale, zero_point, (qmin, qmax, axis, grad_scale, relu, map_scale, map_zero_point,
                                                      order))


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """The integer codes q = clamp(round(x/s) + z, qmin, qmax), as a float tensor of integers."""
    s, z = per_channel_view(scale, x, axis), per_channel_view(zero_point, x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Q_P): N elements share one scale, Q_P = qmax."""
    return 1.0 / math.sqrt(max(numel_per_scale, 1) * max(qmax, 1))
