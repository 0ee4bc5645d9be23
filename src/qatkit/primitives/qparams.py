"""Scale and zero point from data: min/max, percentile, or an MSE-optimal clipping search.

Per-tensor results are 0-d tensors; per-channel results have shape (C,) for C = x.shape[axis].
"""
from __future__ import annotations

import torch

from qatkit.errors import bad_value

INIT_METHODS = ("minmax", "percentile", "mse")
MIN_SCALE = 1e-8  # an all-zero tensor still gets a usable, positive scale
_MAX_QUANTILE_ELEMENTS = 1 << 22  # torch.quantile refuses very large inputs; subsample above this


def qparams_from_minmax(
    xmin: torch.Tensor, xmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) that map [xmin, xmax] (widened to include 0) onto [qmin, qmax].

    Symmetric: z = 0 and s = max(|xmin|, |xmax|) / qmax, so the largest magnitude is representable.
    Asymmetric: s = (xmax - xmin) / (qmax - qmin), z = round(qmin - xmin / s), so 0.0 is exact.
    """
    xmin, xmax = torch.clamp(xmin, max=0.0), torch.clamp(xmax, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-xmin, xmax) / qmax, min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=MIN_SCALE)
    zero_point = torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)
    return scale, zero_point


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """(C, N) view of x with channels on rows; per-tensor is a single row."""
    x = x.detach()
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _mse_search(
    rows: torch.Tensor, qmin: int, qmax: int, symmetric: bool, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink [min, max] by factors α ∈ (0, 1] and keep, per row, the α of least quantization MSE."""
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = qparams_from_minmax(lo, hi, qmin, qmax, symmetric)
    for alpha in torch.linspace(1.0, 1.0 / grid, grid).tolist():
        s, z = qparams_from_minmax(lo * alpha, hi * alpha, qmin, qmax, symmetric)
        q = torch.clamp(torch.round(rows / s[:, None]) + z[:, None], qmin, qmax)
        err = ((q - z[:, None]) * s[:, None] - rows).pow_(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for x by `method` ("minmax", "percentile" or "mse")."""
    if method not in INIT_METHODS:
        raise bad_value("range init method", method, ", ".join(INIT_METHODS), "pick one of these")
    rows = _rows(x, axis)
    if method == "minmax":
        scale, zp = qparams_from_minmax(rows.amin(dim=1), rows.amax(dim=1), qmin, qmax, symmetric)
    elif method == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise bad_value("percentile", percentile, "a number in (50, 100]", "use e.g. 99.99")
        if rows.shape[1] > _MAX_QUANTILE_ELEMENTS:
            rows = rows[:, torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[:_MAX_QUANTILE_ELEMENTS]]
        rows = rows.float()
        lo = torch.quantile(rows, 1.0 - percentile / 100.0, dim=1)
        hi = torch.quantile(rows, percentile / 100.0, dim=1)
        scale, zp = qparams_from_minmax(lo, hi, qmin, qmax, symmetric)
    else:
        scale, zp = _mse_search(rows, qmin, qmax, symmetric, grid)
    if axis is None:
        return scale[0], zp[0]
    return scale, zp
