"""Bit-exact numpy models of what ONNX Runtime's CPU execution provider computes for int8 QDQ graphs.

qatkit exports QDQ graphs (QuantizeLinear/DequantizeLinear around float ops) and ORT's graph optimizer
(ORT_ENABLE_ALL) fuses them into integer kernels. Each function below reproduces, bit for bit, the integer
output of one such kernel as measured with onnxruntime 1.32 on x86-64 (AVX-512 VNNI); see ORT_NUMERICS.md
and tests/export/test_ort_numerics.py, which checks every function against ORT itself.

    quantize_linear         QuantizeLinear (MlasQuantizeLinear): x / s (a true division), round half to even.
    dequantize_linear       DequantizeLinear: f32(q - z) * s (what the unfused float paths start from).
    requant_multiplier      float32 (s_x * s_w[c]) / s_y, the multiplier of QLinearConv / QGemm / QLinearMatMul.
    stored_weights          how to store int8 weight codes so that every x86 CPU computes exact accumulators.
    qlinear_conv            DQ->Conv(->Relu)->Q  => com.microsoft QLinearConv (NHWC), uint8 activations only.
    qgemm                   DQ->Gemm(->Relu)->Q  => com.microsoft QGemm.
    qgemm_float_output      DQ->Gemm (no Q)      => QGemm with float output: float32(acc) * (s_a*s_b).
    qlinear_matmul          DQ->MatMul->Q        => QLinearMatMul (uint8 activations only).
    matmul_integer_to_float DQ->MatMul (no Q)    => com.microsoft MatMulIntegerToFloat.
    qlinear_add             DQ,DQ->Add(->Relu)->Q=> com.microsoft QLinearAdd (MLAS AVX2 kernel, two FMAs).
    qlinear_global_avgpool  DQ->GlobalAveragePool->Q => com.microsoft QLinearGlobalAveragePool.
    qlinear_avgpool         DQ->AveragePool->Q   => com.microsoft QLinearAveragePool (float sum, then / count).
    qlinear_concat          DQ..->Concat->Q      => com.microsoft QLinearConcat (256-entry lookup table per input).

Conventions: quantized arrays hold uint8/int8 values (any integer dtype is accepted); scales are float32;
weights are int8 symmetric (zero point 0), per output channel (axis 0) or per tensor; bias is int32 with scale
s_x*s_w[c] and zero point 0. Integer accumulation is done in int64 (ORT's int32 never overflows for real layers).
Every float operation is done in numpy float32 in ORT's order; where ORT uses an FMA, fma_f32 emulates it exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

f32 = np.float32


def _out(v: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Saturate to [qmin, qmax] and return uint8 / int8 where the range is that type's."""
    v = np.clip(v, qmin, qmax)
    dtype = {(0, 255): np.uint8, (-128, 127): np.int8}.get((int(qmin), int(qmax)), np.int32)
    return v.astype(dtype)


def fma_f32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add round(a*b + c), exact for all finite float32 inputs (no overflow/underflow).

    a*b is exact in float64 (24+24 bits); the float64 sum is rounded to odd (TwoSum error decides the sticky
    bit), and round-to-odd at 53 bits followed by rounding to 24 bits is a correct single rounding."""
    a, b, c = (np.asarray(v, f32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))  # exact error of s = p + c (TwoSum)
    even = (np.asarray(s).view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return np.asarray(s).astype(f32)


def quantize_linear(x, scale, zp, qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """ONNX QuantizeLinear as ORT runs it: saturate(rint(f32(x) / f32(scale)) + zp), half to even."""
    return _out(np.rint(np.asarray(x, f32) / f32(scale)) + int(zp), qmin, qmax)


def dequantize_linear(q, scale, zp) -> np.ndarray:
    """ONNX DequantizeLinear as ORT runs it (also the unfused float paths): f32(q - zp) * f32(scale)."""
    return (np.asarray(q, np.int64) - int(zp)).astype(f32) * f32(scale)


INT16_MAX = 2**15 - 1


def stored_weights(q_w, x_max: int | None = 255) -> np.ndarray:
    """Symmetric weight codes as an ONNX initializer every x86 CPU accumulates exactly: int8 (zero point 0) where no
    pair of products with uint8 inputs in [0, x_max] can leave int16 (x_max None: int8 inputs), else uint8 q + 128
    (zero point 128). ORT's u8*s8 kernel on CPUs without VNNI (AVX2, AVX-512F) adds pairs of products in int16
    with saturation (vpmaddubsw); its u8*u8 and s8*s8 kernels widen to int16 first and are exact (ORT_NUMERICS.md;
    ORT fuses int8 inputs only with int8 weights)."""
    q_w = np.asarray(q_w, np.int64)
    if x_max is None or 2 * int(x_max) * int(np.abs(q_w).max(initial=0)) <= INT16_MAX:
        return q_w.astype(np.int8)
    return (q_w + 128).astype(np.uint8)


def weight_zero_point(stored: np.ndarray, shape) -> np.ndarray:
    """The DequantizeLinear zero point of `stored_weights`' result: 0 for int8, 128 for uint8."""
    return np.full(shape, 128 if stored.dtype == np.uint8 else 0, stored.dtype)


def requant_multiplier(s_x, s_w, s_y) -> np.ndarray:
    """Per-channel requantization multiplier M[c] = f32(f32(s_x * s_w[c]) / s_y) (QLinearConv/QGemm/QLinearMatMul)."""
    return (f32(s_x) * np.asarray(s_w, f32)) / f32(s_y)


def _requant(acc: np.ndarray, mult: np.ndarray, z_y: int, qmin: int, qmax: int) -> np.ndarray:
    """MlasRequantizeOutput: saturate(rint(f32(acc) * M) + z_y); acc is int32 (incl. bias), M broadcasts."""
    return _out(np.rint(acc.astype(f32) * mult) + int(z_y), qmin, qmax)


def _pair(v, n: int = 2) -> tuple:
    return tuple(int(i) for i in v) if isinstance(v, (list, tuple, np.ndarray)) else (int(v),) * n


def _conv_acc(q_x, z_x, q_w, q_b, stride, pads, dilations, group) -> np.ndarray:
    """int32 accumulators of a 2-D conv: sum((x - z_x) * w) + b. x (N,C,H,W), w (K,C/group,kh,kw) -> (N,K,Ho,Wo)."""
    x = np.asarray(q_x, np.int64) - int(z_x)
    w = np.asarray(q_w, np.int64)
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilations)
    pt, pl, pb, pr = _pair(pads, 4)
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))  # padding is the real 0, i.e. z_x before the shift
    n, c, _, _ = x.shape
    k, cg, kh, kw = w.shape
    win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, Ho, Wo, kh, kw)
    ho, wo = win.shape[2:4]
    win = win.reshape(n, group, cg, ho, wo, kh, kw)
    acc = np.einsum("ngchwij,gkcij->ngkhw", win, w.reshape(group, k // group, cg, kh, kw)).reshape(n, k, ho, wo)
    if q_b is not None:
        acc = acc + np.asarray(q_b, np.int64).reshape(1, k, 1, 1)
    return acc


def qlinear_conv(q_x, z_x, q_w, q_b, s_x, s_w, s_y, z_y, stride=1, pads=0, dilations=1, group=1,
                 qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """QLinearConv: saturate(rint(f32(acc) * M[k]) + z_y), M = requant_multiplier(s_x, s_w, s_y).

    q_x (N,C,H,W) uint8, q_w (K,C/group,kh,kw) int8 zp 0, q_b (K,) int32 or None, s_w scalar or (K,);
    pads = (top, left, bottom, right) or an int. A Relu before Q is the same call (z_y = qmin)."""
    acc = _conv_acc(q_x, z_x, q_w, q_b, stride, pads, dilations, group)  # (N,K,Ho,Wo)
    mult = np.broadcast_to(requant_multiplier(s_x, s_w, s_y), (acc.shape[1],)).reshape(1, -1, 1, 1)
    return _requant(acc, mult, z_y, qmin, qmax)


def _gemm_acc(q_a, z_a, q_b, q_bias, trans_b: bool) -> np.ndarray:
    """int32 accumulators (M,N) = (a - z_a) @ b (+ bias); a (M,K), b (N,K) if trans_b else (K,N)."""
    a = np.asarray(q_a, np.int64) - int(z_a)
    b = np.asarray(q_b, np.int64)
    acc = a @ (b.T if trans_b else b)
    if q_bias is not None:
        acc = acc + np.asarray(q_bias, np.int64)
    return acc


def qgemm(q_a, z_a, q_b, q_bias, s_a, s_b, s_y, z_y, qmin: int = 0, qmax: int = 255,
          trans_b: bool = True) -> np.ndarray:
    """com.microsoft QGemm with quantized output: saturate(rint(f32(acc) * M[n]) + z_y), M = f32(s_a*s_b[n]) / s_y.

    (ORT computes (alpha * s_a * s_b[n]) / s_y with alpha = 1.) q_a (M,K), q_b (N,K) [trans_b] or (K,N),
    q_bias (N,) int32 or None, s_b scalar or (N,) -> (M,N)."""
    acc = _gemm_acc(q_a, z_a, q_b, q_bias, trans_b)
    return _requant(acc, requant_multiplier(s_a, s_b, s_y), z_y, qmin, qmax)


def qgemm_float_output(q_a, z_a, q_b, q_bias, s_a, s_b, trans_b: bool = True) -> np.ndarray:
    """QGemm with float output (DQ->Gemm with no Q after it): f32(acc) * f32(s_a * s_b[n]).

    The int32 bias is added to the integer accumulator before the conversion (no float bias add). -> (M,N) float32"""
    acc = _gemm_acc(q_a, z_a, q_b, q_bias, trans_b)
    return acc.astype(f32) * (f32(s_a) * np.asarray(s_b, f32))


def qlinear_matmul(q_a, z_a, q_b, s_a, s_b, s_y, z_y, qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """QLinearMatMul: saturate(rint(f32(acc) * M[n]) + z_y), M = f32(s_a * s_b[n]) / s_y.

    q_a (..., K) uint8, q_b (K, N) int8 zp 0, s_b scalar or (N,) -> (..., N)."""
    acc = (np.asarray(q_a, np.int64) - int(z_a)) @ np.asarray(q_b, np.int64)
    return _requant(acc, requant_multiplier(s_a, s_b, s_y), z_y, qmin, qmax)


def matmul_integer_to_float(q_a, z_a, q_b, s_a, s_b) -> np.ndarray:
    """com.microsoft MatMulIntegerToFloat (DQ->MatMul with float output): f32(acc) * f32(s_a * s_b[n])."""
    acc = (np.asarray(q_a, np.int64) - int(z_a)) @ np.asarray(q_b, np.int64)
    return acc.astype(f32) * (f32(s_a) * np.asarray(s_b, f32))


def qlinear_add(q_a, s_a, z_a, q_b, s_b, z_b, s_c, z_c, qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """com.microsoft QLinearAdd (MlasQLinearAddKernelAvx2Helper); inputs broadcast as in numpy:

        rA = f32(s_a / s_c), rB = f32(s_b / s_c)
        fixed = f32(z_c) - fma(rA, z_a, f32(rB * z_b))          (the compiler contracts the scalar expression)
        c = saturate(rint(fma(a, rA, fma(b, rB, fixed))))        (two vfmadd, then cvtps2dq + pack)
    Relu before Q is the same call when z_c = qmin."""
    r_a, r_b = f32(s_a) / f32(s_c), f32(s_b) / f32(s_c)
    fixed = f32(z_c) - fma_f32(r_a, f32(z_a), r_b * f32(z_b))
    a = np.asarray(q_a).astype(f32)
    b = np.asarray(q_b).astype(f32)
    return _out(np.rint(fma_f32(a, r_a, fma_f32(b, r_b, fixed))), qmin, qmax)


def qlinear_global_avgpool(q_x, s_x, z_x, s_y, z_y, qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """QLinearGlobalAveragePool: acc = sum(x) - z_x*HW (int32); scale = f32(s_x / f32(s_y * f32(HW)));
    y = saturate(rint(f32(acc) * scale) + z_y). q_x (N,C,H,W) -> (N,C,1,1)."""
    x = np.asarray(q_x, np.int64)
    hw = int(np.prod(x.shape[2:]))
    acc = x.reshape(x.shape[0], x.shape[1], hw).sum(-1) - int(z_x) * hw
    scale = f32(s_x) / (f32(s_y) * f32(hw))
    return _requant(acc, scale, z_y, qmin, qmax).reshape(x.shape[:2] + (1,) * (x.ndim - 2))


def qlinear_avgpool(q_x, s_x, z_x, s_y, z_y, kernel, stride=None, pads=0, count_include_pad: bool = False,
                    qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """QLinearAveragePool (2-D, ceil_mode=0), which works in float32:

        v = f32(s_x * f32(x - z_x)); acc = v[h0,w0] + v[h0,w0+1] + ... (row-major, float32, left to right)
        avg = acc / f32(count)    (count = kh*kw if count_include_pad else the in-image cells)
        y = saturate(rint(avg / s_y + f32(z_y)))   (the zero point is added BEFORE rounding)
    A kernel covering the whole (unpadded) image runs QLinearGlobalAveragePool instead (integer path).
    q_x (N,C,H,W); pads = (top, left, bottom, right) -> (N,C,Ho,Wo)."""
    x = np.asarray(q_x, np.int64)
    (kh, kw) = _pair(kernel)
    (sh, sw) = _pair(stride if stride is not None else 1)
    pt, pl, pb, pr = _pair(pads, 4)
    h, w = x.shape[2:]
    if (kh, kw) == (h, w) and (pt, pl, pb, pr) == (0, 0, 0, 0):
        return qlinear_global_avgpool(q_x, s_x, z_x, s_y, z_y, qmin, qmax)
    v = f32(s_x) * (x - int(z_x)).astype(f32)
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    out = np.empty(x.shape[:2] + (ho, wo), np.int64)
    for i in range(ho):  # tiny loops over output positions; the sum order is ORT's
        h0, h1 = max(i * sh - pt, 0), min(i * sh - pt + kh, h)
        for j in range(wo):
            w0, w1 = max(j * sw - pl, 0), min(j * sw - pl + kw, w)
            acc = np.zeros(x.shape[:2], f32)
            for r in range(h0, h1):
                for s in range(w0, w1):
                    acc = acc + v[:, :, r, s]
            count = kh * kw if count_include_pad else (h1 - h0) * (w1 - w0)
            out[:, :, i, j] = np.rint((acc / f32(count)) / f32(s_y) + f32(z_y))
    return _out(out, qmin, qmax)


def qlinear_concat(inputs: Sequence[tuple], s_y, z_y, axis: int = 1, qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """QLinearConcat: inputs = [(q, s, z), ...]. An input with the output's (scale, zp) is copied; any other goes
    through a 256-entry table: table[q] = quantize_linear(f32(s * f32(q - z)), s_y, z_y)."""
    parts = []
    for q, s, z in inputs:
        q = np.asarray(q)
        if f32(s) == f32(s_y) and int(z) == int(z_y):
            parts.append(q.astype(np.int64))
        else:
            deq = f32(s) * (q.astype(np.int64) - int(z)).astype(f32)
            parts.append(quantize_linear(deq, s_y, z_y, qmin, qmax).astype(np.int64))
    return _out(np.concatenate(parts, axis=axis), qmin, qmax)
