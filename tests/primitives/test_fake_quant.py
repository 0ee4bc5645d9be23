"""fake_quantize / quantize_codes against the float64 oracles in qatkit.primitives.reference.

What holds (checked below):
* float64 inputs: the forward pass is bit-identical to the reference, and the backward pass equals
  the reference's gradients to 1e-12 (sums over channels may be added in another order).
* float32 inputs: the forward pass is bit-identical to the reference evaluated with the division
  x/s done in float32 (`dtype=np.float32`). Against the pure float64 reference it differs only where
  the exact quotient x/s lies within float32 rounding of a .5 tie, and then by exactly one step
  (e.g. x = 0.75, s = float32(0.1): x/s = 7.49999989 exactly, 7.5 in float32, so the code is 8, not 7).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qatkit.primitives import fake_quantize, lsq_grad_scale, qrange, quantize_codes
from qatkit.primitives.fake_quant import ABS, POWER_OF_TWO, per_channel_view
from qatkit.primitives.reference import ref_codes, ref_fake_quantize, ref_lsq_grads

BITS = list(range(2, 9))
AXES = [None, 0, 1, -1]
SHAPE = (3, 4, 5)
SEEDS = range(8)
EPS = np.finfo(np.float64).eps


# ---- helpers ------------------------------------------------------------------------------------
def make_case(seed: int, bits: int, signed: bool, symmetric: bool, axis, shape=SHAPE):
    """A random (x, scale, zp, qmin, qmax) with values below, inside and above the range, exact grid
    points, exact .5 ties (power-of-two scales on even seeds make x/s exact) and zeros."""
    rng = np.random.default_rng([seed, bits, int(signed), int(symmetric), 99 if axis is None else axis % 10])
    narrow = signed and seed % 2 == 1
    qmin, qmax = qrange(bits, signed, narrow)
    channels = 1 if axis is None else shape[axis]
    if seed % 2 == 0:
        scale = 2.0 ** rng.integers(-8, 4, size=channels).astype(np.float64)
    else:
        scale = np.exp(rng.uniform(-7.0, 3.0, size=channels))
    zp = np.zeros(channels) if symmetric else rng.integers(qmin, qmax + 1, size=channels).astype(np.float64)
    # positions in code space (u = x/s + z), then x = (u - z) * s channel by channel
    u = rng.uniform(qmin - 4, qmax + 4, size=shape)
    kind = rng.integers(0, 6, size=shape)
    u = np.where(kind == 1, np.round(u), u)  # exact grid points
    u = np.where(kind == 2, np.floor(u) + 0.5, u)  # .5 ties (exact when s is a power of two)
    u = np.where(kind == 3, rng.uniform(-1e4, 1e4, size=shape), u)  # far outside
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s_b, z_b = scale.reshape(bshape), zp.reshape(bshape)
    x = (u - z_b) * s_b
    x = np.where(kind == 4, 0.0, x)
    if axis is None:
        scale, zp = scale[0], zp[0]
    return x, scale, zp, qmin, qmax


def tensors(x, scale, zp, dtype=torch.float64, requires_grad=False):
    to = lambda a: torch.tensor(np.asarray(a), dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return to(x), to(scale), to(zp)


def assert_bitexact(got: torch.Tensor, want: np.ndarray) -> None:
    want_t = torch.from_numpy(np.ascontiguousarray(want)).to(got.dtype)
    assert got.shape == want_t.shape
    assert torch.equal(got, want_t), (got - want_t).abs().max()
    assert torch.equal(torch.signbit(got), torch.signbit(want_t))  # even the sign of zero agrees


GRID = [
    pytest.param(bits, signed, symmetric, axis, id=f"b{bits}-{'int' if signed else 'uint'}-{'sym' if symmetric else 'asym'}-ax{axis}")
    for bits in BITS
    for signed in (True, False)
    for symmetric in (True, False)
    for axis in AXES
]


# ---- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed,symmetric,axis", GRID)
def test_forward_float64_bitexact(bits, signed, symmetric, axis):
    for seed in SEEDS:
        x, scale, zp, qmin, qmax = make_case(seed, bits, signed, symmetric, axis)
        xt, st_, zt = tensors(x, scale, zp)
        out = fake_quantize(xt, st_, zt, qmin, qmax, axis)
        assert out.dtype == torch.float64
        assert_bitexact(out, ref_fake_quantize(x, scale, zp, qmin, qmax, axis))
        assert_bitexact(quantize_codes(xt, st_, zt, qmin, qmax, axis), ref_codes(x, scale, zp, qmin, qmax, axis))


@pytest.mark.parametrize("bits,signed,symmetric,axis", GRID)
def test_forward_float32(bits, signed, symmetric, axis):
    for seed in SEEDS:
        x, scale, zp, qmin, qmax = make_case(seed, bits, signed, symmetric, axis)
        x32, s32 = x.astype(np.float32), np.asarray(scale, dtype=np.float32)
        xt, st_, zt = tensors(x32, s32, zp, dtype=torch.float32)
        out = fake_quantize(xt, st_, zt, qmin, qmax, axis)
        assert out.dtype == torch.float32
        # exact against the reference that divides in float32
        assert_bitexact(out, ref_fake_quantize(x32, s32, zp, qmin, qmax, axis, dtype=np.float32).astype(np.float32))
        # against the float64 reference: equal except at near-ties, and there one step apart
        c32 = quantize_codes(xt, st_, zt, qmin, qmax, axis).double().numpy()
        c64 = ref_codes(x32, s32, zp, qmin, qmax, axis)
        differ = c32 != c64
        assert np.all(np.abs(c32 - c64)[differ] == 1)
        xc, sc = (x32, s32) if axis is None else (np.moveaxis(x32, axis, -1), s32)
        ratio64 = (xc.astype(np.float64) / sc.astype(np.float64))
        ratio64 = ratio64 if axis is None else np.moveaxis(ratio64, -1, axis)
        frac = np.abs(ratio64 - np.floor(ratio64) - 0.5)  # distance from a .5 tie
        assert np.all(frac[differ] <= 4 * np.finfo(np.float32).eps * np.maximum(np.abs(ratio64[differ]), 1))


def test_float32_near_tie_differs_from_float64_by_one_step():
    """x/s = 7.49999989 exactly, but float32 rounds the quotient to the tie 7.5, which goes to 8."""
    x, s = np.float32(0.75), np.float32(0.1)
    zero = torch.tensor(0.0)
    assert float(quantize_codes(torch.tensor(x), torch.tensor(s), zero, -128, 127)) == 8.0
    assert float(ref_codes(x, s, 0.0, -128, 127, dtype=np.float32)) == 8.0
    assert float(ref_codes(x, s, 0.0, -128, 127)) == 7.0
    assert float(quantize_codes(torch.tensor(x, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), zero.double(), -128, 127)) == 7.0


@pytest.mark.parametrize("s", [1.0, 0.25, 8.0])
@pytest.mark.parametrize("z", [0.0, 3.0])
def test_ties_round_half_to_even(s, z):
    ratios = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 4.5, 5.5])
    want_codes = np.array([0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, -4.0, 4.0, 6.0])
    x = torch.tensor(ratios * s, dtype=torch.float64)
    st_, zt = torch.tensor(s, dtype=torch.float64), torch.tensor(z, dtype=torch.float64)
    out = fake_quantize(x, st_, zt, -128, 127)
    assert torch.equal(out, torch.tensor(want_codes * s, dtype=torch.float64))
    assert torch.equal(quantize_codes(x, st_, zt, -128, 127), torch.tensor(want_codes + z, dtype=torch.float64))
    assert np.array_equal(ref_fake_quantize(ratios * s, s, z, -128, 127), want_codes * s)
    for dtype in (torch.float32, torch.float64):  # s is a power of two: the ties are exact in both
        got = fake_quantize(x.to(dtype), st_.to(dtype), zt.to(dtype), -128, 127)
        assert torch.equal(got, torch.tensor(want_codes * s, dtype=dtype))


def test_clamps_to_range_and_zero_point_shifts_it():
    s, z = torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    x = torch.tensor([-100.0, -1.0, -0.9, 0.0, 0.6, 0.75, 100.0], dtype=torch.float64)
    # uint2: codes 0..3; represented values (q - 2) * 0.5 in {-1, -0.5, 0, 0.5}
    out = fake_quantize(x, s, z, 0, 3)
    assert out.tolist() == [-1.0, -1.0, -1.0, 0.0, 0.5, 0.5, 0.5]


# ---- backward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed,symmetric,axis", GRID)
def test_backward_matches_reference(bits, signed, symmetric, axis):
    for seed in SEEDS:
        x, scale, zp, qmin, qmax = make_case(seed, bits, signed, symmetric, axis)
        g = np.random.default_rng(seed + 1000).normal(size=x.shape)
        grad_scale = [1.0, 0.37, lsq_grad_scale(x.size, qmax)][seed % 3]
        xt, st_, zt = tensors(x, scale, zp, requires_grad=True)
        fake_quantize(xt, st_, zt, qmin, qmax, axis, grad_scale).backward(torch.from_numpy(g))
        gx, gs, gz = ref_lsq_grads(x, scale, zp, qmin, qmax, axis, g, grad_scale)
        for got, want in ((xt.grad, gx), (st_.grad, gs), (zt.grad, gz)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_backward_only_needed_inputs():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s, z = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    fake_quantize(x, s, z, -8, 7).sum().backward()
    assert s.grad is None and z.grad is None
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("raw_s, raw_z", [(0.05, 2.3), (-0.05, 2.7), (0.0, 0.0), (1e-9, -1.2), (0.03, 300.0)])
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("map_scale", [ABS, POWER_OF_TWO], ids=["abs", "power-of-two"])
def test_learned_parameters_equal_the_mapping_in_autograd(raw_s, raw_z, axis, map_scale):
    """Raw quantizer parameters (float64: the eager path): s = max(|scale|, 1e-8) (with POWER_OF_TWO: 2^round(log2 s),
    straight through), z = round(clamp(zp)) mapped inside fake quantization give the output and gradients of the
    same mapping as autograd ops, exactly."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    shape = () if axis is None else (SHAPE[axis],)
    scale = torch.full(shape, raw_s, dtype=torch.float64, requires_grad=True)
    zp = torch.full(shape, raw_z, dtype=torch.float64, requires_grad=True)
    out = fake_quantize(x, scale, zp, 0, 15, axis, 0.3, map_scale=map_scale, map_zero_point=True)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, scale, zp), upstream)
    zc = torch.clamp(zp, 0, 15)
    s = torch.clamp(scale.abs(), min=1e-8)
    if map_scale == POWER_OF_TWO:
        pow2 = torch.exp2(torch.round(torch.log2(s.detach())))
        s = pow2 + (s - s.detach()) * (pow2 / s.detach())
    ref = fake_quantize(x, s, zc + (torch.round(zc) - zc).detach(), 0, 15, axis, 0.3)
    want = torch.autograd.grad(ref, (x, scale, zp), upstream)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(got, want))


# ---- gradcheck against a smooth surrogate with the same derivatives ----------------------------
def gradcheck_point(seed: int, qmin: int, qmax: int, axis, shape, symmetric: bool):
    """(x0, s0, z0, r0): points at least 0.1 away from rounding ties and >= 1 code from clamp edges."""
    rng = np.random.default_rng(seed)
    channels = 1 if axis is None else shape[axis]
    scale = rng.uniform(0.2, 1.5, size=channels)
    zp = np.zeros(channels) if symmetric else rng.integers(qmin + 1, qmax, size=channels).astype(np.float64)
    kind = rng.integers(0, 4, size=shape)  # 0, 1: inside; 2: below; 3: above
    inside_code = rng.integers(qmin + 1, qmax, size=shape) + rng.uniform(-0.4, 0.4, size=shape)
    u = np.where(kind < 2, inside_code, np.where(kind == 2, qmin - rng.uniform(2, 6, size=shape), qmax + rng.uniform(2, 6, size=shape)))
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    x = (u - zp.reshape(bshape)) * scale.reshape(bshape)
    if axis is None:
        scale, zp = scale[0], zp[0]
    xt, st_, zt = tensors(x, scale, zp, requires_grad=True)
    with torch.no_grad():
        ratio = xt / per_channel_view(st_, xt, axis)
        r0 = torch.round(ratio) - ratio
    return xt, st_, zt, r0


def surrogate(qmin, qmax, axis, r0, grad_scale=1.0, s0=None, z0=None):
    """h = fake_quantize + (S - fake_quantize).detach(): forward value S, backward fake_quantize's.

    S(x, s, z) = s * (clamp(x/s + r0 + z, qmin, qmax) - z) is smooth near the test point and its
    derivatives there are the STE/LSQ ones. With s0/z0 given, S is evaluated at s0 + g(s - s0),
    z0 + g(z - z0), which scales its s and z derivatives by g = grad_scale."""

    def h(x, s, z):
        fq = fake_quantize(x, s, z, qmin, qmax, axis, grad_scale)
        if s0 is not None:
            s = s0 + grad_scale * (s - s0)
            z = z0 + grad_scale * (z - z0)
        sv, zv = per_channel_view(s, x, axis), per_channel_view(z, x, axis)
        smooth = sv * (torch.clamp(x / sv + r0 + zv, qmin, qmax) - zv)
        return fq + (smooth - fq).detach()

    return h


GRADCHECK_CASES = [
    pytest.param(bits, signed, symmetric, axis, shape, id=f"b{bits}-{'int' if signed else 'uint'}-{'sym' if symmetric else 'asym'}-ax{axis}-{len(shape)}d")
    for bits in (2, 4, 8)
    for signed in (True, False)
    for symmetric in (True, False)
    for axis, shape in ((None, (3, 5)), (0, (3, 5)), (1, (3, 5)), (-1, (2, 3, 4)))
]


@pytest.mark.parametrize("bits,signed,symmetric,axis,shape", GRADCHECK_CASES)
def test_gradcheck_surrogate(bits, signed, symmetric, axis, shape):
    qmin, qmax = qrange(bits, signed)
    for seed in range(2):
        xt, st_, zt, r0 = gradcheck_point(seed, qmin, qmax, axis, shape, symmetric)
        assert torch.autograd.gradcheck(surrogate(qmin, qmax, axis, r0), (xt, st_, zt), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grad_scale", [0.25, 3.0, lsq_grad_scale(15, 127)])
@pytest.mark.parametrize("axis,shape", [(None, (3, 5)), (1, (3, 5))])
def test_gradcheck_grad_scale_is_linear(grad_scale, axis, shape):
    qmin, qmax = qrange(8, False)
    xt, st_, zt, r0 = gradcheck_point(7, qmin, qmax, axis, shape, symmetric=False)
    h = surrogate(qmin, qmax, axis, r0, grad_scale, s0=st_.detach().clone(), z0=zt.detach().clone())
    assert torch.autograd.gradcheck(h, (xt, st_, zt), eps=1e-6, atol=1e-6, rtol=1e-5)
    # and directly: s and z gradients scale by g, the x gradient does not
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for gs in (1.0, grad_scale):
        grads.append(torch.autograd.grad(fake_quantize(xt, st_, zt, qmin, qmax, axis, gs), (xt, st_, zt), g))
    (gx1, gs1, gz1), (gxg, gsg, gzg) = grads
    assert torch.equal(gx1, gxg)
    torch.testing.assert_close(gsg, gs1 * grad_scale, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gzg, gz1 * grad_scale, rtol=1e-13, atol=1e-13)
    assert gs1.abs().sum() > 0 and gz1.abs().sum() > 0


def test_lsq_grad_scale_formula():
    assert lsq_grad_scale(100, 127) == pytest.approx(1 / math.sqrt(100 * 127), rel=1e-15)
    assert lsq_grad_scale(0, 0) == 1.0  # guarded against empty tensors and 1-code ranges


# ---- properties ---------------------------------------------------------------------------------
@st.composite
def quant_params(draw):
    bits = draw(st.integers(2, 8))
    signed, symmetric, narrow = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    qmin, qmax = qrange(bits, signed, narrow and signed)
    channels = draw(st.integers(1, 3))
    per_channel = draw(st.booleans())
    n = 1 if not per_channel else channels
    scale = np.array(draw(st.lists(st.floats(1e-4, 1e3), min_size=n, max_size=n)))
    if symmetric:
        zp = np.zeros(n)
    else:
        zp = np.array(draw(st.lists(st.integers(qmin, qmax), min_size=n, max_size=n)), dtype=np.float64)
    return qmin, qmax, scale, zp, per_channel


def _run(x: np.ndarray, scale, zp, qmin, qmax, per_channel) -> np.ndarray:
    """fake_quantize of x (shape (C, n)) along axis 0, or per tensor."""
    if per_channel:
        xt, st_, zt = tensors(x, scale, zp)
        return fake_quantize(xt, st_, zt, qmin, qmax, 0).numpy()
    xt, st_, zt = tensors(x, scale[0], zp[0])
    return fake_quantize(xt, st_, zt, qmin, qmax).numpy()


@settings(max_examples=200, deadline=None)
@given(params=quant_params(), data=st.data())
def test_error_at_most_half_step_inside_range(params, data):
    qmin, qmax, scale, zp, per_channel = params
    rows = []
    for c in range(len(scale)):
        lo, hi = (qmin - zp[c]) * scale[c], (qmax - zp[c]) * scale[c]
        rows.append(data.draw(st.lists(st.floats(lo, hi), min_size=8, max_size=8)))
    x = np.array(rows)
    s_b = scale[:, None]
    out = _run(x, scale, zp, qmin, qmax, per_channel)
    assert np.all(np.abs(x - out) <= s_b / 2 + 4 * EPS * (np.abs(x) + s_b))


finite_x = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(params=quant_params(), data=st.data())
def test_idempotent_on_grid_and_monotone(params, data):
    qmin, qmax, scale, zp, per_channel = params
    n = data.draw(st.integers(1, 16))
    x = np.array([data.draw(st.lists(finite_x, min_size=n, max_size=n)) for _ in range(len(scale))])
    s_b, z_b = scale[:, None], zp[:, None]
    out = _run(x, scale, zp, qmin, qmax, per_channel)
    # idempotent, exactly
    assert np.array_equal(_run(out, scale, zp, qmin, qmax, per_channel), out)
    # on the grid: out == (q - z) * s exactly for an integer code q in [qmin, qmax]
    q = np.rint(out / s_b) + z_b
    assert np.all((q >= qmin) & (q <= qmax))
    assert np.array_equal((q - z_b) * s_b, out)
    assert np.all(np.abs(out / s_b + z_b - q) <= 1e-12 * np.maximum(np.abs(q), 1))
    # monotone non-decreasing along each channel
    order = np.argsort(x, axis=1, kind="stable")
    sorted_out = np.take_along_axis(out, order, axis=1)
    assert np.all(np.diff(sorted_out, axis=1) >= 0)
