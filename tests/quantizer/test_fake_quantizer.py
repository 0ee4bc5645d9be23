"""FakeQuantizer: state, modes, bit-width changes and gradients, against the float64 oracles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qatkit
from qatkit.config import QuantSpec
from qatkit.errors import DataError
from qatkit.primitives import qrange
from qatkit.primitives.reference import (
    ref_codes,
    ref_fake_quantize,
    ref_lsq_grads,
    ref_qparams_minmax,
)
from qatkit.quantizer import FakeQuantizer

STATE_KEYS = {"scale", "zero_point", "bits", "initialized", "enabled"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight_q(bits=8, per_channel=True, channels=6, init="mse", **kw) -> FakeQuantizer:
    spec = QuantSpec(bits=bits, per_channel=per_channel, axis=0, init=init, **kw)
    return FakeQuantizer(spec, kind="weight", channels=channels if per_channel else None)


def act_q(bits=8, symmetric=False, signed=None, init="mse", **kw) -> FakeQuantizer:
    signed = symmetric if signed is None else signed
    return FakeQuantizer(QuantSpec(bits=bits, symmetric=symmetric, signed=signed, init=init, **kw), kind="act")


def represented_range(q: FakeQuantizer):
    """Real interval [(qmin - z)s, (qmax - z)s] per scale, as float64 numpy arrays."""
    s, z = (t.double().numpy() for t in q.qparams())
    qmin, qmax = q.qrange
    return (qmin - z) * s, (qmax - z) * s, s


QUANTIZERS = {
    "weight-per-channel": lambda: weight_q(4, per_channel=True),
    "weight-per-tensor": lambda: weight_q(4, per_channel=False),
    "act-asym-uint8": lambda: act_q(8, symmetric=False),
    "act-sym-int8-narrow": lambda: act_q(8, symmetric=True, narrow=True),
}


# ---- state ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", QUANTIZERS)
def test_state_dict_roundtrip_reproduces_outputs(name):
    q = QUANTIZERS[name]()
    x = torch.randn(6, 5, 4, generator=gen(0)) * 2 + 0.3
    q(x)  # initialises from x
    with torch.no_grad():
        q.scale.mul_(1.1)  # a trained-looking state, not what a fresh init would give
    if name.startswith("act"):
        q.set_bits(4)
    sd = q.state_dict()
    assert set(sd) == STATE_KEYS
    assert bool(sd["initialized"]) and bool(sd["enabled"])
    assert int(sd["bits"]) == 4  # weights built at 4 bits, activations set from 8 to 4
    fresh = QUANTIZERS[name]()
    assert not bool(fresh.initialized)
    fresh.load_state_dict(sd)
    assert fresh.qrange == q.qrange
    x2 = torch.randn(6, 5, 4, generator=gen(1)) * 3
    assert torch.equal(fresh(x2), q(x2))
    for key in STATE_KEYS:
        assert torch.equal(fresh.state_dict()[key], sd[key])


def test_learnable_asymmetric_zero_point_is_a_parameter_others_are_buffers():
    names = lambda q: {n for n, _ in q.named_parameters()}  # noqa: E731
    assert names(act_q(8, symmetric=False)) == {"scale", "zero_point"}
    assert names(act_q(8, symmetric=True)) == {"scale"}
    frozen = act_q(8, symmetric=False, learnable=False)
    assert names(frozen) == {"scale"} and not frozen.scale.requires_grad  # a frozen Parameter
    assert "zero_point" in dict(frozen.named_buffers())


@pytest.mark.parametrize("name", QUANTIZERS)
def test_to_float64_carries_state(name):
    q = QUANTIZERS[name]()
    x = torch.randn(6, 5, 4, generator=gen(2))
    q(x)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.to(torch.float64)
    assert q.scale.dtype == torch.float64 and q.zero_point.dtype == torch.float64
    assert q.bits.dtype == before["bits"].dtype and q.initialized.dtype == torch.bool and q.enabled.dtype == torch.bool
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k].to(v.dtype))
    assert isinstance(q.scale, torch.nn.Parameter) and q.scale.requires_grad
    x64 = x.double() * 1.7
    out = q(x64)
    assert out.dtype == torch.float64
    s, z = q.qparams()
    assert np.array_equal(out.detach().numpy(), ref_fake_quantize(x64, s, z, *q.qrange, q.axis))


# ---- modes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric,signed", [(False, False), (True, True), (True, False), (False, True)])
def test_observe_passes_through_and_minmax_covers_observed_range(symmetric, signed):
    q = act_q(8, symmetric=symmetric, signed=signed, init="minmax")
    q.start_observing()
    batches = [torch.randn(4, 10, generator=gen(i)) * (i + 1) + 0.5 * i for i in range(3)]
    if symmetric and not signed:
        batches = [b.relu() for b in batches]
    for b in batches:
        assert q(b) is b
        assert not bool(q.initialized) and q.observing
    q.finish_observing()
    assert bool(q.initialized) and not q.observing and q.active
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    qmin, qmax = q.qrange
    rs, rz = ref_qparams_minmax(lo, hi, qmin, qmax, symmetric)
    s, z = q.qparams()
    np.testing.assert_allclose(float(s), float(rs), rtol=1e-6)
    assert float(z) == float(rz)
    r_lo, r_hi, s_np = represented_range(q)
    tol = float(s_np) * 1e-5
    if symmetric:  # the range holds the largest magnitude outright
        assert r_hi >= max(abs(lo), hi) - tol
        if signed:
            assert r_lo <= -max(abs(lo), hi) + tol
    else:  # the zero point is rounded: the ends are covered to within half a step
        assert r_lo <= lo + s_np / 2 + tol and r_hi >= hi - s_np / 2 - tol
    ends = torch.tensor([lo, hi])
    assert torch.all((q(ends) - ends).abs() <= float(s) / 2 + tol)


@pytest.mark.parametrize("init", ["percentile", "mse"])
def test_observe_other_inits_initialise(init):
    q = act_q(8, symmetric=False, init=init)
    q.start_observing()
    x = torch.randn(8, 32, generator=gen(3))
    assert q(x) is x
    q.finish_observing()
    assert bool(q.initialized)
    r_lo, r_hi, _ = represented_range(q)
    assert r_lo < 0 < r_hi and float(q.scale.detach()) > 0


def test_finish_observing_without_data_stays_uninitialised():
    q = act_q(8)
    q.start_observing()
    q.finish_observing()
    assert not bool(q.initialized) and not q.observing


def test_disabled_passes_through():
    q = weight_q(4)
    x = torch.randn(6, 3, generator=gen(4))
    q.enabled.fill_(False)
    assert q(x) is x
    assert not bool(q.initialized) and not q.active
    q.enabled.fill_(True)
    out = q(x)
    assert bool(q.initialized) and not torch.equal(out, x)


def test_uninitialised_weight_initialises_from_first_tensor():
    q = weight_q(8, init="minmax").to(torch.float64)
    x = torch.randn(6, 9, generator=gen(5), dtype=torch.float64)
    out = q(x)
    rs, rz = ref_qparams_minmax(x.float().amin(1).double(), x.float().amax(1).double(), *q.qrange, True)
    np.testing.assert_allclose(q.scale.detach().numpy(), rs, rtol=1e-6)
    s, z = q.qparams()
    assert np.array_equal(out.detach().numpy(), ref_fake_quantize(x, s, z, *q.qrange, 0))
    assert np.array_equal(q.codes(x).numpy(), ref_codes(x, s, z, *q.qrange, 0))


# ---- bit-width changes ------------------------------------------------------------------------
SET_BITS_CASES = {
    "int-sym": dict(symmetric=True, signed=True),
    "int-sym-narrow": dict(symmetric=True, signed=True, narrow=True),
    "uint-sym": dict(symmetric=True, signed=False),
    "uint-asym": dict(symmetric=False, signed=False),
    "int-asym": dict(symmetric=False, signed=True),
}


@pytest.mark.parametrize("case", SET_BITS_CASES)
@pytest.mark.parametrize("chain", [(8, 4), (8, 4, 2), (6, 3)])
def test_set_bits_keeps_represented_range(case, chain):
    kw = SET_BITS_CASES[case]
    q = act_q(chain[0], init="minmax", **kw).to(torch.float64)
    x = torch.randn(16, 8, generator=gen(6), dtype=torch.float64) * 2 + 0.7
    q(x.relu() if not kw["signed"] and kw["symmetric"] else x)
    lo0, hi0, _ = represented_range(q)
    for bits in chain[1:]:
        q.set_bits(bits)
        assert int(q.bits) == bits and q.spec.bits == bits
        assert q.qrange == qrange(bits, kw["signed"], kw.get("narrow", False))
        lo, hi, s = represented_range(q)
        if kw["symmetric"]:
            # z stays 0 and the largest magnitude is kept; a signed range's extra negative code cannot
            # be kept too (-128·s8 vs -8·s4), so the low end moves by less than one new step
            assert float(q.zero_point) == 0.0
            assert hi == pytest.approx(hi0, rel=1e-12) and abs(lo - lo0) < s * (1 + 1e-9), (lo0, hi0, lo, hi)
        else:
            # the ends move by at most half a new step (the zero point is rounded to an integer)
            assert abs(lo - lo0) <= s / 2 * (1 + 1e-9) and abs(hi - hi0) <= s / 2 * (1 + 1e-9), (lo0, hi0, lo, hi)
        lo0, hi0 = lo, hi


def test_set_bits_per_channel_weights():
    q = weight_q(8, per_channel=True, init="minmax").to(torch.float64)
    x = torch.randn(6, 10, generator=gen(7), dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    q(x)
    lo0, hi0, s0 = represented_range(q)
    q.set_bits(4)
    lo, hi, s = represented_range(q)
    np.testing.assert_allclose(s, s0 * 127 / 7, rtol=1e-12)  # symmetric: qmax·s is kept
    np.testing.assert_allclose(hi, hi0, rtol=1e-12)
    assert np.all(np.abs(lo - lo0) < s)
    assert np.all(q.zero_point.numpy() == 0)


def test_set_bits_before_init_only_changes_bits():
    q = act_q(8)
    q.set_bits(3)
    assert q.qrange == (0, 7) and not bool(q.initialized) and float(q.scale.detach()) == 1.0


@pytest.mark.parametrize("bad", [1, 9, 4.0])
def test_set_bits_rejects_bad_width_and_keeps_state(bad):
    from qatkit.errors import ConfigError

    q = act_q(8)
    with pytest.raises(ConfigError, match=f"bits = {bad!r}"):
        q.set_bits(bad)
    assert int(q.bits) == 8 and q.spec.bits == 8


def test_set_bits_raising_width_keeps_symmetric_zero_point():
    q = act_q(4, symmetric=True, init="minmax")
    q(torch.randn(8, 16, generator=gen(8)))
    q.set_bits(8)
    assert float(q.zero_point) == 0.0


# ---- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,make,shape",
    [
        ("weight-per-channel", lambda: weight_q(4, per_channel=True, channels=5), (5, 3, 2, 2)),
        ("weight-per-tensor", lambda: weight_q(4, per_channel=False), (5, 3, 2, 2)),
        ("act-asym", lambda: act_q(8, symmetric=False), (4, 6, 5)),
        ("act-sym", lambda: act_q(4, symmetric=True), (4, 6, 5)),
    ],
)
def test_lsq_grad_scale_applied(name, make, shape):
    q = make().to(torch.float64)
    x0 = torch.randn(shape, generator=gen(9), dtype=torch.float64)
    q(x0)  # initialise
    with torch.no_grad():
        q.scale.mul_(0.6)  # so that some values clamp
    x = (x0 * 1.3).requires_grad_(True)
    g = torch.randn(shape, generator=gen(10), dtype=torch.float64)
    q(x).backward(g)
    s, z = q.qparams()
    qmin, qmax = q.qrange
    n = x.numel() // s.numel() if q.kind == "weight" else x.numel() // x.shape[0]
    grad_scale = 1.0 / math.sqrt(n * qmax)
    gx, gs, gz = ref_lsq_grads(x, s, z, qmin, qmax, q.axis, g, grad_scale)
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(q.scale.grad.numpy(), gs, rtol=1e-12, atol=1e-12)
    assert np.all(np.abs(gs) > 0)
    if isinstance(q.zero_point, torch.nn.Parameter):
        np.testing.assert_allclose(q.zero_point.grad.numpy(), gz, rtol=1e-12, atol=1e-12)
        assert np.all(np.abs(gz) > 0)


@pytest.mark.parametrize("per_channel", [True, False])
def test_quant_error_value_and_exact_gradients(per_channel):
    q = weight_q(4, per_channel=per_channel, channels=5).to(torch.float64)
    x0 = torch.randn(5, 8, generator=gen(11), dtype=torch.float64)
    q(x0)
    x = (x0 * 1.5).requires_grad_(True)  # some values beyond the range
    g = torch.randn(5, 8, generator=gen(12), dtype=torch.float64)
    delta = q.quant_error(x)
    s, z = q.qparams()
    qmin, qmax = q.qrange
    assert np.array_equal(delta.detach().numpy(), x.detach().numpy() - ref_fake_quantize(x, s, z, qmin, qmax, q.axis))
    codes = ref_codes(x, s, z, qmin, qmax, q.axis)
    assert np.any(codes == qmin) or np.any(codes == qmax)
    delta.backward(g)
    assert torch.equal(x.grad, g)  # dΔ/dx = 1 everywhere, clamped or not
    z_b = z.numpy()[:, None] if per_channel else z.numpy()
    want = -(g.numpy() * (codes - z_b))
    want = want.sum(axis=1) if per_channel else want.sum()
    np.testing.assert_allclose(q.scale.grad.numpy(), want, rtol=1e-12, atol=1e-12)


def test_quant_error_zero_point_gradient_is_exact():
    q = act_q(8, symmetric=False, init="minmax").to(torch.float64)
    x0 = torch.randn(8, 16, generator=gen(13), dtype=torch.float64)
    q(x0)  # minmax on x0: every element of x0 is inside the range
    x = x0 * 1.2  # a few elements beyond it
    q.quant_error(x).sum().backward()
    s, z = q.qparams()
    # exact a.e.: dΔ/dz = -dx̂/dz = +s where clamped, 0 inside; the oracle's gz = Σ dx̂/dz = -s·#clamped
    _, _, gz = ref_lsq_grads(x, s, z, *q.qrange, None, np.ones(x.shape), 1.0)
    assert 0 < -float(gz) < float(s) * x.numel() / 2
    assert float(q.zero_point.grad) == pytest.approx(-float(gz), rel=1e-12)


# ---- power-of-two scales --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: weight_q(4, per_channel=True, channels=5, power_of_two=True), (5, 3, 2, 2)),
        (lambda: act_q(8, symmetric=False, power_of_two=True), (4, 6, 5)),
        (lambda: act_q(4, symmetric=True, signed=False, power_of_two=True), (4, 6, 5)),
    ],
    ids=["weight-per-channel", "act-asym", "act-unsigned"],
)
def test_power_of_two_scale_values_and_straight_through_gradient(make, shape):
    """The scale in use is 2^round(log2 |s|) of the raw parameter: the forward is fake quantization at that scale
    (float64 oracle), and the raw scale's gradient is LSQ's at that scale times d2^round(log2 s)/ds taken straight
    through the rounding, 2^round(log2 s) / s."""
    q = make().to(torch.float64)
    x0 = torch.randn(shape, generator=gen(21), dtype=torch.float64)
    q(x0)  # initialise: a power of two
    s0, _ = q.qparams()
    assert torch.equal(s0, q.scale.abs()) and np.all(np.frexp(s0.numpy())[0] == 0.5)
    with torch.no_grad():
        q.scale.mul_(0.8)  # between powers of two, rounding (in log2) back to the same one: 0.8 > 2^-0.5
    assert torch.equal(q.qparams()[0], s0)
    x = (x0 * 1.7).requires_grad_(True)  # some values clamp
    g = torch.randn(shape, generator=gen(22), dtype=torch.float64)
    y = q(x)
    y.backward(g)
    s, z = q.qparams()
    qmin, qmax = q.qrange
    assert np.array_equal(y.detach().numpy(), ref_fake_quantize(x, s, z, qmin, qmax, q.axis))
    n = x.numel() // s.numel() if q.kind == "weight" else x.numel() // x.shape[0]
    gx, gs, _ = ref_lsq_grads(x, s, z, qmin, qmax, q.axis, g, 1.0 / math.sqrt(n * qmax))
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(q.scale.grad.numpy(), gs * (s / q.scale.detach()).numpy(), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        q.scale.mul_(0.8)  # 0.64 < 2^-0.5: the next power of two down
    assert torch.equal(q.qparams()[0], s0 / 2)


def test_power_of_two_calibration_and_repr():
    q = act_q(8, symmetric=False, power_of_two=True)
    q.start_observing()
    for seed in range(3):
        q(torch.randn(16, 10, generator=gen(seed)) * 3 + 1)
    q.finish_observing()
    s, z = q.qparams()
    assert np.frexp(s.item())[0] == 0.5 and float(z) == round(float(z))
    assert "power-of-two" in repr(q) and "power-of-two" not in repr(act_q(8))


def test_power_of_two_set_bits_keeps_the_range_representable():
    """Lowering the bit-width of a power-of-two quantizer: the new scale is the power of two at or above the one
    that keeps the range, so the old range stays representable (8 → 4 bits: 127/7 · s → 32 s, not 16 s)."""
    q = weight_q(8, per_channel=False, power_of_two=True)
    q(torch.randn(6, 5, generator=gen(30)))
    s8 = q.qparams()[0]
    q.set_bits(4)
    assert torch.equal(q.qparams()[0], s8 * 32) and q.qparams()[0] * 7 >= s8 * 127


def test_a_unit_range_quantizer_is_fixed_at_2_to_the_minus_bits():
    """QuantSpec.unit_range (a softmax of integers): s = 2^-bits, z = 0 from the start, whatever calibration sees,
    not learned, following the bit-width; x̂ = round(x·2^bits)/2^bits clamped to [0, 1 - 2^-bits]."""
    q = FakeQuantizer(QuantSpec(bits=8, symmetric=True, signed=False, unit_range=True), kind="act")
    assert bool(q.initialized) and q.scale.item() == 2.0**-8 and q.zero_point.item() == 0 and not q.scale.requires_grad
    q.start_observing()
    q(torch.rand(100) * 5)
    q.finish_observing()
    assert q.scale.item() == 2.0**-8
    x = torch.tensor([0.0, 0.3, 0.5 + 2.0**-10, 0.999, 1.0], dtype=torch.float64)
    expected = np.clip(np.rint(x.numpy() * 256), 0, 255) / 256
    np.testing.assert_array_equal(q(x.float()).double().numpy(), expected)
    q.set_bits(4)
    assert q.scale.item() == 2.0**-4 and q.qrange == (0, 15)
    with pytest.raises(Exception, match="unit_range"):
        QuantSpec(bits=8, symmetric=True, signed=True, unit_range=True)


def test_a_zero_dim_activation_is_quantized_and_a_non_finite_range_is_refused():
    """A 0-d activation (a scalar loss term, a temperature) raised a bare IndexError; a range set from NaN or Inf made
    every later output NaN without a word."""
    act = FakeQuantizer(QuantSpec(bits=8, init="minmax"), kind="act")
    act(torch.tensor([0.5, -0.2]))  # (its range from this first tensor)
    s, z = act.qparams()
    x = torch.tensor(0.33, requires_grad=True)
    y = act(x)
    assert y.shape == () and y.item() == pytest.approx(((torch.round(0.33 / s) + z - z) * s).item(), abs=0)
    y.backward()
    assert x.grad.item() == 1.0
    for bad in (float("nan"), float("inf")):
        fresh = FakeQuantizer(QuantSpec(bits=8, init="minmax"), kind="act")
        with pytest.raises(DataError, match=r"^the act range of a quantizer would be set from a tensor of shape "
                                            r"\(3,\) holding NaN or Inf; allowed: finite values\. Fix: "):
            fresh(torch.tensor([0.5, bad, 1.0]))
        assert not bool(fresh.initialized)
    weights = torch.nn.Linear(4, 2)
    with torch.no_grad():
        weights.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"^the weight range of a quantizer would be set from a tensor of shape "
                                        r"\(2, 4\)"):
        qatkit.prepare(torch.nn.Sequential(weights), qatkit.QATConfig(), torch.randn(2, 4))
