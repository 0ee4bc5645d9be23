"""Integer arithmetic of a deployed layer, shared by the QAT model's eval forward and the converted
integer model, so both compute the same integers by construction.

A quantized conv/linear with input codes q_x (zero point z_x), weight codes q_w (symmetric) and int32
bias q_b = round(b / (s_x·s_w)) accumulates exactly
    acc = Σ (q_x - z_x)·q_w + q_b                           (int32; computed in float64, exact)
and requantizes to the output codes as an integer runtime does (ONNX Runtime's CPU kernels):
    q_y = clamp(round_half_even(float32(acc) · M) + z_y, lo, hi),   M = float32(s_x·s_w / s_y)
with [lo, hi] narrowed by a fused ReLU/ReLU6.
"""
from __future__ import annotations

import torch

from qatkit.primitives.fake_quant import per_channel_view

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ACTIVATIONS = (None, "relu", "relu6")


def bias_codes(bias: torch.Tensor, bias_scale: torch.Tensor) -> torch.Tensor:
    """int32 bias codes at scale s_x·s_w (as float64 integers)."""
    return torch.clamp(torch.round(bias.double() / bias_scale.double()), INT32_MIN, INT32_MAX)


def multiplier(s_in: torch.Tensor, s_w: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """Requantization multiplier M = s_in·s_w / s_out in float32, per output channel."""
    return (s_in.float() * s_w.float()) / s_out.float()


def activation_bounds(act: str | None, s_out: torch.Tensor, z_out: torch.Tensor, qmin: int, qmax: int):
    """Integer [lo, hi] of the output codes: the quantized range narrowed by a fused ReLU / ReLU6."""
    lo, hi = torch.tensor(float(qmin)), torch.tensor(float(qmax))
    if act in ("relu", "relu6"):
        lo = torch.maximum(lo, z_out)
    if act == "relu6":
        hi = torch.minimum(hi, torch.round(6.0 / s_out) + z_out)
    return lo, hi


def requantize(acc: torch.Tensor, mult: torch.Tensor, z_out: torch.Tensor, lo, hi, axis: int) -> torch.Tensor:
    """Output codes from the int32 accumulator (float values that are integers)."""
    m = per_channel_view(mult, acc, axis)
    return torch.clamp(torch.round(acc.float() * m) + z_out, lo, hi)


def dequantize_acc(acc: torch.Tensor, bias_scale: torch.Tensor, act: str | None, axis: int) -> torch.Tensor:
    """Float output of a layer without an output quantizer: float32(acc)·s_x·s_w, then the activation."""
    y = acc.float() * per_channel_view(bias_scale.float(), acc, axis)
    if act == "relu":
        return torch.relu(y)
    if act == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    return y
