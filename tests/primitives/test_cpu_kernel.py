"""The fused CPU fake-quant kernel against the eager formulas and the float64 references.

Forward outputs and input gradients must be the eager ones bit for bit (same IEEE operations); the
scale/zero-point gradients are checked against float64 sums, and must not depend on the thread count.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qatkit.primitives import cpu_kernel, fake_quantize
from qatkit.primitives.fake_quant import ABS, POWER_OF_TWO, _backward, _forward
from qatkit.primitives.qparams import power_of_two_nearest
from qatkit.primitives.reference import ref_fake_quantize

pytestmark = pytest.mark.skipif(cpu_kernel.load() is None, reason="no C compiler: the eager path is what runs")

SIZES = [1, 17, 4095, 4096, 4097, 70_001, 300_000]  # block edges, and above the threading threshold
RANGES = [(0, 255, 0.0), (0, 15, 3.0), (-128, 127, 0.0), (-2, 1, 0.0), (-8, 7, -3.0)]


def _data(n: int, s: float, seed: int = 0) -> torch.Tensor:
    """Values over and beyond the range, with exact .5 ties (k + 0.5)·s for a power-of-two s mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 200 * s
    ties = (torch.randint(-300, 300, (n,), generator=g) + 0.5) * s
    return torch.where(torch.rand(n, generator=g) < 0.2, ties, x).float()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("qmin,qmax,z", RANGES)
@pytest.mark.parametrize("s", [0.25, 0.0371])
def test_forward_bitexact(n, qmin, qmax, z, s):
    x = _data(n, s)
    got = cpu_kernel.forward(x, torch.tensor(s), torch.tensor(z), qmin, qmax)
    st, zt = torch.tensor(s), torch.tensor(z)
    assert torch.equal(got, _forward(x, st, zt, qmin, qmax))
    want = ref_fake_quantize(x.numpy(), np.float32(s), z, qmin, qmax, dtype=np.float32).astype(np.float32)
    assert torch.equal(got, torch.from_numpy(want))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("qmin,qmax,z", RANGES)
def test_backward_matches_eager_and_float64(n, qmin, qmax, z):
    s = 0.0371
    x, grad = _data(n, s), torch.randn(n, generator=torch.Generator().manual_seed(1))
    grad_x, grad_s, grad_z = cpu_kernel.backward(x, grad, torch.tensor(s), torch.tensor(z), qmin, qmax)
    sum_s, sum_clamped = grad_s.item(), grad_z.item() / -np.float32(s)
    eager_x, _, _ = _backward(x, grad, torch.tensor(s), torch.tensor(z), qmin, qmax, (0,))
    assert torch.equal(grad_x, eager_x)
    # the per-value terms as float32 arithmetic gives them, summed in float64
    xs = x / np.float32(s)
    codes = torch.clamp(torch.round(xs) + z, qmin, qmax)
    inside = codes == torch.round(xs) + z
    ref_s = (grad.double() * torch.where(inside, codes - z - xs, codes - z).double()).sum().item()
    ref_clamped = torch.where(inside, 0.0, grad.double()).sum().item()
    bound = 1e-6 * grad.abs().sum().item() * (qmax - qmin + 1)
    assert abs(sum_s - ref_s) <= bound and abs(sum_clamped - ref_clamped) <= bound


def test_sums_do_not_depend_on_thread_count():
    x, grad = _data(300_000, 0.0371), torch.randn(300_000)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(cpu_kernel.backward(x, grad, torch.tensor(0.0371), torch.tensor(3.0), 0, 15))
    finally:
        torch.set_num_threads(before)
    for grad_x, grad_s, grad_z in results[1:]:
        assert torch.equal(grad_x, results[0][0])
        assert torch.equal(grad_s, results[0][1]) and torch.equal(grad_z, results[0][2])



@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n", [13, 4097, 70_001])
def test_vector_and_portable_backward_are_the_same(monkeypatch, n, relu):
    """The AVX-512 and AVX2 backward (where the CPU has them) and the portable code: the same bits, sums included
    (same lanes), with ties, values beyond the range, NaN and ±0 among the inputs; per tensor and per channel."""
    x, grad = _data(n, 0.0371, seed=3), torch.randn(n)
    x[:6] = torch.tensor([float("nan"), 0.0, -0.0, 1e30, -1e30, 0.5 * 0.0371])
    for s, z in [(torch.tensor(0.0371), torch.tensor(3.0)), (torch.tensor([0.0371, 0.25]), torch.tensor([3.0, -2.0]))]:
        k = n - n % s.numel()  # per channel: the channels split x evenly
        results = []
        for vector in (2, 1, 0):
            monkeypatch.setattr(cpu_kernel, "VECTOR", vector)
            results.append(cpu_kernel.backward(x[:k], grad[:k], s, z, -8, 7, relu=relu))
        for vector in results[:2]:
            for a, b in zip(vector, results[2]):
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "expanded", "step-view", "expanded-1d",
                                    "channels_last-sum"])
def test_fake_quantize_layouts_match_eager(layout):
    """fake_quantize sees any layout as one flat run (or a copy): the result keeps a dense input's layout,
    and output and gradients equal the eager formulas applied to the tensor as it is. A flat view that steps over
    memory (x[:, ::2] of one row: the kernel quantized the neighbours) or stands still (a 1-element tensor
    expanded; a channels-last x's gradient from .sum(): scale gradients of 1e28) is copied first."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, 5, 7, generator=g)
    x = {"contiguous": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
         "strided": base[:, ::2, :, 1:], "expanded": base[:1].expand(4, 6, 5, 7),
         "step-view": base.view(1, -1)[:, ::2], "expanded-1d": base.view(-1)[:1].expand(6),
         "channels_last-sum": base.contiguous(memory_format=torch.channels_last)}[layout].detach().requires_grad_()
    s, z = torch.tensor(0.07, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    out = fake_quantize(x, s, z, 0, 15, None, 0.5)
    if layout in ("contiguous", "channels_last", "channels_last-sum"):
        assert out.stride() == x.stride()
    upstream = torch.ones(()).expand(out.shape) if layout.endswith("-sum") else torch.randn(out.shape, generator=g)
    got_x, got_s, got_z = torch.autograd.grad(out, (x, s, z), upstream)
    sd, zd = s.detach(), z.detach()
    assert torch.equal(out, _forward(x.detach(), sd, zd, 0, 15))
    want_x, want_s, want_clamped = _backward(x.detach(), upstream, sd, zd, 0, 15, tuple(range(x.dim())))
    assert torch.equal(got_x, want_x)
    assert got_s.item() == pytest.approx(0.5 * want_s.item(), rel=1e-5)
    assert got_z.item() == pytest.approx(-0.5 * 0.07 * want_clamped.item(), rel=1e-5)


def test_no_compiler_falls_back_to_eager_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match=r"fused fake-quant CPU kernel unavailable .*Fix: install a C compiler"):
        assert cpu_kernel.load() is None
    assert cpu_kernel.load() is None  # tried once: no second warning (pytest's filter would turn one into an error)
    x = _data(1000, 0.25)
    out = fake_quantize(x, torch.tensor(0.25), torch.tensor(0.0), -128, 127)
    assert torch.equal(out, _forward(x, torch.tensor(0.25), torch.tensor(0.0), -128, 127))
    assert list(tmp_path.iterdir()) == []  # nothing half-written in the cache


def test_kernel_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setenv("QATKIT_KERNEL", "0")
    assert cpu_kernel.load() is None
    assert not cpu_kernel.usable(torch.zeros(3), torch.tensor(1.0), torch.tensor(0.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "axis1", "transposed-sum"])
def test_per_channel_matches_eager(layout):
    """Per-channel weights (axis 0 outermost in memory, also channels-last): bit-exact output and input gradient,
    per-channel sums against the eager ones; an axis that is not outermost takes the eager path. A transposed view
    quantized along its axis 1 (outermost in memory), its gradient from .sum(), had scale gradients of 1e29."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, 3, 3, generator=g)
    axis = 0
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    if layout == "axis1":
        axis = 1
    if layout == "transposed-sum":
        w, axis = w.transpose(0, 1), 1
    w.requires_grad_()
    channels = w.shape[axis]
    s = (torch.rand(channels, generator=g) * 0.05 + 0.01).requires_grad_()
    z = torch.zeros(channels)
    out = fake_quantize(w, s, z, -8, 7, axis, 0.25)
    upstream = torch.ones(()).expand(out.shape) if layout.endswith("-sum") else torch.randn(out.shape, generator=g)
    got_w, got_s = torch.autograd.grad(out, (w, s), upstream)
    sv, zv = (t.detach().view([-1 if d == axis else 1 for d in range(4)]) for t in (s, z))
    assert torch.equal(out, _forward(w.detach(), sv, zv, -8, 7))
    dims = tuple(d for d in range(4) if d != axis)
    want_w, want_s, _ = _backward(w.detach(), upstream, sv, zv, -8, 7, dims)
    assert torch.equal(got_w, want_w)
    torch.testing.assert_close(got_s, 0.25 * want_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_relu_equals_relu_then_fake_quant(layout):
    """fake_quantize(x, relu=True) on the kernel = relu then the eager fake quantization: same output bits, same
    input gradient (relu's mask included, NaN and ±0 too), same scale and zero-point gradients."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 9, 9, generator=g) * 0.3
    x[0, 0, 0, :4] = torch.tensor([0.0, -0.0, -0.01, float("nan")])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    s, z = torch.tensor(0.02, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    fused = fake_quantize(x, s, z, 0, 255, None, 0.5, relu=True)
    upstream = torch.randn(fused.shape, generator=g)
    got = torch.autograd.grad(fused, (x, s, z), upstream)
    xe, se, ze = (t.detach().clone().requires_grad_() for t in (x, s, z))
    r = torch.relu(xe)
    ref = _forward(r, se, ze, 0, 255)  # eager formulas, autograd through relu
    assert torch.equal(fused.nan_to_num(7.0), ref.detach().nan_to_num(7.0))
    want_x, want_s, want_clamped = _backward(r.detach(), upstream, se.detach(), ze.detach(), 0, 255, (0, 1, 2, 3))
    want_x = torch.where(xe.detach() > 0, want_x, 0.0)  # relu's own gradient
    assert torch.equal(got[0], want_x)
    torch.testing.assert_close(got[1], 0.5 * want_s, rtol=1e-5, atol=1e-6, equal_nan=True)  # NaN input: NaN on both
    torch.testing.assert_close(got[2], -0.5 * 0.02 * want_clamped, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("raw_s, raw_z", [(0.05, 2.3), (-0.05, 2.7), (0.0, 0.0), (1e-9, -1.2), (0.03, 300.0),
                                          (-0.2, 15.0), (0.7071067690849304 / 16, 3.0), (0.7071068286895752 / 16, 3.0)])
@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("map_scale", [ABS, POWER_OF_TWO], ids=["abs", "power-of-two"])
def test_learned_parameters_mapped_in_the_kernel_as_autograd_would(raw_s, raw_z, axis, map_scale):
    """fake_quantize(map_scale=ABS | POWER_OF_TWO, map_zero_point=True) maps the raw parameters (|s| floored at
    MIN_SCALE, to its nearest power of two with POWER_OF_TWO; z clamped and rounded) and applies their chain rule
    inside the kernel: output and every gradient equal those of the same mapping written as autograd ops before
    fake_quantize, bit for bit (also for a negative, zero or tiny scale, a zero point out of range, a scale either
    side of 2^-4.5, the float32 values next to it, where the power of two changes), per tensor and per channel."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 5, 4, generator=g) * 0.4).requires_grad_()
    shape = () if axis is None else (6,)
    scale = torch.full(shape, raw_s).requires_grad_()
    zp = torch.full(shape, raw_z).requires_grad_()
    out = fake_quantize(x, scale, zp, 0, 15, axis, 0.3, map_scale=map_scale, map_zero_point=True)
    upstream = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (x, scale, zp), upstream)
    s = torch.clamp(scale.abs(), min=1e-8)
    if map_scale == POWER_OF_TWO:  # straight through 2^round(log2 s): gradient 2^round(log2 s) / s
        pow2 = torch.exp2(torch.round(torch.log2(s.detach().double()))).float()
        assert torch.equal(pow2, power_of_two_nearest(s.detach()))
        s = pow2 + (s - s.detach()) * (pow2 / s.detach())
    zc = torch.clamp(zp, 0, 15)
    ref = fake_quantize(x, s, zc + (torch.round(zc) - zc).detach(), 0, 15, axis, 0.3)
    want = torch.autograd.grad(ref, (x, scale, zp), upstream)
    assert torch.equal(out, ref)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a, b)


# ---- the MSE range search's errors --------------------------------------------------------------
def _candidates(rows: torch.Tensor, grid: int, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    from qatkit.primitives.qparams import _candidates

    pairs = list(_candidates(rows.amin(1), rows.amax(1), qmin, qmax, qmin < 0, grid, False))
    return torch.stack([s for s, _ in pairs]), torch.stack([z for _, z in pairs])


@pytest.mark.parametrize("shape", [(1, 70_001), (12, 4097), (5, 13)])
@pytest.mark.parametrize("qmin,qmax", [(0, 255), (-8, 7), (-2, 1)])
def test_mse_errors_are_the_float32_errors_summed(shape, qmin, qmax):
    """Each value's error as the quantizer computes it (float32: IEEE division, round half to even), squared in
    float32; their mean per row and candidate within float64 rounding of the float64 sum of the same squares."""
    rows = torch.stack([_data(shape[1], 0.0371, seed) for seed in range(shape[0])])
    scales, zero_points = _candidates(rows, 16, qmin, qmax)
    got = cpu_kernel.mse_errors(rows, scales, zero_points, qmin, qmax)
    s, z = scales[:, :, None], zero_points[:, :, None]
    d = (torch.clamp(torch.round(rows / s) + z, qmin, qmax) - z) * s - rows  # float32, as eager PyTorch
    want = (d * d).double().mean(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_kernel.mse_errors(rows, scales, zero_points, qmin, qmax), got)  # any thread count
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False), (2, False)])
def test_mse_search_picks_with_the_kernel_what_it_picks_in_pytorch(monkeypatch, axis, bits, symmetric):
    from qatkit.primitives import qparams

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 3, 5, 5, generator=g) * (torch.rand(16, 1, 1, 1, generator=g) + 0.5)
    x = x if symmetric else torch.relu(x) + 0.05 * x
    qmin, qmax = (-(1 << bits - 1), (1 << bits - 1) - 1) if symmetric else (0, (1 << bits) - 1)
    fused = qparams.qparams_from_tensor(x, qmin, qmax, symmetric=symmetric, axis=axis)
    monkeypatch.setattr(cpu_kernel, "mse_errors", lambda *args: None)  # the PyTorch loop
    eager = qparams.qparams_from_tensor(x, qmin, qmax, symmetric=symmetric, axis=axis)
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])
