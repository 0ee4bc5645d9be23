"""An integer-only reference executor for qatkit's QDQ ONNX graphs, in numpy.

`IntegerReference(path_or_model, requant)` finds the patterns that ONNX Runtime fuses into integer kernels and
computes them with integer accumulators; every other node runs op by op in float32 numpy (`_OPS`). A pattern is a
core op whose inputs are DequantizeLinear outputs and whose only consumer chain is [Relu | Clip]* -> QuantizeLinear:
    DQ(x u8) -> Conv(DQ(w i8, axis 0), DQ(b i32)) -> Q         acc = sum((q_x - z_x) * q_w) + q_b
    DQ(a u8|i8) -> Gemm(DQ(w i8), DQ(b i32)) -> Q | float out   same acc
    DQ(a u8), DQ(b) -> MatMul -> Q | float out                  acc = sum((q_a - z_a) * (q_b - z_b))
  (w i8: int8 weights with zero point 0, or uint8 ones with zero point 128, q_w = w - 128: the same integers.)
    DQ(a), DQ(b) -> Add -> Q;   DQ(x) -> GlobalAveragePool -> Q
Accumulators are exact integers: dot products run in float64 BLAS (exact while |acc| < 2^53, i.e. for 8-bit operands
and fewer than 2^37 terms), are held in int64 and wrapped to int32 as the hardware register would. A float output
(no Q) is f32(acc) * f32(s_a * s_b), as QGemm / MatMulIntegerToFloat.

requant="float32": ORT's CPU arithmetic (ORT_NUMERICS.md; ort_numerics.py's functions are reused):
    conv/gemm/matmul  y = sat(rint(f32(acc) * M[c]) + z_y),  M[c] = f32(f32(s_x * s_w[c]) / s_y)
    add               QLinearAdd's two FMAs;   quantize  sat(rint(f32(x / s)) + z), a true division
    global avg pool   S = sum(q) - z_x*HW,  y = sat(rint(f32(S) * f32(s_x / f32(s_y * HW))) + z_y)
  rint rounds half to even. A Relu / Clip before the Q is fused only where ORT drops it (Relu: z_y is the type's
  minimum; Clip(a, b): [s(qmin - z), s(qmax - z)] lies within [a, b] + float32 eps); otherwise the pattern runs
  in float, as in ORT (whose float Conv/Gemm/MatMul/Softmax/... kernels are not reproduced bit for bit; nor is its
  QLinearSoftmax, a lookup table that ORT fuses DQ -> Softmax -> Q into: the reference runs that softmax in float,
  which gives QLinearSoftmax's codes at the output scale 2^-8 and zero point 0 that prepare sets there).

requant="fixed-point" / "fixed-point-gemmlowp": integer-only hardware arithmetic (Jacob et al. 2018; TFLite):
    M = M0 * 2^-31 * 2^-n, M0 in [2^30, 2^31)  (M = frac * 2^e by frexp, M0 = round(frac * 2^31), n = -e); for
    conv/gemm M is the deployed float32 multiplier (exactly representable), for add/pool the float64 scale ratio
    SRDHM(a, b) = trunc((a*b + (a*b >= 0 ? 2^30 : 1 - 2^30)) / 2^31); INT32_MAX for a = b = INT32_MIN (ties up)
    RDBP(x, n)  = (x >> n) + ((x & mask) > (mask >> 1) + (x < 0)),  mask = 2^n - 1  (ties away from zero)
    MBQM(x, M)  = RDBP(SRDHM(x << max(-n, 0), M0), max(n, 0))   (TFLite MultiplyByQuantizedMultiplier)
    conv/gemm/matmul  y = sat(MBQM(acc, s_x * s_w[c] / s_y) + z_y)
    add (TFLite)      t = 2 max(s_a, s_b): a' = MBQM((q_a - z_a) << 20, s_a / t), b' = MBQM((q_b - z_b) << 20, s_b / t),
                      y = sat(MBQM(a' + b', t / (2^20 s_y)) + z_y)
    global avg pool   y = sat(MBQM(sum(q - z_x), s_x / (s_y * HW)) + z_y)
    requantize        DQ(x) -> Q to another scale (a narrower layer input read off the 8-bit skip path):
                      y = sat(MBQM(q_x - z_x, s_x / s_y) + z_y), where ORT (float32 mode) runs the two ops in float
  MBQM is one rounding of x·M0 / 2^(31+n) ("fixed-point": TFLite's single-rounding build, CMSIS-NN) or gemmlowp's
  SRDHM then RDBP ("fixed-point-gemmlowp"), whose double rounding differs from a single rounding of acc·M on about
  2^-(n+1) of the outputs. Every Relu / Clip(a, b) before the Q folds into the output clamp [Q(a), Q(b)] (exact, as
  Q is monotone). Tiny multipliers are not flushed to zero (TFLite flushes n > 31).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from qatkit.errors import DataError, ModelFileError, bad_value
from qatkit.export import ort_numerics as on

f32, f64, i64 = np.float32, np.float64, np.int64
_CORES = ("Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool")
REQUANT_MODES = ("float32", "fixed-point", "fixed-point-gemmlowp")


def wrap_int32(v) -> np.ndarray:
    """Two's-complement wrap of int64 values to the int32 range (as a 32-bit register), kept as int64."""
    return np.asarray(v, i64).astype(np.int32).astype(i64)


def quantize_multiplier(m) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers M > 0 -> (M0, n) with M ~= M0 * 2^-31 * 2^-n, M0 in [2^30, 2^31) (TFLite QuantizeMultiplier)."""
    m = np.asarray(m, f64)
    if not np.all(np.isfinite(m) & (m > 0)):
        raise bad_value("requantization multiplier", m, "finite values > 0", "check the scales in the graph")
    frac, exp = np.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1)
    m0 = np.floor(frac * 2.0**31 + 0.5).astype(i64)  # std::round; exact in float64 (frac * 2^31 < 2^31)
    carry = m0 == 2**31
    return np.where(carry, 2**30, m0), np.where(carry, -(exp + 1), -exp).astype(i64)


def srdhm(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul: the int32 nearest to a*b / 2^31 (ties up), saturating."""
    a, b = np.asarray(a, i64), np.asarray(b, i64)
    v = a * b + np.where(a * b >= 0, 1 << 30, 1 - (1 << 30))
    q = np.where(v >= 0, v >> 31, -((-v) >> 31))  # C++ integer division truncates toward zero
    return np.where((a == b) & (a == -(2**31)), 2**31 - 1, q)


def rounding_divide_by_pot(x, n) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^n rounded to nearest, ties away from zero (n >= 0)."""
    x, n = np.asarray(x, i64), np.asarray(n, i64)
    mask = (np.int64(1) << n) - 1
    return (x >> n) + ((x & mask) > (mask >> 1) + (x < 0))


def multiply_by_quantized_multiplier(x, m0, n, single_rounding: bool = True) -> np.ndarray:
    """x·M0·2^-(31+n) in integers. Single rounding (as TFLite's TFLITE_SINGLE_ROUNDING and CMSIS-NN, but half to
    even like every other rounding in qatkit): one rounding of the exact 64-bit product. Double rounding (gemmlowp, TFLite's
    default MultiplyByQuantizedMultiplier): RDBP(SRDHM(x << left, M0), right), left/right = max(-n, 0)/max(n, 0)."""
    x, n = np.asarray(x, i64), np.asarray(n, i64)
    if single_rounding:  # exact product, one rounding half to even (qatkit's rule everywhere, as ONNX's)
        shift = 31 + n
        p = x * np.asarray(m0, i64)
        q, r = p >> shift, p & ((np.int64(1) << shift) - 1)  # floor quotient, remainder in [0, 2^shift)
        half = np.int64(1) << (shift - 1)
        return q + ((r > half) | ((r == half) & (q & 1 == 1)))
    return rounding_divide_by_pot(srdhm(wrap_int32(x << np.maximum(-n, 0)), m0), np.maximum(n, 0))


def _mbqm(x, m, single_rounding: bool) -> np.ndarray:  # x * M for a real M, in fixed point
    return multiply_by_quantized_multiplier(x, *quantize_multiplier(m), single_rounding)


def _fx_add(a, s_a, z_a, b, s_b, z_b, s_y, z_y, single_rounding: bool) -> np.ndarray:
    """TFLite's 8-bit integer add (left shift 20, each input rescaled by its own multiplier), before the clamp."""
    t = 2.0 * max(f64(s_a), f64(s_b))
    a, b = (_mbqm(wrap_int32((v - z) << 20), f64(s) / t, single_rounding) for v, s, z in ((a, s_a, z_a), (b, s_b, z_b)))
    return _mbqm(wrap_int32(a + b), t / (2.0**20 * f64(s_y)), single_rounding) + z_y


def _dot(a, b) -> np.ndarray:
    """Exact integer a @ b (int64) via float64 BLAS: exact while |acc| < 2^53 (8-bit operands)."""
    assert a.shape[-1] < 2**37, "reduction too long for an exact float64 dot product"
    return np.matmul(a.astype(f64), b.astype(f64)).astype(i64)


def _windows(x, k, a: dict, fill=0) -> np.ndarray:
    """The padded, strided, dilated windows of x (N,C,*S) for a kernel k: a view (N,C,*So,*k)."""
    nd = len(k)
    s, d, p = a.get("strides", [1] * nd), a.get("dilations", [1] * nd), a.get("pads", [0] * 2 * nd)
    x = np.pad(x, [(0, 0), (0, 0)] + [(p[i], p[i + nd]) for i in range(nd)], constant_values=fill)
    win = sliding_window_view(x, [(k[i] - 1) * d[i] + 1 for i in range(nd)], axis=tuple(range(2, 2 + nd)))
    return win[(slice(None),) * 2 + tuple(slice(None, None, v) for v in (*s, *d))]


def _conv(x, w, a: dict, dtype=f64) -> np.ndarray:
    """N-d grouped conv: x (N,C,*S) (zero point already subtracted, so pads are 0), w (K,C/g,*k) -> (N,K,*So)."""
    nd, g, K = w.ndim - 2, a.get("group", 1), w.shape[0]
    win = _windows(x.astype(dtype), w.shape[2:], a)
    n, c, so = *win.shape[:2], win.shape[2:2 + nd]  # im2col per group: (g, N*So, C/g*k) @ (g, C/g*k, K/g)
    cols = win.reshape(n, g, c // g, *so, *w.shape[2:]).transpose(1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
    out = np.matmul(cols.reshape(g, n * int(np.prod(so)), -1), w.astype(dtype).reshape(g, K // g, -1).transpose(0, 2, 1))
    out = out.reshape(g, n, -1, K // g).transpose(1, 0, 3, 2).reshape(n, K, *so)
    return out.astype(i64) if dtype == f64 else out


def _conv_transpose(ins, a):
    """ConvTranspose (float32) as the conv it is the gradient of: the input spread out by the stride, padded by
    d·(k - 1) - pads (+ output_padding at the end), convolved with the kernel flipped and in/out swapped."""
    x, w, nd, g = ins[0], ins[1], ins[1].ndim - 2, a.get("group", 1)
    s, d = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    p, extra = a.get("pads", [0] * 2 * nd), a.get("output_padding", [0] * nd)
    spread = np.zeros((*x.shape[:2], *((n - 1) * s[i] + 1 for i, n in enumerate(x.shape[2:]))), f32)
    spread[(Ellipsis, *(slice(None, None, v) for v in s))] = x
    c_in, c_out = w.shape[0], w.shape[1] * g
    flipped = np.flip(w.reshape(g, c_in // g, c_out // g, *w.shape[2:]).swapaxes(1, 2), tuple(range(3, 3 + nd)))
    pads = [d[i] * (w.shape[2 + i] - 1) - p[i] for i in range(nd)]
    pads += [d[i] * (w.shape[2 + i] - 1) - p[nd + i] + extra[i] for i in range(nd)]
    out = _conv(spread, flipped.reshape(c_out, c_in // g, *w.shape[2:]), {"pads": pads, "dilations": d, "group": g}, f32)
    return out + _bcast(_opt(ins, 2, f32(0)), out.ndim, 1)


def _qrange(dtype) -> tuple[int, int]:
    return int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)


def _bcast(v, ndim: int, axis: int):
    """A per-tensor (scalar) or per-axis (1-D) parameter shaped to broadcast along `axis` of an ndim tensor."""
    v = np.asarray(v)
    return v if v.ndim == 0 else v.reshape([-1 if i == axis % ndim else 1 for i in range(ndim)])


def _opt(ins, i, default=None):  # optional input i
    return ins[i] if len(ins) > i and ins[i] is not None else default


def _dequantize(ins, a):  # f32(q - z) * s, per tensor or along `axis`
    q, s, z = ins[0], ins[1], _opt(ins, 2, np.zeros(np.shape(ins[1]), np.uint8))
    if np.ndim(s) == 0:
        return on.dequantize_linear(q, s, z)
    ax = a.get("axis", 1)
    return (q.astype(i64) - _bcast(z, q.ndim, ax).astype(i64)).astype(f32) * _bcast(s, q.ndim, ax).astype(f32)


def _quantize(ins, a):  # sat(rint(x / s) + z), per tensor
    if np.ndim(ins[1]) != 0:
        raise bad_value("QuantizeLinear scale shape", np.shape(ins[1]), "a scalar", "quantize per tensor")
    z = _opt(ins, 2, np.uint8(0))
    return on.quantize_linear(ins[0], ins[1], z, *_qrange(z.dtype))


def _ceil_pads(sizes, a: dict) -> list[int]:
    """The pool's pads, with the end pads grown where ceil_mode adds a partial last window (one that starts
    before the end padding, as PyTorch and ONNX Runtime count them)."""
    k = a["kernel_shape"]
    nd = len(k)
    s, d, p = a.get("strides", [1] * nd), a.get("dilations", [1] * nd), list(a.get("pads", [0] * 2 * nd))
    if a.get("ceil_mode", 0):
        for i, n in enumerate(sizes):
            span = n + p[i] + p[i + nd] - d[i] * (k[i] - 1) - 1
            out = -(-span // s[i]) + 1
            out -= (out - 1) * s[i] >= n + p[i]
            p[i + nd] += max((out - 1) * s[i] - span, 0)
    return p


def _avgpool(ins, a):
    """AveragePool in float32, each window summed in row-major order (as ONNX Runtime's QLinearAveragePool) and
    divided by its cells in the image, or (count_include_pad) in the padded image; a partial last window
    (ceil_mode) counts only those."""
    x, k = ins[0], a["kernel_shape"]
    nd = len(k)
    pads, p = _ceil_pads(x.shape[2:], a), list(a.get("pads", [0] * 2 * nd))
    win = _windows(x.astype(f32), k, {**a, "pads": pads})
    acc = np.zeros(win.shape[:2 + nd], f32)
    for offset in np.ndindex(*k):
        acc = acc + win[(Ellipsis, *offset)]
    cells = np.ones((1, 1, *x.shape[2:]), f32)
    if a.get("count_include_pad", 0):  # the padding counts, the ceil_mode extension does not
        cells = np.pad(cells, [(0, 0), (0, 0)] + [(p[i], p[i + nd]) for i in range(nd)], constant_values=1)
        pads = [0] * nd + [pads[i + nd] - p[i + nd] for i in range(nd)]
    counts = _windows(cells, k, {**a, "pads": pads}).sum(axis=tuple(range(-nd, 0)))
    return acc / counts


def _maxpool(ins, a):  # (N,C,*S) -> (N,C,*So), on codes or floats
    x, k = ins[0], a["kernel_shape"]
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise bad_value("MaxPool auto_pad", a.get("auto_pad"), "NOTSET", "use explicit pads")
    fill = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    a = {**a, "pads": _ceil_pads(x.shape[2:], a)}
    return _windows(x, k, a, fill).max(axis=tuple(range(-len(k), 0)))


def _slice(ins, a):
    x, starts, ends = ins[:3]
    idx = [slice(None)] * x.ndim
    for st, en, ax, sp in zip(starts, ends, _opt(ins, 3, range(len(starts))), _opt(ins, 4, [1] * len(starts))):
        idx[int(ax)] = slice(int(st), int(en), int(sp))
    return x[tuple(idx)]


def _axes(ins, a):  # axes as an input (opset 13+ / 18+) or an attribute
    axes = [int(v) for v in ins[1]] if _opt(ins, 1) is not None else a.get("axes")
    return None if axes is None else tuple(axes)


def _normalized(x, axes: tuple, eps) -> np.ndarray:  # (x - mean) / sqrt(var + eps) over `axes`, in float32
    mean = x.mean(axes, keepdims=True, dtype=f32)
    var = np.square(x - mean).mean(axes, keepdims=True, dtype=f32)
    return (x - mean) / np.sqrt(var + f32(eps))


def _scatter_nd(ins, a):  # data with the updates at the indices' positions (reduction none)
    out = ins[0].copy()
    out[tuple(np.moveaxis(ins[1], -1, 0))] = ins[2]
    return out


def _scatter_elements(ins, a):  # data with the updates at the indices along axis (replaced, added or multiplied
    # in index order, one at a time, as ONNX Runtime does)
    data, index, updates = ins[0].copy(), ins[1], ins[2]
    axis = a.get("axis", 0) % data.ndim
    at = list(np.indices(index.shape, sparse=True))
    at[axis] = np.where(index < 0, index + data.shape[axis], index)
    reduction = a.get("reduction", "none")
    if reduction == "none":
        data[tuple(at)] = updates
    else:
        {"add": np.add, "mul": np.multiply}[reduction].at(data, tuple(at), updates)
    return data


def _layer_norm(ins, a):  # (..., D) normalised over the axes from `axis` on
    axes = tuple(range(a.get("axis", -1) % ins[0].ndim, ins[0].ndim))
    return _normalized(ins[0], axes, a.get("epsilon", 1e-5)) * ins[1] + _opt(ins, 2, f32(0))


_CAST = {onnx.TensorProto.FLOAT: f32, onnx.TensorProto.INT64: i64, onnx.TensorProto.BOOL: np.bool_,
         onnx.TensorProto.DOUBLE: np.float64}  # (float64: sizes times a resize's scale factor)


def _div(ins, a):  # floats: IEEE (x / 0 = ±inf, 0 / 0 = NaN, as PyTorch's); integers truncated, as ONNX's
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = ins[0] / ins[1]
    return quotient.astype(f32) if ins[0].dtype.kind == "f" else np.trunc(quotient).astype(ins[0].dtype)


def _log(ins, a):
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf, log(-1) = NaN, as PyTorch's
        return np.log(ins[0])


def _cast(ins, a):  # qatkit casts masks to float, sizes to int64 (or float64), masks to bool
    if a["to"] not in _CAST:
        raise bad_value("Cast target type", onnx.TensorProto.DataType.Name(a["to"]), "FLOAT, INT64, BOOL, DOUBLE",
                        "export with qatkit's op set", cls=ModelFileError)
    with np.errstate(invalid="ignore"):  # ±inf or NaN to int64 (log(0) in T5's buckets, masked later): as on x86
        return ins[0].astype(_CAST[a["to"]])


def _pad(ins, a):
    """Pad: constant (the exporter's zero-point channels), reflect or edge (a conv's padding mode) on codes;
    pads = [begin of each axis..., end of each axis...]; a negative pad crops (U-Net's skip alignment)."""
    x, pads = ins[0], [int(p) for p in ins[1]]
    pairs = list(zip(pads[:x.ndim], pads[x.ndim:]))
    x = x[tuple(slice(max(-b, 0), n - max(-e, 0)) for n, (b, e) in zip(x.shape, pairs))]
    widths = [(max(b, 0), max(e, 0)) for b, e in pairs]
    mode = a.get("mode", "constant")  # _attrs decoded it
    if mode != "constant":
        return np.pad(x, widths, mode=mode)  # numpy's reflect and edge are ONNX's
    return np.pad(x, widths, constant_values=_opt(ins, 2, x.dtype.type(0)))


def _resize(ins, a):
    """Resize, nearest with the asymmetric floor mapping (PyTorch's 'nearest'): src = floor(dst / scale), or with
    half_pixel and round_prefer_ceil ('nearest-exact'); linear; cubic."""
    x = ins[0]
    mode, sizes, scales = a.get("mode", "nearest"), _opt(ins, 3), _opt(ins, 2)
    if mode in ("linear", "cubic"):
        return (_linear_resize if mode == "linear" else _cubic_resize)(x, a, sizes, scales)
    if mode != "nearest":
        raise bad_value("Resize mode", mode, "nearest, linear or cubic", "export with one of those", cls=ModelFileError)
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        if a.get("coordinate_transformation_mode") == "half_pixel":  # 'nearest-exact': ORT's round_prefer_ceil
            src = _source(n, axis, a, sizes, scales)  # (a tie up, else std::round: half away from zero)
            src = np.where(src == np.trunc(src) + f32(0.5), np.ceil(src), np.sign(src) * np.floor(np.abs(src) + 0.5))
            x = np.take(x, np.clip(src, 0, n - 1).astype(i64), axis=axis)
            continue
        if sizes is not None and len(sizes):  # src = floor(dst · in/out)
            src = np.floor(np.arange(int(sizes[axis])) * (n / int(sizes[axis])))
        else:  # src = floor(dst / scale)
            src = np.floor(np.arange(int(np.floor(n * scales[axis]))) / f32(scales[axis]))
        x = np.take(x, np.minimum(src.astype(i64), n - 1), axis=axis)
    return x


def _source(n: int, axis: int, a: dict, sizes, scales) -> np.ndarray:
    """A Resize's source coordinate of each output sample along `axis` (input size n), in float32 as ONNX Runtime
    computes it: align_corners dst·(n − 1)/(m − 1), else half_pixel (dst + ½)/scale − ½, the scale given or m / n."""
    given = sizes is not None and len(sizes)
    m = int(sizes[axis]) if given else int(np.floor(n * scales[axis]))
    dst = np.arange(m, dtype=f32)
    if a.get("coordinate_transformation_mode") == "align_corners":
        return dst * f32(n - 1) / f32(m - 1) if m > 1 else np.zeros(m, f32)
    return (dst + f32(0.5)) / (f32(m) / f32(n) if given else f32(scales[axis])) - f32(0.5)


def _cubic_resize(x, a, sizes, scales):
    """Resize mode 'cubic' (PyTorch's bicubic: Keys' kernel, a = cubic_coeff_a, the edge pixel repeated outside) as
    ONNX Runtime computes it in float32: the last axis first, then the one before, each output the sum, in order, of
    the four input samples around its source coordinate times their weights."""
    if a.get("exclude_outside", 0):
        raise bad_value("Resize exclude_outside", 1, "0", "export with exclude_outside=0", cls=ModelFileError)
    for axis in reversed(range(2, x.ndim)):
        n = x.shape[axis]
        src = _source(n, axis, a, sizes, scales)
        base = np.floor(src)
        weights = _keys(src - base, a.get("cubic_coeff_a", -0.75))
        out = np.zeros(x.shape[:axis] + src.shape + x.shape[axis + 1:], f32)
        for j, w in enumerate(weights):
            index = np.clip(base.astype(i64) + j - 1, 0, n - 1)
            out = out + np.take(x, index, axis=axis) * _bcast(w.astype(f32), x.ndim, axis)
        x = out
    return x


def _grid_sample(ins, a):
    """GridSample (PyTorch's F.grid_sample) of (N, C, H, W) at grid (N, Hₒ, Wₒ, 2) as ONNX Runtime computes it in
    float32: (x, y) in [-1, 1] scaled to pixels (align_corners: their centres at ±1, else their outer edges); nearest
    rounds half to even, bilinear weighs the 2×2 pixels around, bicubic the 4×4 (Keys, a = -0.75), rows then
    columns; pixels outside are 0 (zeros), the edge pixel (border) or reflected at the edges (reflection)."""
    x, grid = ins[0], ins[1].astype(f32)
    mode, padding, corners = a.get("mode", "bilinear"), a.get("padding_mode", "zeros"), a.get("align_corners", 0)
    n, c, h, w = x.shape
    px, py = (_gs_pixels(grid[..., i], size, corners) for i, size in ((0, w), (1, h)))
    lo, hi = (f32(0), f32(1)) if corners else (f32(-0.5), f32(0.5))
    border = ((lo, f32(w) - hi), (lo, f32(h) - hi))
    batch = np.arange(n)[:, None, None, None]

    def pixel(rows, cols):  # x[n, :, rows, cols] → (N, C, Hₒ, Wₒ), padded as `padding` says
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        if padding == "border":
            rows, cols = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
        elif padding == "reflection":
            rows, cols = _gs_reflect(rows.astype(f32), *border[1]), _gs_reflect(cols.astype(f32), *border[0])
        values = x[batch, np.arange(c)[None, :, None, None], np.clip(rows, 0, h - 1)[:, None],
                   np.clip(cols, 0, w - 1)[:, None]]
        return np.where(inside[:, None], values, f32(0)) if padding == "zeros" else values

    if mode == "nearest":
        return pixel(np.rint(py).astype(i64), np.rint(px).astype(i64))
    x1, y1 = np.floor(px).astype(i64), np.floor(py).astype(i64)
    if mode == "bilinear":
        dx2, dx1 = ((x1 + 1).astype(f32) - px)[:, None], (px - x1.astype(f32))[:, None]
        dy2, dy1 = ((y1 + 1).astype(f32) - py)[:, None], (py - y1.astype(f32))[:, None]
        p11, p12, p21, p22 = pixel(y1, x1), pixel(y1, x1 + 1), pixel(y1 + 1, x1), pixel(y1 + 1, x1 + 1)
        if padding == "zeros" and not corners:  # ORT's fast path: the four weights first
            return (dy2 * dx2) * p11 + (dy2 * dx1) * p12 + (dy1 * dx2) * p21 + (dy1 * dx1) * p22
        return dy2 * (dx2 * p11 + dx1 * p12) + dy1 * (dx2 * p21 + dx1 * p22)
    if mode != "bicubic":
        raise bad_value("GridSample mode", mode, "nearest, bilinear or bicubic", "export with one of those",
                        cls=ModelFileError)
    cx, cy = _keys(px - (x1 - 1).astype(f32) - f32(1)), _keys(py - (y1 - 1).astype(f32) - f32(1))
    rows = [sum((cx[j][:, None] * pixel(y1 - 1 + i, x1 - 1 + j) for j in range(1, 4)),
                cx[0][:, None] * pixel(y1 - 1 + i, x1 - 1)) for i in range(4)]
    return sum((cy[i][:, None] * rows[i] for i in range(1, 4)), cy[0][:, None] * rows[0])


def _gs_pixels(coordinate, size: int, corners: int):
    """GridSample's normalised coordinate in [-1, 1] as a pixel position (float32, ONNX Runtime's order)."""
    if corners:
        return (coordinate + f32(1)) / f32(2) * f32(size - 1)
    return ((coordinate + f32(1)) * f32(size) - f32(1)) / f32(2)


def _gs_reflect(v, lo, hi):
    """A pixel index reflected at the edges lo, hi until inside, then truncated (GridSample's reflection padding)."""
    span = hi - lo
    d = np.where(v < lo, lo - v, np.where(v > hi, v - hi, f32(0))).astype(f32)
    k = np.trunc(d / span)
    r = d - (k * span).astype(f32)
    even = k % 2 == 0
    out = np.where(v < lo, np.where(even, lo + r, hi - r), np.where(v > hi, np.where(even, hi - r, lo + r), v))
    return np.trunc(out.astype(f32)).astype(i64)


def _keys(t, a: float = -0.75):
    """Keys' cubic convolution weights of the 4 samples around a point t past the second, in float32 as ONNX Runtime
    computes them."""
    k, t = f32(a), np.abs(t).astype(f32)
    one, two = t + f32(1), f32(2) - t
    return [((k * one - f32(5) * k) * one + f32(8) * k) * one - f32(4) * k,
            ((k + f32(2)) * t - (k + f32(3))) * t * t + f32(1),
            ((k + f32(2)) * (f32(1) - t) - (k + f32(3))) * (f32(1) - t) * (f32(1) - t) + f32(1),
            ((k * two - f32(5) * k) * two + f32(8) * k) * two - f32(4) * k]


def _linear_resize(x, a, sizes, scales):
    """Resize mode 'linear' (PyTorch's (bi/tri)linear): one axis at a time, each output sample between the two input
    samples around its source coordinate (clamped at the edges)."""
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        src = np.maximum(_source(n, axis, a, sizes, scales), f32(0))
        lo = np.minimum(np.floor(src).astype(i64), n - 1)
        hi, w = np.minimum(lo + 1, n - 1), _bcast((src - lo).astype(f32), x.ndim, axis)
        x = np.take(x, lo, axis=axis) * (f32(1) - w) + np.take(x, hi, axis=axis) * w
    return x


def _lrn(ins, a):  # x / (bias + α/n · Σ x² over the n channels around c)^β
    x, n = ins[0], a["size"]
    padded = np.pad(np.square(x), [(0, 0), ((n - 1) // 2, n // 2)] + [(0, 0)] * (x.ndim - 2))
    sums = sum(padded[:, i:i + x.shape[1]] for i in range(n))
    return x / np.power(f32(a.get("bias", 1.0)) + f32(a.get("alpha", 1e-4) / n) * sums, f32(a.get("beta", 0.75)))


def _shrink(ins, a):  # x - bias above λ, x + bias below -λ, 0 between
    x, lambd, bias = ins[0], f32(a.get("lambd", 0.5)), f32(a.get("bias", 0.0))
    return np.where(x > lambd, x - bias, np.where(x < -lambd, x + bias, f32(0))).astype(f32)


def _selu(ins, a):  # γ·x above 0, γ·(α·eˣ - α) below
    x, alpha, gamma = ins[0], f32(a.get("alpha", 1.6732632423543772)), f32(a.get("gamma", 1.0507009873554805))
    return gamma * np.where(x > 0, x, alpha * np.exp(x) - alpha)


def _arg_extreme(fn, x, a):  # the first position of the max/min along `axis` (select_last_index = 0)
    out = fn(x, axis=a.get("axis", 0)).astype(i64)
    return np.expand_dims(out, a.get("axis", 0)) if a.get("keepdims", 1) else out


def _topk(ins, a):  # the k largest (smallest) along axis, equal values in index order; values and positions
    x, k, axis = ins[0], int(ins[1][0]), a.get("axis", -1)
    key = -x.astype(np.float64) if a.get("largest", 1) else x.astype(np.float64)
    positions = np.take(np.argsort(key, axis=axis, kind="stable"), np.arange(k), axis=axis)
    return [np.take_along_axis(x, positions, axis=axis), positions.astype(i64)]


def _softplus(x):  # log(1 + eˣ) without overflow
    return np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0)))).astype(f32)


def _instance_norm(ins, a):  # (N, C, ...) normalised over the spatial axes, per sample and channel
    x = ins[0]
    normed = _normalized(x, tuple(range(2, x.ndim)), a.get("epsilon", 1e-5))
    return normed * _bcast(ins[1], x.ndim, 1) + _bcast(ins[2], x.ndim, 1)


def _batch_norm(ins, a):  # inference: (x - mean) / sqrt(var + eps) · scale + B along axis 1, in float32
    x, (scale, bias, mean, var) = ins[0], (_bcast(v, ins[0].ndim, 1) for v in ins[1:5])
    return (x - mean) / np.sqrt(var + f32(a.get("epsilon", 1e-5))) * scale + bias


def _depth_to_space(ins, a):  # (N, C·r², H, W) -> (N, C, H·r, W·r); CRD: PyTorch's pixel_shuffle, DCR: depth first
    x, r = ins[0], a["blocksize"]
    n, c, h, w = x.shape
    if a.get("mode", "DCR") == "CRD":
        return x.reshape(n, c // r**2, r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // r**2, h * r, w * r)
    return x.reshape(n, r, r, c // r**2, h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // r**2, h * r, w * r)


_erf = np.vectorize(math.erf, otypes=[f64])
_OPS = {  # op_type -> handler(inputs, attributes) -> output(s); float ops compute in float32
    "DequantizeLinear": _dequantize, "QuantizeLinear": _quantize, "Identity": lambda i, a: i[0],
    "Relu": lambda i, a: np.maximum(i[0], i[0].dtype.type(0)),
    "Clip": lambda i, a: np.clip(i[0], _opt(i, 1, -np.inf), _opt(i, 2, np.inf)).astype(i[0].dtype),
    "MaxPool": _maxpool, "Slice": _slice, "Unsqueeze": lambda i, a: np.expand_dims(i[0], _axes(i, a)),
    "Reshape": lambda i, a: i[0].reshape([i[0].shape[j] if v == 0 and not a.get("allowzero", 0) else int(v)
                                          for j, v in enumerate(i[1])]),
    "Transpose": lambda i, a: np.transpose(i[0], a.get("perm")),
    "Pad": _pad,
    "Flatten": lambda i, a: i[0].reshape(int(np.prod(i[0].shape[:a.get("axis", 1)])), -1),
    "Gather": lambda i, a: np.take(i[0], i[1], axis=a.get("axis", 0)),
    "NonZero": lambda i, a: np.array(np.nonzero(i[0]), np.int64).reshape(i[0].ndim, -1),
    "ScatterND": _scatter_nd,
    "GatherElements": lambda i, a: np.take_along_axis(i[0], i[1], axis=a.get("axis", 0)),
    "ScatterElements": _scatter_elements,
    "Squeeze": lambda i, a: np.squeeze(i[0], axis=_axes(i, a)),
    "Concat": lambda i, a: np.concatenate(i, axis=a["axis"]),
    "Shape": lambda i, a: np.array(i[0].shape, i64)[a.get("start", 0):a.get("end")],
    "Max": lambda i, a: reduce(np.maximum, i), "Add": lambda i, a: i[0] + i[1], "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1], "MatMul": lambda i, a: np.matmul(i[0], i[1]),
    "Div": _div,
    "Softmax": lambda i, a: (e := np.exp(i[0] - i[0].max(a.get("axis", -1), keepdims=True)))
                            / e.sum(a.get("axis", -1), keepdims=True),
    "LayerNormalization": _layer_norm,
    "ReduceMean": lambda i, a: i[0].mean(axis=_axes(i, a), keepdims=bool(a.get("keepdims", 1)), dtype=f32),
    "Erf": lambda i, a: _erf(i[0]).astype(f32), "Sigmoid": lambda i, a: f32(1) / (f32(1) + np.exp(-i[0])),
    "Tanh": lambda i, a: np.tanh(i[0]), "Sqrt": lambda i, a: np.sqrt(i[0]), "Exp": lambda i, a: np.exp(i[0]),
    "DepthToSpace": _depth_to_space, "InstanceNormalization": _instance_norm,
    "BatchNormalization": _batch_norm, "Floor": lambda i, a: np.floor(i[0]), "Ceil": lambda i, a: np.ceil(i[0]),
    "Round": lambda i, a: np.round(i[0]), "Tan": lambda i, a: np.tan(i[0]), "Atan": lambda i, a: np.arctan(i[0]),
    "Asin": lambda i, a: np.arcsin(i[0]), "Acos": lambda i, a: np.arccos(i[0]), "Sinh": lambda i, a: np.sinh(i[0]),
    "Cosh": lambda i, a: np.cosh(i[0]),
    "Sin": lambda i, a: np.sin(i[0]),
    "Cos": lambda i, a: np.cos(i[0]), "Log": _log, "Abs": lambda i, a: np.abs(i[0]), "Sign": lambda i, a: np.sign(i[0]),
    "Reciprocal": lambda i, a: f32(1) / i[0], "Pow": lambda i, a: np.power(i[0], i[1]).astype(i[0].dtype),
    "Mod": lambda i, a: (np.fmod if a.get("fmod", 0) else np.mod)(i[0], i[1]),
    "Trilu": lambda i, a: (np.triu if a.get("upper", 1) else np.tril)(i[0], int(_opt(i, 1, 0))),
    "Einsum": lambda i, a: np.einsum(a["equation"], *i).astype(f32),
    "Neg": lambda i, a: -i[0], "Equal": lambda i, a: np.equal(i[0], i[1]), "Not": lambda i, a: np.logical_not(i[0]),
    "Less": lambda i, a: np.less(i[0], i[1]), "LessOrEqual": lambda i, a: np.less_equal(i[0], i[1]),
    "Greater": lambda i, a: np.greater(i[0], i[1]), "GreaterOrEqual": lambda i, a: np.greater_equal(i[0], i[1]),
    "And": lambda i, a: np.logical_and(i[0], i[1]), "Or": lambda i, a: np.logical_or(i[0], i[1]),
    "ConstantOfShape": lambda i, a: np.full(tuple(i[0]), a["value"][0]),
    "Range": lambda i, a: np.arange(i[0], i[1], i[2], dtype=i64),
    "Expand": lambda i, a: np.broadcast_to(i[0], np.broadcast_shapes(i[0].shape, tuple(i[1]))).copy(),
    "Cast": _cast,
    "HardSwish": lambda i, a: i[0] * np.clip(i[0] * f32(1 / 6) + f32(0.5), f32(0), f32(1)),
    "HardSigmoid": lambda i, a: np.clip(i[0] * f32(a.get("alpha", 0.2)) + f32(a.get("beta", 0.5)), f32(0), f32(1)),
    "LeakyRelu": lambda i, a: np.where(i[0] >= 0, i[0], i[0] * f32(a.get("alpha", 0.01))),
    "Resize": _resize, "GridSample": _grid_sample, "Where": lambda i, a: np.where(i[0], i[1], i[2]).astype(i[2].dtype),
    "ReduceSum": lambda i, a: i[0].sum(axis=_axes(i, a), keepdims=bool(a.get("keepdims", 1)), dtype=f32),
    "ReduceProd": lambda i, a: i[0].prod(axis=_axes(i, a), keepdims=bool(a.get("keepdims", 1)), dtype=f32),
    "ReduceL1": lambda i, a: _OPS["ReduceSum"]([np.abs(i[0]), *i[1:]], a),
    "ReduceL2": lambda i, a: np.sqrt(_OPS["ReduceSum"]([np.square(i[0]), *i[1:]], a)),
    "Gemm": lambda i, a: f32(a.get("alpha", 1.0)) * ((i[0].T if a.get("transA", 0) else i[0])
                                                     @ (i[1].T if a.get("transB", 0) else i[1]))
                    + f32(a.get("beta", 1.0)) * _opt(i, 2, f32(0)),
    "Conv": lambda i, a: _conv(i[0], i[1], a, f32) + _bcast(_opt(i, 2, f32(0)), i[0].ndim, 1),
    "GlobalAveragePool": lambda i, a: i[0].mean(axis=tuple(range(2, i[0].ndim)), keepdims=True, dtype=f32),
    "ReduceMax": lambda i, a: i[0].max(axis=_axes(i, a), keepdims=bool(a.get("keepdims", 1))),
    "ReduceMin": lambda i, a: i[0].min(axis=_axes(i, a), keepdims=bool(a.get("keepdims", 1))),
    "ArgMax": lambda i, a: _arg_extreme(np.argmax, i[0], a), "ArgMin": lambda i, a: _arg_extreme(np.argmin, i[0], a),
    "Min": lambda i, a: reduce(np.minimum, i),
    "CumSum": lambda i, a: np.cumsum(i[0], axis=int(i[1]), dtype=i[0].dtype),
    "GatherND": lambda i, a: i[0][tuple(np.moveaxis(i[1], -1, 0))],  # (batch_dims 0)
    "Tile": lambda i, a: np.tile(i[0], tuple(int(r) for r in i[1])), "TopK": _topk,
    "Elu": lambda i, a: np.where(i[0] >= 0, i[0], f32(a.get("alpha", 1.0)) * (np.exp(i[0]) - f32(1))),
    "Celu": lambda i, a: (np.maximum(i[0], f32(0)) + np.minimum(f32(0), (al := f32(a.get("alpha", 1.0)))
                                                                * (np.exp(i[0] / al) - f32(1)))),
    "Selu": _selu,
    "Softplus": lambda i, a: _softplus(i[0]), "Softsign": lambda i, a: i[0] / (f32(1) + np.abs(i[0])),
    "PRelu": lambda i, a: np.where(i[0] < 0, i[1] * i[0], i[0]).astype(f32),
    "LogSoftmax": lambda i, a: (d := i[0] - i[0].max(a.get("axis", -1), keepdims=True))
                               - np.log(np.exp(d).sum(a.get("axis", -1), keepdims=True)),
    "Shrink": _shrink, "LRN": _lrn, "AveragePool": _avgpool, "ConvTranspose": _conv_transpose,
}


@dataclass
class _Fused:
    kind: str  # one of _CORES, or "Requantize" (fixed point: a Q of a DQ)
    node: onnx.NodeProto  # the core op
    out: str  # the Q output (codes), or the core output for a float-output Gemm / MatMul
    xs: list  # activation inputs [(codes tensor, scale, zero point)]
    absorbed: list  # [Relu | Clip]* and Q nodes folded into the kernel
    attrs: dict
    w: np.ndarray | None = None  # int8 codes: Conv (K,C/g,*k), Gemm (K_in,N)
    s_w: np.ndarray | None = None  # (K,) or scalar
    bias: np.ndarray | None = None  # int32 (K,)
    y: tuple | None = None  # (s_y, z_y) of the Q; None = float output
    lo: int = 0  # output clamp in codes: the Q type's range, narrowed by folded Relu / Clip
    hi: int = 255
    dtype: type = np.uint8
    mult: object = None  # float32 multipliers, or (M0, n) for fixed-point; (K, 1, ..) for a conv


class IntegerReference:
    """Runs a qatkit QDQ ONNX graph with integer kernels where ONNX Runtime fuses, float32 numpy elsewhere."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, requant: str = "float32"):
        if requant not in REQUANT_MODES:
            raise bad_value("requant", requant, ", ".join(REQUANT_MODES), "pick one of these modes")
        self.requant, self.model = requant, model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        g = self.model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
        self.input_names = [i.name for i in g.input if i.name not in self.consts]
        self.output_names = [o.name for o in g.output]
        self.q_outputs = [n.output[0] for n in g.node if n.op_type == "QuantizeLinear"]
        nodes = [n for n in g.node if n.op_type != "Constant"]
        for n in nodes:
            if n.op_type not in _OPS:
                raise bad_value(f"ONNX op of node {n.name!r}", n.op_type, ", ".join(sorted(_OPS)),
                                "export with qatkit's op set", cls=ModelFileError)
        prod, cons = {o: n for n in nodes for o in n.output}, {}
        for n in nodes:
            for i in n.input:
                cons.setdefault(i, []).append(n)
        self.fused = {}  # core op output -> _Fused
        for n in nodes:
            f = (self._match(n, prod, cons, set(self.output_names)) if n.op_type in _CORES
                 else self._match_requant(n, prod) if n.op_type == "QuantizeLinear" and requant != "float32" else None)
            self.fused.update({n.output[0]: f} if f is not None else {})
        absorbed = {id(m) for f in self.fused.values() for m in f.absorbed}
        self.steps = self._prune_and_fold([self.fused.get(n.output[0], n) for n in nodes
                                           if n.output[0] in self.fused or id(n) not in absorbed])

    def run(self, x: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
        """The graph's (first) float output, i.e. the last DequantizeLinear applied. x: the input, or a tuple of the
        graph's inputs in order."""
        return self._execute(x)[self.output_names[0]]

    def run_codes(self, x: np.ndarray, force: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The integer codes of every QuantizeLinear output, keyed by tensor name. `force` (tensor name -> value)
        replaces those tensors once computed, so that each kernel can be checked on someone else's inputs."""
        env = self._execute(x, force)
        return {name: env[name] for name in self.q_outputs if name in env}

    def run_outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every graph output by name (exports with debug_outputs=True: every integer tensor, as 'debug/<node>')."""
        env = self._execute(x)
        return {name: env[name] for name in self.output_names}

    def _execute(self, x, force: dict | None = None) -> dict:
        env, mine = dict(self.consts), {}
        if isinstance(x, Mapping):
            if sorted(x) != sorted(self.input_names):
                raise bad_value("inputs by name", sorted(x), f"the graph's inputs {self.input_names}",
                                "give each graph input under its name", DataError)
            x = tuple(x[name] for name in self.input_names)
        for name, value in zip(self.input_names, x if isinstance(x, tuple) else (x,)):
            value = np.asarray(value)
            env[name] = value if value.dtype.kind in "iu" else value.astype(f32)  # token ids stay integers
        for st in self.steps:
            if isinstance(st, _Fused):
                env[st.out], outputs = self._kernel(st, env), [st.out]
            else:
                node, fn, attrs = st
                outs, outputs = fn([env[i] if i else None for i in node.input], attrs), list(node.output)
                env.update(zip(outputs, outs if isinstance(outs, (list, tuple)) else [outs]))
            for name in set(outputs) & set(force or ()):
                mine[name], env[name] = env[name], np.asarray(force[name])
        return {**env, **mine}

    def _kernel(self, f: _Fused, env: dict) -> np.ndarray:
        fixed, single = self.requant != "float32", self.requant == "fixed-point"
        (a, s_a, z_a), *rest = [(env[c].astype(i64), s, z) for c, s, z in f.xs]
        s_y, z_y = f.y if f.y is not None else (None, None)
        if f.kind == "Add":  # broadcasting, as numpy
            args = (a, s_a, z_a, *rest[0], s_y, z_y)
            v = _fx_add(*args, single) if fixed else on.qlinear_add(*args, *_qrange(f.dtype))
        elif f.kind == "Requantize":
            v = _mbqm(a - z_a, f.mult, single) + z_y
        elif f.kind == "GlobalAveragePool" and not fixed:  # (N,C,*S) -> (N,C,1..)
            v = on.qlinear_global_avgpool(a, s_a, z_a, s_y, z_y, *_qrange(f.dtype))
        elif f.kind == "GlobalAveragePool":
            acc = wrap_int32((a - z_a).sum(axis=tuple(range(2, a.ndim)), keepdims=True))
            v = _mbqm(acc, f64(s_a) / (f64(s_y) * np.prod(a.shape[2:])), single) + z_y
        else:
            if f.kind == "Conv":  # (N,C,*S) * (K,C/g,*k) -> (N,K,*So), channel axis 1
                acc = _conv(a - z_a, f.w, f.attrs) + (0 if f.bias is None else _bcast(f.bias, a.ndim, 1))
            elif f.kind == "Gemm":  # (M,K_in) @ (K_in,N) -> (M,N)
                acc = _dot(a - z_a, f.w) + (0 if f.bias is None else f.bias)
            else:  # MatMul (..., K) @ (..., K, N) -> (..., N)
                acc = _dot(a - z_a, rest[0][0] - rest[0][2])
            acc = wrap_int32(acc)
            if f.y is None:
                return acc.astype(f32) * f.mult
            v = multiply_by_quantized_multiplier(acc, *f.mult, single) + z_y if fixed else np.rint(acc.astype(f32) * f.mult) + z_y
        return np.clip(v, f.lo, f.hi).astype(f.dtype)

    def _dq(self, node) -> tuple | None:
        """(codes tensor, scale, zero point) of a DequantizeLinear with constant parameters, else None."""
        zp = node.input[2] if node is not None and len(node.input) > 2 and node.input[2] else None
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in self.consts \
                or (zp is not None and zp not in self.consts):
            return None
        return node.input[0], self.consts[node.input[1]], self.consts[zp] if zp else np.uint8(0)

    def _match_requant(self, n, prod) -> _Fused | None:
        """A QuantizeLinear with constant per-tensor parameters of a DequantizeLinear output (fixed point only)."""
        x = self._dq(prod.get(n.input[0]))
        s_y, z_y = self.consts.get(n.input[1]), self.consts.get(n.input[2]) if len(n.input) > 2 else np.uint8(0)
        if x is None or np.ndim(x[1]) != 0 or s_y is None or z_y is None or np.ndim(s_y) != 0:
            return None
        f = _Fused("Requantize", n, n.output[0], [x], [n], {}, y=(s_y, z_y), dtype=z_y.dtype.type)
        f.lo, f.hi = _qrange(z_y.dtype)
        f.mult = f64(x[1]) / f64(s_y)
        return f

    def _match(self, n, prod, cons, graph_outputs) -> _Fused | None:
        acts, t, q = [], n.output[0], None  # the single-consumer chain [Relu | Clip]* -> Q
        while t not in graph_outputs and len(cons.get(t, [])) == 1 and cons[t][0].op_type in ("Relu", "Clip", "QuantizeLinear"):
            if cons[t][0].op_type == "QuantizeLinear":
                q = cons[t][0]
                break
            acts, t = acts + [cons[t][0]], cons[t][0].output[0]
        ins, a = [self._dq(prod.get(i)) for i in n.input], _attrs(n)
        if ins[0] is None or np.ndim(ins[0][1]) != 0 or (n.op_type in ("Conv", "MatMul") and ins[0][2].dtype != np.uint8):
            return None  # ORT on x86 fuses Conv and MatMul only with uint8 activations
        f = _Fused(n.op_type, n, n.output[0], [ins[0]], [], a)
        if n.op_type in ("Conv", "Gemm"):  # constant int8 weights with zero point 0 or uint8 ones with 128 (symmetric)
            w, b = ins[1], ins[2] if len(ins) > 2 else ()
            dtype = self.consts[w[0]].dtype if w is not None and w[0] in self.consts else None
            zero = {np.dtype(np.int8): 0, np.dtype(np.uint8): 128}.get(dtype)
            if zero is None or np.any(w[2] != zero) or b is None or (b and b[0] not in self.consts) \
                    or a.get("transA", 0) or a.get("alpha", 1.0) != 1 or a.get("beta", 1.0) != 1:
                return None
            f.w, f.s_w = self.consts[w[0]].astype(i64) - zero, w[1].astype(f32)
            f.bias = self.consts[b[0]].astype(i64) if b else None
            f.w = f.w.T if n.op_type == "Gemm" and a.get("transB", 0) else f.w  # Gemm weights as (K_in, N)
        elif n.op_type in ("MatMul", "Add"):
            if ins[1] is None or np.ndim(ins[1][1]) != 0:
                return None
            f.xs.append(ins[1])
            f.s_w = ins[1][1].astype(f32)
        if q is None:  # float output: only QGemm / MatMulIntegerToFloat, acc * f32(s_a * s_b)
            f.mult = f32(ins[0][1]) * f.s_w if n.op_type in ("Gemm", "MatMul") else None
            f.absorbed = [n]
            return f if f.mult is not None else None
        s_y, z_y = self.consts.get(q.input[1]), self.consts.get(q.input[2]) if len(q.input) > 2 else np.uint8(0)
        if s_y is None or z_y is None or np.ndim(s_y) != 0:
            return None
        f.y, f.dtype, f.out, f.absorbed = (s_y, z_y), z_y.dtype.type, q.output[0], [n, *acts, q]
        f.lo, f.hi = qmin, qmax = _qrange(z_y.dtype)
        lower, upper, eps = f32(s_y) * f32(qmin - int(z_y)), f32(s_y) * f32(qmax - int(z_y)), np.finfo(f32).eps
        for act in reversed(acts):  # from the op next to Q backwards, as ORT's Relu/Clip-QuantizeLinear fusions
            lo, hi = (0.0, np.inf) if act.op_type == "Relu" else \
                [self.consts.get(i) if i else v for i, v in zip((list(act.input) + ["", ""])[1:3], (-np.inf, np.inf))]
            if lo is None or hi is None or self.requant == "float32" and not (
                    int(z_y) == qmin if act.op_type == "Relu" else f32(lo) - lower <= eps and upper - f32(hi) <= eps):
                return None  # ORT keeps this op, so it runs the pattern in float (fixed-point folds every clamp)
            codes = on.quantize_linear(np.array([lo, hi], f32), s_y, z_y, qmin, qmax).astype(int)
            f.lo, f.hi = max(f.lo, int(codes[0])), min(f.hi, int(codes[1]))
        if n.op_type in ("Conv", "Gemm", "MatMul"):  # per output channel: axis 1 of a conv, the last axis otherwise
            s_x, s_w = ins[0][1], f.s_w if n.op_type != "Conv" else _bcast(f.s_w, f.w.ndim - 1, 0)
            # Fixed point takes the deployed float32 multiplier, whose 24-bit mantissa M0 holds exactly: both modes
            # then apply the same real M and differ only in how acc·M is rounded.
            f.mult = on.requant_multiplier(s_x, s_w, s_y)
            f.mult = f.mult if self.requant == "float32" else quantize_multiplier(f.mult)
        return f

    def _prune_and_fold(self, steps) -> list:
        """Drop the steps no graph output needs; evaluate those on constants only (weight DQs, shapes) once."""
        needed, kept, plan = set(self.output_names), [], []
        for st in reversed(steps):
            ins, outs = ([c for c, _, _ in st.xs], [st.out]) if isinstance(st, _Fused) else (st.input, st.output)
            if needed & set(outs):
                kept.append(st)
                needed |= set(ins)
        for st in reversed(kept):
            entry = st if isinstance(st, _Fused) else (st, _OPS[st.op_type], _attrs(st))
            if isinstance(st, _Fused) or not all(i in self.consts for i in st.input if i):
                plan.append(entry)
                continue
            outs = entry[1]([self.consts[i] if i else None for i in st.input], entry[2])
            self.consts.update(zip(st.output, outs if isinstance(outs, (list, tuple)) else [outs]))
        return plan


def _attrs(node) -> dict:
    out = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: (v.decode() if isinstance(v, bytes) else numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto)
                else v) for k, v in out.items()}


__all__ = ["IntegerReference", "multiply_by_quantized_multiplier", "quantize_multiplier", "rounding_divide_by_pot",
           "srdhm", "wrap_int32"]
