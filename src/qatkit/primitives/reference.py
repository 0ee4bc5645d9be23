"""Float64 reference oracles for the quantization primitives: the tests and the docs check against these.

Written independently of the torch implementation (numpy only, explicit per-channel loops), straight
from the formulas in `fake_quant.py` and `qparams.py`:

    q  = clamp(rint(x / s) + z, qmin, qmax)        rint: round half to even
    x̂ = (q - z) * s
    dx̂/dx = 1 inside, 0 outside;  dx̂/ds = rint(x/s) - x/s inside, qmin - z below, qmax - z above;
    dx̂/dz = 0 inside, -s outside;  the scale and zero-point gradients are multiplied by grad_scale.

"Inside" means the unclamped code rint(x/s) + z lies in [qmin, qmax]. Per-tensor parameters are
scalars (axis=None); per-channel ones have length x.shape[axis]. Inputs may be numpy arrays, Python
numbers or CPU torch tensors; results are numpy float64 arrays.
"""
from __future__ import annotations

import numpy as np

MIN_SCALE = 1e-8  # the smallest scale qparams hand out (an all-zero tensor still gets a positive scale)


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    return np.array(a, dtype=np.float64)


def _channels(x: np.ndarray, scale, zp, axis: int | None):
    """x as (C, ...) with channels first, and per-channel scale / zero point of length C."""
    s, z = _f64(scale), _f64(zp)
    if axis is None:
        assert s.ndim == 0 and z.ndim == 0, "per-tensor parameters must be scalars"
        return x[np.newaxis], s.reshape(1), z.reshape(1)
    xc = np.moveaxis(x, axis, 0)
    c = xc.shape[0]
    return xc, np.broadcast_to(s, (c,)), np.broadcast_to(z, (c,))


def ref_codes(x, scale, zp, qmin: int, qmax: int, axis: int | None = None, *, dtype=np.float64) -> np.ndarray:
    """Integer codes q = clamp(rint(x/s) + z, qmin, qmax), as float64 values.

    `dtype` is the precision of the division x/s: float64 by default; np.float32 models a float32
    tensor (x/s rounded to float32 before rint)."""
    x = _f64(x)
    xc, s, z = _channels(x, scale, zp, axis)
    out = np.empty(xc.shape, dtype=np.float64)
    for c in range(xc.shape[0]):
        ratio = xc[c].astype(dtype) / dtype(s[c])  # correctly rounded in `dtype`
        out[c] = np.clip(np.rint(ratio).astype(np.float64) + z[c], qmin, qmax)
    return out[0] if axis is None else np.moveaxis(out, 0, axis)


def ref_fake_quantize(x, scale, zp, qmin: int, qmax: int, axis: int | None = None, *, dtype=np.float64) -> np.ndarray:
    """x̂ = (clamp(rint(x/s) + z, qmin, qmax) - z) * s, computed in float64.

    With dtype=np.float32 the division is done in float32; (q - z) * s is exact in float64 for
    float32 s and |q - z| < 2^9, so rounding the result to float32 gives float32 arithmetic's value."""
    x = _f64(x)
    q = ref_codes(x, scale, zp, qmin, qmax, axis, dtype=dtype)
    qc, s, z = _channels(q, scale, zp, axis)
    out = np.empty(qc.shape, dtype=np.float64)
    for c in range(qc.shape[0]):
        out[c] = (qc[c] - z[c]) * s[c]
    return out[0] if axis is None else np.moveaxis(out, 0, axis)


def ref_lsq_grads(x, scale, zp, qmin: int, qmax: int, axis: int | None, grad_out, grad_scale: float = 1.0):
    """(grad_x, grad_scale, grad_zp) of fake quantization given the upstream gradient `grad_out`.

    grad_x has x's shape; grad_scale and grad_zp have the shapes of `scale` and `zp` (a scalar
    parameter sums over every element, a per-channel one over each channel)."""
    x, g = _f64(x), _f64(grad_out)
    g = np.broadcast_to(g, x.shape)
    xc, s, z = _channels(x, scale, zp, axis)
    gc = g[np.newaxis] if axis is None else np.moveaxis(g, axis, 0)
    grad_x = np.empty(xc.shape, dtype=np.float64)
    gs = np.zeros(xc.shape[0], dtype=np.float64)
    gz = np.zeros(xc.shape[0], dtype=np.float64)
    for c in range(xc.shape[0]):
        ratio = xc[c] / s[c]
        rounded = np.rint(ratio)
        code = rounded + z[c]
        below, above = code < qmin, code > qmax
        inside = ~(below | above)
        grad_x[c] = np.where(inside, gc[c], 0.0)
        dscale = np.where(inside, rounded - ratio, np.where(below, qmin - z[c], qmax - z[c]))
        dzero = np.where(inside, 0.0, -s[c])
        gs[c] = np.sum(gc[c] * dscale) * grad_scale
        gz[c] = np.sum(gc[c] * dzero) * grad_scale
    grad_x = grad_x[0] if axis is None else np.moveaxis(grad_x, 0, axis)
    gs = gs.sum() if np.ndim(scale) == 0 else gs
    gz = gz.sum() if np.ndim(zp) == 0 else gz
    return grad_x, np.asarray(gs), np.asarray(gz)


def ref_qparams_minmax(xmin, xmax, qmin: int, qmax: int, symmetric: bool):
    """(scale, zero_point) mapping [xmin, xmax], widened to include 0, onto [qmin, qmax].

    symmetric:  z = 0, s = max(-xmin, xmax) / qmax
    asymmetric: s = (xmax - xmin) / (qmax - qmin), z = clamp(rint(qmin - xmin / s), qmin, qmax)
    s is at least MIN_SCALE. Elementwise over (broadcast) xmin / xmax."""
    lo_all, hi_all = np.broadcast_arrays(_f64(xmin), _f64(xmax))
    scale = np.empty(lo_all.shape, dtype=np.float64)
    zero = np.empty(lo_all.shape, dtype=np.float64)
    for idx in np.ndindex(lo_all.shape):
        lo, hi = min(float(lo_all[idx]), 0.0), max(float(hi_all[idx]), 0.0)
        if symmetric:
            s = max(max(-lo, hi) / qmax, MIN_SCALE)
            z = 0.0
        else:
            s = max((hi - lo) / (qmax - qmin), MIN_SCALE)
            z = float(np.clip(np.rint(qmin - lo / s), qmin, qmax))
        scale[idx], zero[idx] = s, z
    return scale, zero
