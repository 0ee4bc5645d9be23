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
import torch.nn.functional as F

from qatkit.primitives.fake_quant import per_channel_view
from qatkit.primitives.qparams import power_of_two_ceil

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ACTIVATIONS = (None, "relu", "relu6")


def bias_codes(bias: torch.Tensor, bias_scale: torch.Tensor) -> torch.Tensor:
    """int32 bias codes at scale s_x·s_w (as float64 integers)."""
    return torch.clamp(torch.round(bias.double() / bias_scale.double()), INT32_MIN, INT32_MAX)


BIAS_CODE_LIMIT = 2 ** 30  # the largest |bias code| a layer's weight scale allows: half of int32, the rest for Σ w·x


def bias_scale_floor(bias: torch.Tensor, s_x: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """The smallest weight scale per channel at which the bias's code at s_x·s_w stays within ±BIAS_CODE_LIMIT (up to
    a power of two for power-of-two scales)."""
    floor = bias.abs() / (s_x * BIAS_CODE_LIMIT)
    return torch.where(floor > 0, power_of_two_ceil(floor), 0.0) if power_of_two else floor


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_pads(conv: torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d) -> list[int]:
    """A conv's padding as ONNX `pads` (onnx_pads)."""
    return onnx_pads(conv.padding, conv.kernel_size, conv.dilation)


def onnx_pads(padding, kernel_size, dilation) -> list[int]:
    """A conv's padding (per spatial axis, 'valid' or 'same') as ONNX `pads`, [begin of each spatial axis..., end of
    each...]; 'same' pads an even kernel's extra row at the end, as PyTorch does."""
    if padding == "valid":
        return [0] * 2 * len(kernel_size)
    if padding == "same":
        total = [di * (ki - 1) for ki, di in zip(kernel_size, dilation)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    return list(padding) * 2


def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride, pads: list[int], padding_mode: str,
         dilation, groups: int) -> torch.Tensor:
    """Conv1d/2d/3d with ONNX-style `pads` and PyTorch's padding modes. On centred codes (x − z_x) zero padding is
    the real 0 and reflect/replicate/circular pad copies of codes, so the integer model pads exactly as QAT did."""
    nd = w.dim() - 2
    begin, end = pads[:nd], pads[nd:]
    if padding_mode == "zeros" and begin == end:
        return _CONV[nd](x, w, b, stride, begin, dilation, groups)
    torch_pads = [p for i in reversed(range(nd)) for p in (begin[i], end[i])]  # last axis first
    x = F.pad(x, torch_pads, mode="constant" if padding_mode == "zeros" else padding_mode)
    return _CONV[nd](x, w, b, stride, 0, dilation, groups)


def conv_transpose(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride, padding, output_padding,
                   dilation, groups: int) -> torch.Tensor:
    """ConvTranspose1d/2d/3d (zero padding: on centred codes the real 0)."""
    fn = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[w.dim()]
    return fn(x, w, b, stride, padding, output_padding, groups, dilation)


def wrap_int32(acc: torch.Tensor) -> torch.Tensor:
    """The accumulator as an int32 register holds it: sums beyond ±2^31 wrap around (only degenerate
    layers get there, e.g. a bias saturated at int32 by a near-zero input scale)."""
    return torch.remainder(acc + 2.0**31, 2.0**32) - 2.0**31


def multiplier(s_in: torch.Tensor, s_w: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """Requantization multiplier M = s_in·s_w / s_out in float32, per output channel."""
    return (s_in.float() * s_w.float()) / s_out.float()


_EXACT_STEPS = (torch.arange(-16, 17, dtype=torch.float64),  # grid steps from M, tried nearest first; the second
                torch.cat([torch.arange(-80, -16), torch.arange(17, 81)]).double())  # window only where needed
_EXACT_ULPS = torch.arange(-4, 5, dtype=torch.int32)  # float32 neighbours of M·s_out/s_in (an exact M is within 3)


def exact_multiplier_scale(s_in: torch.Tensor, s_w: torch.Tensor, s_out: torch.Tensor, out_bits: int) -> torch.Tensor:
    """The float32 weight scales s_w' nearest to s_w whose requantization multipliers M = multiplier(s_in, s_w', s_out)
    are multiples of g = 2^-(24 - out_bits). Then float32(acc)·M is exact wherever the output is not saturated
    (|acc·M| < 2^out_bits: acc·M/g is an integer below 2^24), so ONNX Runtime's float32 requantization and
    integer-only hardware's M0·2^-n (one rounding of the exact product) round the same real number. The search
    tries grid points up to 16 steps from M (then up to 80) and, for each, the float32 neighbours of
    s_w = M·s_out/s_in: rounding the product and the quotient to float32 skips some multipliers, now and then the
    grid points near M among them. A channel where none lands on the grid keeps s_w (6 of 38,400 channels
    over random scales at 8, 4 and 2 bits)."""
    g = 2.0 ** -(24 - out_bits)
    flat = s_w.float().reshape(-1)
    best, todo = flat.clone(), torch.arange(flat.numel(), device=flat.device)
    ulps = _EXACT_ULPS.to(flat.device)
    for steps in _EXACT_STEPS:
        w = flat[todo]
        steps = steps.to(flat.device)
        targets = torch.clamp(torch.round(multiplier(s_in, w, s_out).double() / g) + steps[:, None], min=1) * g
        base = (targets * s_out.double() / s_in.double()).float()
        cand = (base.view(torch.int32)[None] + ulps[:, None, None]).view(torch.float32).flatten(0, 1)
        m = multiplier(s_in, cand, s_out).double()
        on_grid = (m > 0) & (torch.remainder(m, g) == 0) & torch.isfinite(cand) & (cand > 0)
        dist = torch.where(on_grid, (cand.double() - w.double()).abs(), torch.inf)
        found = on_grid.any(0)
        best[todo[found]] = cand.gather(0, dist.argmin(0, keepdim=True))[0][found]
        todo = todo[~found]
        if todo.numel() == 0:
            break
    return best.reshape(s_w.shape)


def activation_bounds(act: str | None, s_out: torch.Tensor, z_out: torch.Tensor, qmin: int, qmax: int):
    """Integer [lo, hi] of the output codes: the quantized range narrowed by a fused ReLU / ReLU6."""
    lo, hi = torch.tensor(float(qmin), device=s_out.device), torch.tensor(float(qmax), device=s_out.device)
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


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add, one rounding of a·b + c (what vfmadd computes), emulated in float64:
    a·b is exact in float64; the sum is rounded to odd using its exact TwoSum error, and round-to-odd at
    53 bits followed by rounding to 24 bits is a correct single rounding."""
    a, b, c = (torch.as_tensor(v, dtype=torch.float32).double() for v in (a, b, c))
    p = a * b
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))
    even = (s.view(torch.int64) & 1) == 0
    s = torch.where((err != 0) & even, torch.nextafter(s, torch.where(err > 0, torch.inf, -torch.inf).double()), s)
    return s.float()


SIGNED_SHIFT = 128  # signed 8-bit activation codes as the ONNX file stores them: uint8 q + 128 at zero point z + 128


def add_requant(q_a, z_a, s_a, q_b, z_b, s_b, s_out, z_out, lo, hi, signed=(False, False, False)) -> torch.Tensor:
    """Output codes of a quantized residual add as ONNX Runtime's QLinearAdd computes them:
        rA = s_a/s_c, rB = s_b/s_c, F = z_c - fma(rA, z_a, rB·z_b), c = rint(fma(a, rA, fma(b, rB, F))),
    on the codes as the ONNX file stores them: signed ones (a, b, c: `signed`) moved up by SIGNED_SHIFT (onnx_qdq's
    _uint8_activations; the float32 sums round otherwise than on the signed codes)."""
    u_a, u_b, u_c = (float(SIGNED_SHIFT) if s else 0.0 for s in signed)
    r_a, r_b = s_a.float() / s_out.float(), s_b.float() / s_out.float()
    fixed = torch.as_tensor(z_out + u_c, dtype=torch.float32) - fma_f32(
        r_a, torch.as_tensor(z_a + u_a, dtype=torch.float32), r_b * torch.as_tensor(z_b + u_b, dtype=torch.float32))
    return torch.clamp(torch.round(fma_f32(q_a + u_a, r_a, fma_f32(q_b + u_b, r_b, fixed))), lo + u_c, hi + u_c) - u_c


def matmul_requant(q_a, z_a, s_a, q_b, z_b, s_b, s_out, z_out, lo, hi) -> torch.Tensor:
    """Output codes of a matmul of two activations as QLinearMatMul computes them: the integer products
    acc = (q_a − z_a) @ (q_b − z_b) (exact in float64), then rint(float32(acc)·M) + z_y with M = s_a·s_b/s_y."""
    acc = (q_a.double() - float(z_a)) @ (q_b.double() - float(z_b))
    return requantize(acc, multiplier(s_a, s_b, s_out), torch.as_tensor(z_out, dtype=torch.float32), lo, hi, -1)


def global_avgpool_requant(q_x, z_x, s_x, s_out, z_out, lo, hi) -> torch.Tensor:
    """Output codes of global average pooling as QLinearGlobalAveragePool computes them: the integer sum
    S = Σq - z_x·HW, then rint(float32(S)·k) + z_y with k = s_x / (s_y·HW) in float32. (N, C, *) → (N, C, 1...)."""
    spatial = tuple(range(2, q_x.dim()))
    hw = 1
    for d in spatial:
        hw *= q_x.shape[d]
    acc = q_x.double().sum(dim=spatial, keepdim=True) - float(z_x) * hw
    k = s_x.float() / (s_out.float() * torch.tensor(float(hw), dtype=torch.float32))
    return torch.clamp(torch.round(acc.float() * k) + z_out, lo, hi)
