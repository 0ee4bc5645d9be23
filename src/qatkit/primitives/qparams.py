"""Scale and zero point from data: min/max, percentile, or an MSE-optimal clipping search.

Per-tensor results are 0-d tensors; per-channel results have shape (C,) for C = x.shape[axis].
With power_of_two, scales are powers of two: min/max and percentile round the scale up (the range stays
representable); MSE searches the powers of two themselves.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from qatkit.errors import bad_value

INIT_METHODS = ("minmax", "percentile", "mse")
MIN_SCALE = 1e-8  # an all-zero tensor still gets a usable, positive scale
_MAX_QUANTILE_ELEMENTS = 1 << 22  # torch.quantile refuses very large inputs; subsample above this


SQRT_HALF = 0.7071067811865476  # compared in float64: no float32 or float64 lies between it and √½


def _power_of_two(scale: torch.Tensor, up: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """s = m·2^e, m in [0.5, 1): 2^e where `up` (of m), else 2^(e-1); inf and NaN stay."""
    mantissa, exponent = torch.frexp(scale)
    pow2 = torch.ldexp(torch.ones_like(scale), exponent - 1 + up(mantissa).to(exponent.dtype))
    return torch.where(torch.isfinite(scale), pow2, scale)


def power_of_two_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ s, for s > 0 (exact: no log)."""
    return _power_of_two(scale, lambda m: m > 0.5)


def power_of_two_nearest(scale: torch.Tensor) -> torch.Tensor:
    """2^round(log2 s) for s > 0, without a log: 2^e where m ≥ √½, else 2^(e-1) (exact in any float type, and the
    fused kernel's rule bit for bit)."""
    return _power_of_two(scale, lambda m: m.double() >= SQRT_HALF)


def _zero_point(xmin: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)


def qparams_from_minmax(
    xmin: torch.Tensor, xmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) that map [xmin, xmax] (widened to include 0) onto [qmin, qmax].

    Symmetric: z = 0 and s = max(|xmin|, |xmax|) / qmax, so the largest magnitude is representable.
    Asymmetric: s = (xmax - xmin) / (qmax - qmin), z = round(qmin - xmin / s), so 0.0 is exact.
    power_of_two: s rounded up to a power of two.
    """
    xmin, xmax = torch.clamp(xmin, max=0.0), torch.clamp(xmax, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-xmin, xmax) / qmax, min=MIN_SCALE)
    else:
        scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=MIN_SCALE)
    scale = power_of_two_ceil(scale) if power_of_two else scale
    return scale, torch.zeros_like(scale) if symmetric else _zero_point(xmin, scale, qmin, qmax)


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """(C, N) view of x with channels on rows; per-tensor is a single row."""
    x = x.detach()
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _candidates(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool, grid: int,
                power_of_two: bool):
    """The (scale, zero point) pairs the MSE search tries: [min, max] shrunk by factors α ∈ (0, 1] on a grid of
    `grid`; with power_of_two, the powers of two from min/max's (rounded up) down to 1/grid of it."""
    if not power_of_two:
        for alpha in torch.linspace(1.0, 1.0 / grid, grid).tolist():
            yield qparams_from_minmax(lo * alpha, hi * alpha, qmin, qmax, symmetric)
        return
    top, _ = qparams_from_minmax(lo, hi, qmin, qmax, symmetric, power_of_two=True)
    lo = torch.clamp(lo, max=0.0)
    width = torch.clamp(hi, min=0.0) - lo
    for k in range(grid.bit_length()):
        scale = top / 2**k
        if symmetric:
            yield scale, torch.zeros_like(scale)
        else:  # the zero point of [min, max] shrunk to the width this scale covers: both ends clipped alike
            alpha = torch.clamp((qmax - qmin) * scale / width, max=1.0)
            yield scale, _zero_point(lo * alpha, scale, qmin, qmax)


def _mse_search(
    rows: torch.Tensor, qmin: int, qmax: int, symmetric: bool, grid: int, power_of_two: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per row, the first candidate (scale, zero point) of least quantization MSE (see _candidates); min/max's
    where no error is finite (NaN data). The errors of float32 rows on the CPU come from the fused kernel (one pass
    per candidate, no temporaries: with PyTorch's eight passes, prepare of BERT-base took 3x as long)."""
    from qatkit.primitives import cpu_kernel

    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    scales, zero_points = (torch.stack(v) for v in zip(*_candidates(lo, hi, qmin, qmax, symmetric, grid,
                                                                    power_of_two)))
    err = cpu_kernel.mse_errors(rows, scales, zero_points, qmin, qmax)
    if err is None:
        err = torch.stack([((torch.clamp(torch.round(rows / s[:, None]) + z[:, None], qmin, qmax) - z[:, None])
                            * s[:, None] - rows).pow_(2).mean(dim=1) for s, z in zip(scales, zero_points)])
    err = torch.nan_to_num(err, nan=float("inf"))
    least, best = err.min(dim=0)  # (the first of equal errors)
    minmax_s, minmax_z = qparams_from_minmax(lo, hi, qmin, qmax, symmetric, power_of_two)
    found = torch.isfinite(least)
    take = best[None].to(scales.device)
    return (torch.where(found, scales.gather(0, take)[0], minmax_s),
            torch.where(found, zero_points.gather(0, take)[0], minmax_z))


def qparams_from_tensor(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    symmetric: bool,
    axis: int | None = None,
    method: str = "mse",
    percentile: float = 99.99,
    grid: int = 64,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for x by `method` ("minmax", "percentile" or "mse"); power-of-two scales with
    power_of_two."""
    if method not in INIT_METHODS:
        raise bad_value("range init method", method, ", ".join(INIT_METHODS), "pick one of these")
    rows = _rows(x, axis)
    if method == "minmax":
        scale, zp = qparams_from_minmax(rows.amin(dim=1), rows.amax(dim=1), qmin, qmax, symmetric, power_of_two)
    elif method == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise bad_value("percentile", percentile, "a number in (50, 100]", "use e.g. 99.99")
        if rows.shape[1] > _MAX_QUANTILE_ELEMENTS:
            rows = rows[:, torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:_MAX_QUANTILE_ELEMENTS]]
        rows = rows.float()
        lo = torch.quantile(rows, 1.0 - percentile / 100.0, dim=1)
        hi = torch.quantile(rows, percentile / 100.0, dim=1)
        scale, zp = qparams_from_minmax(lo, hi, qmin, qmax, symmetric, power_of_two)
    else:
        scale, zp = _mse_search(rows, qmin, qmax, symmetric, grid, power_of_two)
    if axis is None:
        return scale[0], zp[0]
    return scale, zp
