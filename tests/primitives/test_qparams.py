"""qparams_from_minmax / qparams_from_tensor against the float64 oracle and their contracts."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qatkit.errors import ConfigError
from qatkit.primitives import (
    INIT_METHODS,
    fake_quantize,
    qparams_from_minmax,
    qparams_from_tensor,
    qrange,
)
from qatkit.primitives.reference import MIN_SCALE, ref_fake_quantize, ref_qparams_minmax

CASES = [
    pytest.param(bits, signed, symmetric, id=f"b{bits}-{'int' if signed else 'uint'}-{'sym' if symmetric else 'asym'}")
    for bits in (2, 3, 4, 8)
    for signed in (True, False)
    for symmetric in (True, False)
]


def random_bounds(seed: int, n: int = 64):
    """(xmin, xmax) pairs: mixed-sign, all-positive, all-negative, degenerate and zero ranges."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(scale=rng.uniform(0.01, 100), size=n), rng.normal(scale=rng.uniform(0.01, 100), size=n)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    lo[:4], hi[:4] = [0.0, 0.0, -3.0, 2.0], [0.0, 5.0, 0.0, 2.0]
    return lo, hi


def channel_mse(x: np.ndarray, scale, zp, qmin, qmax) -> np.ndarray:
    """Per-row quantization MSE of a (C, N) array, through the float64 reference."""
    scale, zp = np.atleast_1d(scale), np.atleast_1d(zp)
    return np.array([np.mean((ref_fake_quantize(x[c], scale[c], zp[c], qmin, qmax) - x[c]) ** 2) for c in range(x.shape[0])])


# ---- min/max ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed,symmetric", CASES)
def test_minmax_matches_reference(bits, signed, symmetric):
    qmin, qmax = qrange(bits, signed)
    for seed in range(5):
        lo, hi = random_bounds(seed)
        s, z = qparams_from_minmax(torch.from_numpy(lo), torch.from_numpy(hi), qmin, qmax, symmetric)
        rs, rz = ref_qparams_minmax(lo, hi, qmin, qmax, symmetric)
        np.testing.assert_allclose(s.numpy(), rs, rtol=1e-15, atol=0)
        assert np.array_equal(z.numpy(), rz)
        assert np.all(s.numpy() > 0)
        assert np.all((rz >= qmin) & (rz <= qmax)) and np.array_equal(rz, np.round(rz))
        if symmetric:
            assert np.all(rz == 0)


@pytest.mark.parametrize("bits,signed,symmetric", CASES)
def test_minmax_range_covers_bounds(bits, signed, symmetric):
    """[xmin, xmax] (widened to include 0) is represented: fake-quantizing either end errs by at most s/2."""
    qmin, qmax = qrange(bits, signed)
    lo, hi = random_bounds(11)
    s, z = ref_qparams_minmax(lo, hi, qmin, qmax, symmetric)
    for end in (np.minimum(lo, 0.0), np.maximum(hi, 0.0)):
        if symmetric and not signed:
            end = np.maximum(end, 0.0)  # unsigned symmetric codes cannot hold negatives
        err = np.abs(np.array([ref_fake_quantize(end[i], s[i], z[i], qmin, qmax) for i in range(len(end))]) - end)
        assert np.all(err <= s / 2 * (1 + 1e-9) + 1e-12)


@pytest.mark.parametrize("bits,signed", [(b, sg) for b in (2, 4, 8) for sg in (True, False)])
def test_zero_exactly_representable_asymmetric(bits, signed):
    qmin, qmax = qrange(bits, signed)
    for seed in range(5):
        lo, hi = random_bounds(seed)
        for dtype in (torch.float32, torch.float64):
            s, z = qparams_from_minmax(torch.from_numpy(lo).to(dtype), torch.from_numpy(hi).to(dtype), qmin, qmax, False)
            assert torch.equal(z, torch.round(z))
            zeros = torch.zeros(3, len(lo), dtype=dtype)
            out = fake_quantize(zeros, s, z, qmin, qmax, axis=1)
            assert torch.equal(out, zeros)


@pytest.mark.parametrize("method", INIT_METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_all_zero_tensor_gets_positive_scale(method, symmetric, axis):
    qmin, qmax = qrange(8, symmetric)
    x = torch.zeros(4, 16)
    s, z = qparams_from_tensor(x, qmin, qmax, symmetric=symmetric, axis=axis, method=method)
    assert s.shape == (() if axis is None else (4,))
    assert torch.all(s > 0) and torch.all(torch.isfinite(s))
    assert torch.all(s == MIN_SCALE)
    assert torch.equal(fake_quantize(x, s, z, qmin, qmax, axis), x)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_tensor_minmax_equals_reference_on_row_extremes(symmetric, axis):
    qmin, qmax = qrange(4, True)
    x = np.random.default_rng(3).normal(size=(5, 7)) * 3 + 0.5
    s, z = qparams_from_tensor(torch.from_numpy(x), qmin, qmax, symmetric=symmetric, axis=axis, method="minmax")
    rows = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    rs, rz = ref_qparams_minmax(rows.min(axis=1), rows.max(axis=1), qmin, qmax, symmetric)
    if axis is None:
        rs, rz = rs[0], rz[0]
    assert s.shape == np.shape(rs) and z.shape == np.shape(rz)
    np.testing.assert_allclose(s.numpy(), rs, rtol=1e-15, atol=0)
    assert np.array_equal(z.numpy(), rz)


# ---- percentile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_clips_outlier(symmetric):
    qmin, qmax = qrange(8, symmetric)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=gen)
    x[1234] = 1000.0
    s_mm, _ = qparams_from_tensor(x, qmin, qmax, symmetric=symmetric, method="minmax")
    s_pc, _ = qparams_from_tensor(x, qmin, qmax, symmetric=symmetric, method="percentile")
    assert s_pc < s_mm / 50  # the outlier sets the min/max scale; the 99.99th percentile is ~4
    # per channel: one outlier per channel, each channel's scale shrinks
    xc = torch.randn(3, 20_000, generator=gen)
    xc[:, 7] = torch.tensor([500.0, -800.0, 1e4])
    s_mm, _ = qparams_from_tensor(xc, qmin, qmax, symmetric=symmetric, axis=0, method="minmax")
    s_pc, _ = qparams_from_tensor(xc, qmin, qmax, symmetric=symmetric, axis=0, method="percentile", percentile=99.9)
    assert torch.all(s_pc < s_mm / 20)


def test_percentile_100_is_minmax():
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    s_mm, z_mm = qparams_from_tensor(x, 0, 255, symmetric=False, axis=0, method="minmax")
    s_pc, z_pc = qparams_from_tensor(x, 0, 255, symmetric=False, axis=0, method="percentile", percentile=100.0)
    torch.testing.assert_close(s_pc, s_mm, rtol=1e-6, atol=0)
    assert torch.equal(z_pc, z_mm)


@pytest.mark.parametrize("bad", [50.0, 10, 100.5, -1])
def test_percentile_out_of_range_rejected(bad):
    with pytest.raises(ConfigError, match=re.escape(f"percentile = {bad!r}")):
        qparams_from_tensor(torch.randn(10), -128, 127, symmetric=True, method="percentile", percentile=bad)


# ---- MSE search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed,symmetric", CASES)
def test_mse_search_never_worse_than_minmax(bits, signed, symmetric):
    qmin, qmax = qrange(bits, signed)
    rng = np.random.default_rng(bits * 4 + signed * 2 + symmetric)
    for dist in ("normal", "uniform", "laplace"):
        x = getattr(rng, dist)(size=(4, 300)) + rng.normal(size=(4, 1))
        if symmetric and not signed:
            x = np.abs(x)
        xt = torch.from_numpy(x)
        s_mm, z_mm = qparams_from_tensor(xt, qmin, qmax, symmetric=symmetric, axis=0, method="minmax")
        s_ms, z_ms = qparams_from_tensor(xt, qmin, qmax, symmetric=symmetric, axis=0, method="mse")
        e_mm = channel_mse(x, s_mm.numpy(), z_mm.numpy(), qmin, qmax)
        e_ms = channel_mse(x, s_ms.numpy(), z_ms.numpy(), qmin, qmax)
        assert np.all(e_ms <= e_mm * (1 + 1e-12)), (dist, e_ms, e_mm)
        assert np.all(s_ms.numpy() <= s_mm.numpy() * (1 + 1e-12))  # the search only shrinks the range


@pytest.mark.parametrize("dist", ["laplace", "student_t"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_strictly_better_on_heavy_tails_at_4_bits(dist, symmetric):
    qmin, qmax = qrange(4, symmetric)
    rng = np.random.default_rng(5)
    x = rng.laplace(size=(4, 2048)) if dist == "laplace" else rng.standard_t(3, size=(4, 2048))
    xt = torch.from_numpy(x)
    s_mm, z_mm = qparams_from_tensor(xt, qmin, qmax, symmetric=symmetric, axis=0, method="minmax")
    s_ms, z_ms = qparams_from_tensor(xt, qmin, qmax, symmetric=symmetric, axis=0, method="mse")
    e_mm = channel_mse(x, s_mm.numpy(), z_mm.numpy(), qmin, qmax)
    e_ms = channel_mse(x, s_ms.numpy(), z_ms.numpy(), qmin, qmax)
    assert np.all(e_ms < e_mm), e_ms / e_mm  # strictly lower in every channel
    assert np.mean(e_ms / e_mm) < 0.8  # and by a wide margin on average (one huge t-outlier may dominate a row)
    # per tensor too
    s_mm, z_mm = qparams_from_tensor(xt, qmin, qmax, symmetric=symmetric, method="minmax")
    s_ms, z_ms = qparams_from_tensor(xt, qmin, qmax, symmetric=symmetric, method="mse")
    flat = x.reshape(1, -1)
    assert channel_mse(flat, s_ms.item(), z_ms.item(), qmin, qmax)[0] < 0.8 * channel_mse(flat, s_mm.item(), z_mm.item(), qmin, qmax)[0]


@pytest.mark.parametrize("bad", ["max", "MSE", "", None])
def test_unknown_method_rejected(bad):
    with pytest.raises(ConfigError, match=re.escape(f"range init method = {bad!r} is not allowed")) as info:
        qparams_from_tensor(torch.randn(10), -128, 127, symmetric=True, method=bad)
    for name in INIT_METHODS:
        assert name in str(info.value)


# ---- power-of-two scales ------------------------------------------------------------------------
def _is_power_of_two(s: np.ndarray) -> bool:
    return bool(np.all(np.frexp(s)[0] == 0.5))


@pytest.mark.parametrize("bits,signed,symmetric", CASES)
def test_power_of_two_minmax_is_the_next_power_of_two_up(bits, signed, symmetric):
    """min/max with power_of_two: the smallest 2^k ≥ the min/max scale (the range stays representable)."""
    qmin, qmax = qrange(bits, signed)
    lo, hi = random_bounds(3)
    s, z = qparams_from_minmax(torch.from_numpy(lo), torch.from_numpy(hi), qmin, qmax, symmetric, power_of_two=True)
    rs, _ = ref_qparams_minmax(lo, hi, qmin, qmax, symmetric)
    want = 2.0 ** np.ceil(np.log2(rs))
    np.testing.assert_array_equal(s.numpy(), want)
    rz = np.clip(np.rint(qmin - np.minimum(lo, 0.0) / want), qmin, qmax)
    np.testing.assert_array_equal(z.numpy(), np.zeros_like(rz) if symmetric else rz)


@pytest.mark.parametrize("bits,signed,symmetric", CASES)
def test_power_of_two_mse_finds_the_best_power_of_two(bits, signed, symmetric):
    """MSE with power_of_two: per channel, a power of two, and no candidate in a window around the min/max one has a
    lower float64 MSE: 2^k / 2^j for j = -3..6 (coarser never wins; finer than 1/64 is not searched), each with
    z = 0 (symmetric) or the zero point of [min, max] shrunk to the width 2^k covers (both ends clipped alike, as the
    free-scale search's α)."""
    qmin, qmax = qrange(bits, signed)
    rng = np.random.default_rng(bits * 4 + signed * 2 + symmetric + 100)
    for dist in ("normal", "laplace"):
        x = getattr(rng, dist)(size=(3, 400)) + rng.normal(size=(3, 1))
        if symmetric and not signed:
            x = np.abs(x)
        s, z = qparams_from_tensor(torch.from_numpy(x), qmin, qmax, symmetric=symmetric, axis=0, method="mse",
                                   power_of_two=True)
        s, z = s.numpy(), z.numpy()
        assert _is_power_of_two(s) and np.all((z >= qmin) & (z <= qmax)) and np.array_equal(z, np.round(z))
        got = channel_mse(x, s, z, qmin, qmax)
        lo, hi = np.minimum(x.min(1), 0.0), np.maximum(x.max(1), 0.0)
        top = 2.0 ** np.ceil(np.log2(ref_qparams_minmax(lo, hi, qmin, qmax, symmetric)[0]))
        for j in range(-3, 7):
            cand = top / 2.0**j
            zc = np.zeros(3) if symmetric else \
                np.clip(np.rint(qmin - np.minimum((qmax - qmin) * cand / (hi - lo), 1.0) * lo / cand), qmin, qmax)
            assert np.all(got <= channel_mse(x, cand, zc, qmin, qmax) * (1 + 1e-9)), (dist, j)
        minmax = qparams_from_tensor(torch.from_numpy(x), qmin, qmax, symmetric=symmetric, axis=0, method="minmax",
                                     power_of_two=True)
        assert np.all(got <= channel_mse(x, *(t.numpy() for t in minmax), qmin, qmax) * (1 + 1e-9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_of_two_rounding_against_float64_logs(dtype):
    """power_of_two_nearest = 2^round(log2 s), power_of_two_ceil = 2^ceil(log2 s), exactly (frexp, no log), over
    magnitudes from 2^-30 to 2^10, exact powers of two (their own image) and the values either side of 2^(k+1/2)."""
    from qatkit.primitives.qparams import power_of_two_ceil, power_of_two_nearest
    rng = np.random.default_rng(0)
    mid = np.sqrt(0.5) * 2.0 ** np.arange(-20, 5)
    s = np.concatenate([2.0 ** rng.uniform(-30, 10, 2000), 2.0 ** np.arange(-30, 11), mid * (1 + 1e-6),
                        mid * (1 - 1e-6)])
    if dtype == torch.float32:  # the float32 values next to √½·2^k, either side
        half = np.float32(np.sqrt(0.5)) * 2.0 ** np.arange(-20, 5)
        s = np.concatenate([s, half, np.nextafter(half.astype(np.float32), np.float32(np.inf))])
    st = torch.from_numpy(s).to(dtype)
    s64 = st.double().numpy()
    assert np.array_equal(power_of_two_nearest(st).double().numpy(), 2.0 ** np.round(np.log2(s64)))
    assert np.array_equal(power_of_two_ceil(st).double().numpy(), 2.0 ** np.ceil(np.log2(s64)))
    edge = torch.tensor([float("inf"), float("nan")], dtype=dtype)
    assert torch.equal(power_of_two_nearest(edge)[:1], edge[:1]) and power_of_two_nearest(edge)[1].isnan()
