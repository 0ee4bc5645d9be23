"""qatkit.export.integer_reference: the integer-only reference executor against ONNX Runtime, bit for bit, and its
fixed-point (gemmlowp / TFLite) requantization against the float32 (ORT) one.

Every zoo model is built with a fixed seed, quantized W8A8 (ResNet-20 also W4A4), calibrated on random data and exported twice (plain, and
with debug_outputs=True so that every integer tensor is a graph output). ORT runs with one thread; numpy's BLAS too.
"""
from __future__ import annotations

import collections
import contextlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import torch  # noqa: E402
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

import qatkit  # noqa: E402
from qatkit.errors import ConfigError, ModelFileError  # noqa: E402
from qatkit.export import export_onnx  # noqa: E402
from qatkit.export import ort as qort  # noqa: E402
from qatkit.export.integer_reference import (  # noqa: E402
    IntegerReference,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide_by_pot,
    srdhm,
)
from qatkit.export.ort_numerics import stored_weights, weight_zero_point  # noqa: E402
from qatkit.models import build_model  # noqa: E402

SPECS = {"seed-mlp": (1, 8), "small-cnn": (3, 32), "resnet20": (3, 32), "resnet18": (3, 16), "mobilenetv2": (3, 16),
         "tiny-transformer": (3, 32)}  # (in_channels, image_size)
INTEGER_MODELS = ["seed-mlp", "small-cnn", "resnet20", "resnet18", "mobilenetv2"]
ORT_FUSED = {"QLinearConv", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearMatMul", "MatMulIntegerToFloat"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread and one BLAS thread: on 2 cores, spinning BLAS workers make timings erratic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1)
    except ImportError:  # threadpoolctl comes with scikit-learn; without it only the timing suffers
        limits = contextlib.nullcontext()
    with limits:
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(name, bits, power_of_two, exact_multipliers, exact_adds) -> (plain .onnx, debug .onnx, (channels, size)); each
    model is built and exported on first use."""
    root, cache = tmp_path_factory.mktemp("integer_reference"), {}

    def get(name: str, bits: int = 8, power_of_two: bool = False, exact_multipliers: bool = False,
            exact_adds: bool = False):
        key = name, bits, power_of_two, exact_multipliers, exact_adds
        if key not in cache:
            c, s = SPECS[name]
            torch.manual_seed(0)
            x = torch.randn(4, c, s, s)
            qat = qatkit.prepare(build_model(name, num_classes=10, in_channels=c, image_size=s),
                                 qatkit.QATConfig(weight_bits=bits, act_bits=bits, power_of_two_scales=power_of_two,
                                                  exact_multipliers=exact_multipliers, exact_adds=exact_adds), x)
            qatkit.calibrate(qat, [x])
            qat.eval()
            stem = "-".join([name, str(bits)] + [f for f, on in (("po2", power_of_two), ("exact", exact_multipliers),
                                                                   ("adds", exact_adds)) if on])
            plain, debug = root / f"{stem}.onnx", root / f"{stem}_debug.onnx"
            export_onnx(qat, plain, x[:1])
            export_onnx(qat, debug, x[:1], debug_outputs=True)
            cache[key] = plain, debug, (c, s)
        return cache[key]

    return get


def _inputs(c: int, s: int, n: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, c, s, s)


def _ort_outputs(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    sess = qort.session(path, threads=1)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x.numpy()})))


def _ort_fused_kernels(path, tmp_path) -> collections.Counter:
    """The integer kernels in ORT's optimized graph (ORT_ENABLE_ALL, one thread)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node if n.op_type in ORT_FUSED)


def _ref_fused_kernels(ref: IntegerReference) -> collections.Counter:
    ort_name = {"Conv": "QLinearConv", "Gemm": "QGemm", "Add": "QLinearAdd", "GlobalAveragePool": "QLinearGlobalAveragePool"}
    return collections.Counter(ort_name.get(f.kind) or ("QLinearMatMul" if f.y is not None else "MatMulIntegerToFloat")
                               for f in ref.fused.values())


def _debug_map(debug_path) -> dict[str, str]:
    """tensor name -> its 'debug/<node>' graph output."""
    return {n.input[0]: n.output[0] for n in onnx.load(str(debug_path)).graph.node
            if n.op_type == "Identity" and n.output[0].startswith("debug/")}


# ------------------------------------------------------------------------------------- float32 mode == ORT
@pytest.mark.parametrize("name,bits", [(name, 8) for name in INTEGER_MODELS] + [("resnet20", 4)])
def test_float32_mode_equals_onnxruntime(name, bits, zoo, tmp_path):
    plain, debug, (c, s) = zoo(name, bits)
    x = _inputs(c, s, n=64 if name == "seed-mlp" else 8)
    ref = IntegerReference(plain, requant="float32")
    assert _ref_fused_kernels(ref) == _ort_fused_kernels(plain, tmp_path)  # fuses exactly what ORT fuses
    theirs, mine = qort.run(qort.session(plain, threads=1), x), ref.run(x.numpy())
    assert mine.dtype == theirs.dtype == np.float32 and np.array_equal(mine, theirs)

    outs, ref_debug = _ort_outputs(debug, x), IntegerReference(debug)
    mine_all = ref_debug.run_outputs(x.numpy())
    for key, value in outs.items():  # every integer tensor of the model ("debug/<node>") and the output
        assert mine_all[key].dtype == value.dtype and np.array_equal(mine_all[key], value), key
    codes, debug_of = ref_debug.run_codes(x.numpy()), _debug_map(debug)
    checked = [k for k in codes if k in debug_of]  # the kernels' own codes (at 4 bits the debug outputs follow a Clip)
    fused_outputs = len([f for f in ref.fused.values() if f.y is not None])
    assert len(checked) >= fused_outputs if bits == 8 else len(outs) - 1 >= fused_outputs
    for k in checked:
        assert np.array_equal(codes[k], outs[debug_of[k]]), k


def test_tiny_transformer_integer_kernels_exact_float_islands_close(zoo, tmp_path):
    """Float islands (LayerNorm, softmax, GELU's erf, ReduceMean) run in float32 numpy, and ORT's MLAS kernels can
    round them differently in the last bit. So: every integer kernel (10 QGemm, 4 QLinearMatMul: attention's Q·Kᵀ
    and weights·V) is exact when fed ORT's own input codes; a Q after a float island differs by at most one
    step on at most 1 code in 10^3 (measured: about 1 in 10^6); and end to end, the integer layers before the first island are exact while the
    output agrees exactly on most values and within one output step on all."""
    plain, debug, (c, s) = zoo("tiny-transformer")
    x = _inputs(c, s, n=32)
    ref = IntegerReference(debug)
    assert _ref_fused_kernels(ref) == _ort_fused_kernels(debug, tmp_path) == {"QGemm": 10, "QLinearMatMul": 4}
    outs, debug_of = _ort_outputs(debug, x), _debug_map(debug)
    force = {k: outs[v] for k, v in debug_of.items()}
    codes = ref.run_codes(x.numpy(), force=force)  # each value computed from ORT's inputs
    kernel_outs = {f.out for f in ref.fused.values() if f.y is not None}
    unflat = {n.input[0]: n.output[0] for n in onnx.load(str(debug)).graph.node if n.op_type == "Reshape"}
    assert len(kernel_outs) == 14
    for k in kernel_outs:  # a linear layer on (N, T, D) is Reshape -> Gemm -> Q -> Reshape: ORT shows the last
        theirs = force[k] if k in force else force[unflat[k]].reshape(codes[k].shape)
        assert np.array_equal(codes[k], theirs), k
    islands = [k for k in codes if k in force and k not in kernel_outs]
    diff = np.concatenate([np.abs(codes[k].astype(int) - force[k].astype(int)).ravel() for k in islands])
    print(f"\ntiny-transformer float islands, on ORT's inputs: {np.mean(diff == 0):.6f} of {diff.size} codes equal, "
          f"max {diff.max()} step")
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.999

    mine = ref.run_outputs(x.numpy())  # end to end
    for key in ("debug/quant_reshape_1", "debug/embed"):  # before the first float island
        assert np.array_equal(mine[key], outs[key]), key
    ref_plain, theirs = IntegerReference(plain), qort.run(qort.session(plain, threads=1), x)
    out = ref_plain.run(x.numpy())
    steps = np.abs(out.astype(np.float64) - theirs) / float(ref_plain.consts[_last_dq_scale(plain)])
    print(f"tiny-transformer end to end: {np.mean(out == theirs):.4f} of {out.size} outputs equal, max {steps.max():.3f} step")
    assert np.mean(out == theirs) >= 0.98 and steps.max() <= 1.001


def _last_dq_scale(path) -> str:
    nodes = {n.output[0]: n for n in onnx.load(str(path)).graph.node}
    return nodes[nodes["output"].input[0]].input[1]  # output = Identity(DequantizeLinear(codes, scale, zp))


# ------------------------------------------------------------------------------------- fixed-point mode
@pytest.mark.parametrize("mode", ["fixed-point", "fixed-point-gemmlowp"])
def test_fixed_point_against_float32_mode_resnet20(zoo, mode):
    """Fixed-point requantization (M = M0·2^-(31+n)) against ORT's float32 multiplier, per kernel on the same input
    codes. Single rounding: ≥ 99.99% equal, the rest one step. gemmlowp's double rounding (SRDHM, then RDBP by 2^n)
    lands one step off on about 2^-(n+1) of the outputs (n = 7..10 for these convs): ≥ 99.8%. End to end, in this
    untrained network, one-step flips propagate and grow; measured and printed, with the top-1 class kept."""
    plain, _, (c, s) = zoo("resnet20")
    r32, rfx = IntegerReference(plain, "float32"), IntegerReference(plain, mode)
    kind_of = {f.out: f.kind for f in rfx.fused.values()}
    out_name = rfx.q_outputs[-1]
    per_kernel, end_to_end, top1 = collections.defaultdict(list), [], []
    for seed in range(4):  # 256 images in batches of 64
        x = _inputs(c, s, n=64, seed=100 + seed).numpy()
        ref_codes = r32.run_codes(x)
        forced = rfx.run_codes(x, force=ref_codes)  # every kernel on float32 mode's input codes
        for k, v in forced.items():
            per_kernel[kind_of.get(k, "float")].append(np.abs(v.astype(int) - ref_codes[k].astype(int)).ravel())
        fixed_out, ref_out = rfx.run_codes(x)[out_name].astype(int), ref_codes[out_name].astype(int)
        end_to_end.append(np.abs(fixed_out - ref_out).ravel())
        top1.append(np.mean(fixed_out.argmax(1) == ref_out.argmax(1)))  # the logits' codes (uint8, scale > 0)
    per_kernel = {k: np.concatenate(v) for k, v in per_kernel.items()}
    allk, e2e = np.concatenate(list(per_kernel.values())), np.concatenate(end_to_end)
    print(f"\nresnet20 {mode} vs float32, per kernel on the same inputs: " + ", ".join(
        f"{k} {np.mean(d == 0):.6f} of {d.size}" for k, d in per_kernel.items()) + f"; all {np.mean(allk == 0):.6f}")
    print(f"end to end: {np.mean(e2e == 0):.4f} of {e2e.size} output codes equal, max {e2e.max()} steps, "
          f"top-1 agreement {np.mean(top1):.4f}")
    assert allk.max() <= 1 and e2e.size >= 2560 and np.mean(top1) >= 0.95
    if mode == "fixed-point":
        assert np.mean(allk == 0) >= 0.9999 and np.mean(e2e == 0) >= 0.9 and e2e.max() <= 2
    else:
        assert np.mean(allk == 0) >= 0.998 and np.mean(per_kernel["Add"] == 0) >= 0.9999
        assert np.mean(e2e == 0) >= 0.5 and e2e.max() <= 2


def test_fixed_point_requantizes_the_skip_path_in_integers(zoo):
    """At W4A4 each block's 4-bit conv input is read off the 8-bit skip path (DQ -> Q, which ORT runs in float32):
    fixed point computes it as one integer requantization, y = MBQM(q - z, s_x / s_y) + z_y. Per kernel on
    float32 mode's input codes: ≥ 99.99% equal, the rest one step."""
    plain, _, (c, s) = zoo("resnet20", 4)
    r32, rfx = IntegerReference(plain, "float32"), IntegerReference(plain, "fixed-point")
    requant = [f.out for f in rfx.fused.values() if f.kind == "Requantize"]
    assert len(requant) == 7 and not any(f.kind == "Requantize" for f in r32.fused.values())
    x = _inputs(c, s, n=64, seed=7).numpy()
    ref = r32.run_codes(x)
    forced = rfx.run_codes(x, force=ref)
    diff = np.concatenate([np.abs(forced[k].astype(int) - ref[k].astype(int)).ravel() for k in requant])
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.9999, np.mean(diff == 0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["seed-mlp", "small-cnn", "resnet20", "resnet18"])
def test_power_of_two_scales_make_fixed_point_equal_onnxruntime(name, bits, zoo):
    """With every scale a power of two, every multiplier is 2^-n: ORT's float32 product acc·M is exact, so the
    fixed-point mode (one rounding of the exact product, half to even) computes ORT's outputs bit for bit, end to end.
    (The default, free scales: ≥ 99.99 % per kernel, end to end less: test_fixed_point_against_float32_mode_resnet20.)
    """
    plain, _, (c, s) = zoo(name, bits, power_of_two=True)
    ref = IntegerReference(plain)
    qdq = ("QuantizeLinear", "DequantizeLinear")
    scales = [ref.consts[n.input[1]] for n in ref.model.graph.node if n.op_type in qdq]
    assert len(scales) > 4 and all(np.all(np.frexp(v)[0] == 0.5) for v in scales)  # every scale 2^k
    x = _inputs(c, s, n=64, seed=5)
    theirs = qort.run(qort.session(plain, threads=1), x)
    fixed = IntegerReference(plain, "fixed-point").run(x.numpy())
    assert np.array_equal(fixed, theirs), np.mean(fixed == theirs)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["seed-mlp", "small-cnn", "resnet20", "mobilenetv2"])
def test_exact_multipliers_make_fixed_point_conv_gemm_equal_onnxruntime(name, bits, zoo):
    """With exact multipliers (free scales; each weight scale nudged so that the conv/gemm multiplier is a multiple
    of 2^-(24-b)) ORT equals float32 mode, and every conv/gemm kernel of the fixed-point mode computes ORT's integers
    on equal inputs. What else the models hold (adds, pools, requantized skip paths) keeps its own rounding."""
    plain, _, (c, s) = zoo(name, bits, exact_multipliers=True)
    ref, fixed = IntegerReference(plain), IntegerReference(plain, "fixed-point")
    layers = [f for f in ref.fused.values() if f.kind in ("Conv", "Gemm") and f.y is not None]
    assert len(layers) >= 2
    for f in layers:  # the deployed multipliers lie on the grid: 2^-16 for 8-bit outputs, 2^-20 for 4-bit ones
        on_grid = np.remainder(np.asarray(f.mult, np.float64), 2.0 ** -(24 - bits)) == 0
        assert np.mean(on_grid) >= 0.98, f.node.name
    x = _inputs(c, s, n=64, seed=5)
    theirs = qort.run(qort.session(plain, threads=1), x)
    assert np.array_equal(ref.run(x.numpy()), theirs)
    codes = ref.run_codes(x.numpy())
    kinds = {f.out: f.kind for f in fixed.fused.values()}
    compared = 0
    for out, v in fixed.run_codes(x.numpy(), force=codes).items():
        if kinds.get(out) in ("Conv", "Gemm") and out in codes:
            assert np.array_equal(v, codes[out]), out
            compared += v.size
    assert compared >= 500


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", INTEGER_MODELS)
def test_exact_multipliers_and_adds_make_fixed_point_equal_onnxruntime_end_to_end(name, bits, zoo):
    """exact_adds gives each residual add and global pool one quantizer for its inputs and output (rescale factors
    exactly 1); with exact multipliers every kernel requantizes exactly: ORT = float32 mode = fixed-point mode, bit for
    bit, end to end and on every fused kernel. (Without exact_adds the adds keep their own rounding: on a ResNet-20
    W8A8 calibrated on 16 images, 31 of 5.5 M add outputs differed and 0.85 of the output values were equal.)"""
    plain, _, (c, s) = zoo(name, bits, exact_multipliers=True, exact_adds=True)
    x = _inputs(c, s, n=64, seed=5).numpy()
    ref, fixed = IntegerReference(plain), IntegerReference(plain, "fixed-point")
    theirs = qort.run(qort.session(plain, threads=1), torch.from_numpy(x))
    assert np.array_equal(ref.run(x), theirs)
    assert np.array_equal(fixed.run(x), theirs)
    codes = ref.run_codes(x)
    kinds = {f.out: f.kind for f in fixed.fused.values()}
    compared = collections.Counter()
    for out, v in fixed.run_codes(x, force=codes).items():
        if out in codes and out in kinds:
            assert np.array_equal(v, codes[out]), (kinds[out], out)
            compared[kinds[out]] += v.size
    assert compared["Gemm"] > 0 and (name == "seed-mlp" or compared["Conv"] > 0 and compared["GlobalAveragePool"] > 0)
    assert compared["Add"] > 0 or name in ("seed-mlp", "small-cnn")


def test_power_of_two_scales_adds_with_a_zero_point_differ_only_at_ties(zoo):
    """MobileNetV2's residual adds have no ReLU, so their outputs are asymmetric (z_y != 0). ORT's QLinearAdd rounds
    v + z_y, integer hardware (TFLite, the fixed-point mode) rounds v and then adds z_y: half to even, the two differ
    where v is a tie and z_y is odd — with power-of-two scales, often (v = (q_a - z_a)/2 + ...). Every other kernel is
    equal; per kernel on float32 mode's input codes."""
    plain, _, (c, s) = zoo("mobilenetv2", 8, power_of_two=True)
    r32, rfx = IntegerReference(plain, "float32"), IntegerReference(plain, "fixed-point")
    x = _inputs(c, s, n=32, seed=6).numpy()
    ref = r32.run_codes(x)
    forced = rfx.run_codes(x, force=ref)
    differing_adds = 0
    for f in rfx.fused.values():
        got, want = forced[f.out].astype(int), ref[f.out].astype(int)
        if f.kind != "Add":
            assert np.array_equal(got, want), f.kind
            continue
        (a, s_a, z_a), (b, s_b, z_b), (s_y, z_y) = *f.xs, f.y
        v = (ref[a] - np.float64(z_a)) * (np.float64(s_a) / s_y) + (ref[b] - np.float64(z_b)) * (np.float64(s_b) / s_y)
        off = got != want
        assert np.all(np.abs(got - want) <= 1) and np.all(np.abs(v[off] % 1 - 0.5) == 0) and (not off.any() or z_y % 2)
        differing_adds += bool(off.any())
    assert differing_adds > 0  # the case this test is about occurs in this model


def test_quantize_multiplier_against_float64():
    rng = np.random.default_rng(0)
    m = np.concatenate([10.0 ** rng.uniform(-9, 0, 20000), 2.0 ** -np.arange(1, 40), [1 - 2**-40, 0.5 - 2**-45]])
    m0, n = quantize_multiplier(m)
    assert np.all((m0 >= 2**30) & (m0 < 2**31)) and np.all(n[m < 1 - 2**-32] >= 0)
    approx = m0.astype(np.float64) * 2.0 ** (-31 - n.astype(np.float64))
    assert np.all(np.abs(approx - m) <= 2.0 ** (-32 - n.astype(np.float64)))  # half a Q31 step of the fraction
    assert np.all(np.abs(approx / m - 1) <= 2.0**-31)
    assert [tuple(map(int, quantize_multiplier(v))) for v in (0.5, 0.25, 0.75, 1 - 2**-40, 3.0)] == \
        [(2**30, 0), (2**30, 1), (3 * 2**29, 0), (2**30, -1), (3 * 2**29, -2)]  # 1 - 2^-40 rounds up: the carry
    with pytest.raises(ConfigError):
        quantize_multiplier([0.5, 0.0])


def test_srdhm_and_rounding_divide_by_pot():
    i32min, i32max = -(2**31), 2**31 - 1
    cases = {(2**30, 2**30): 2**29, (5, 2**30): 3, (-5, 2**30): -2, (3, 2**30): 2, (-3, 2**30): -1,
             (7, 2**29): 2, (-7, 2**29): -2, (i32min, i32min): i32max, (i32min, 2**30): -(2**30),
             (i32max, i32max): 2**31 - 2, (0, i32min): 0, (1, 2**30): 1, (-1, 2**30): 0}  # ties round up
    for (a, b), want in cases.items():
        assert int(srdhm(a, b)) == want, (a, b)
    for (x, e), want in {(5, 1): 3, (-5, 1): -3, (6, 2): 2, (-6, 2): -2, (7, 2): 2, (-7, 2): -2, (10, 2): 3,
                         (-10, 2): -3, (9, 2): 2, (-9, 2): -2, (4, 2): 1, (-4, 2): -1, (123, 0): 123, (-123, 0): -123,
                         (i32max, 31): 1, (i32min, 31): -1, (2**30 - 1, 31): 0}.items():  # ties away from zero
        assert int(rounding_divide_by_pot(x, e)) == want, (x, e)
    rng = np.random.default_rng(1)
    a, b = rng.integers(i32min, i32max, 20000, endpoint=True), rng.integers(i32min, i32max, 20000, endpoint=True)
    e = rng.integers(0, 32, 20000)
    want = [i32max if (u == v == i32min) else (int(u) * int(v) + 2**30) >> 31 for u, v in zip(a, b)]  # floor(ab/2^31 + 1/2)
    assert srdhm(a, b).tolist() == want
    want = [int(v) if k == 0 else (1 if v >= 0 else -1) * ((abs(int(v)) + 2 ** (int(k) - 1)) >> int(k)) for v, k in zip(a, e)]
    assert rounding_divide_by_pot(a, e).tolist() == want
    x = rng.integers(-(2**20), 2**20, 20000)
    m = 10.0 ** rng.uniform(-6, 0.5, 20000)  # multipliers up to ~3 use the left shift
    got = multiply_by_quantized_multiplier(x, *quantize_multiplier(m))
    assert np.all(np.abs(got - x * m) <= 1.0)  # two roundings: within one of the exact product


# ------------------------------------------------------------------------------------- fusion rules, errors
def _conv_graph(act: str, z_y: int, s_y: float, clip=(0.0, 6.0)) -> onnx.ModelProto:
    w = stored_weights(np.random.default_rng(2).integers(-127, 128, (4, 3, 3, 3)))  # as qatkit's export stores them
    inits = {"sx": np.float32(0.02), "zx": np.uint8(100), "w": w, "sw": np.full(4, 0.01, np.float32),
             "zw": weight_zero_point(w, 4), "b": np.arange(4, dtype=np.int32) * 50,
             "sb": np.full(4, 0.0002, np.float32), "zb": np.zeros(4, np.int32), "sy": np.float32(s_y), "zy": np.uint8(z_y)}
    if act == "Clip":
        inits.update(lo=np.float32(clip[0]), hi=np.float32(clip[1]))
    nodes = [oh.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xd"]),
             oh.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             oh.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], axis=0),
             oh.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node(act, ["c"] + (["lo", "hi"] if act == "Clip" else []), ["r"]),
             oh.make_node("QuantizeLinear", ["r", "sy", "zy"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.UINT8, [None, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.UINT8, [None, 4, 8, 8])],
                          [nh.from_array(np.asarray(v), k) for k, v in inits.items()])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize("act, z_y, s_y, fused_by_ort", [("Relu", 0, 0.05, True), ("Relu", 10, 0.05, False),
                                                         ("Clip", 0, 0.02, True), ("Clip", 0, 0.05, False)])
def test_relu_clip_fused_only_where_ort_drops_them(act, z_y, s_y, fused_by_ort, tmp_path):
    """Relu before Q goes only with z_y = 0; Clip(0, 6) only when the Q range [0, 255 s_y] lies within it. Where ORT
    keeps it, float32 mode runs the pattern in float as ORT does; fixed-point mode always folds it into the clamp."""
    path = tmp_path / "conv.onnx"
    onnx.save(_conv_graph(act, z_y, s_y), str(path))
    assert (_ort_fused_kernels(path, tmp_path)["QLinearConv"] == 1) == fused_by_ort
    r32, rfx = IntegerReference(path), IntegerReference(path, "fixed-point")
    assert len(r32.fused) == int(fused_by_ort) and len(rfx.fused) == 1
    x = np.random.default_rng(3).integers(0, 256, (16, 3, 8, 8)).astype(np.uint8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs, mine, fixed = sess.run(None, {"x": x})[0], r32.run(x), rfx.run(x)
    diff = np.abs(mine.astype(int) - theirs)
    assert (diff.max() == 0) if fused_by_ort else (diff.max() <= 1 and np.mean(diff == 0) > 0.99)  # float conv: MLAS
    assert np.abs(fixed.astype(int) - theirs).max() <= 1
    assert fixed.min() >= z_y and (act == "Relu" or fixed.max() <= round(6 / s_y))


def test_errors_name_the_problem(tmp_path):
    graph = oh.make_graph([oh.make_node("Hardmax", ["x"], ["y"], name="onehot")], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [2])], [oh.make_tensor_value_info("y", TP.FLOAT, [2])])
    with pytest.raises(ModelFileError, match="Hardmax.*onehot|onehot.*Hardmax"):
        IntegerReference(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    with pytest.raises(ConfigError, match="requant"):
        IntegerReference(oh.make_model(graph), requant="int8")


def test_single_rounding_is_half_to_even_on_the_exact_product():
    x = np.array([5, 7, -5, -7, 3, -3, 1, -1, 6, 2**30 + 1])
    # M0 = 2^30, n = 0: multiply by exactly 0.5; ties go to the even neighbour, as rint does
    assert multiply_by_quantized_multiplier(x, 2**30, 0).tolist() == np.rint(x / 2).astype(np.int64).tolist()
    m0, n = quantize_multiplier(np.float32(0.3))
    acc = np.arange(-(2**20), 2**20, 7)
    exact = acc.astype(object) * int(m0) / 2 ** (31 + int(n))  # rational, via Python ints/floats of small size
    assert np.all(np.abs(multiply_by_quantized_multiplier(acc, m0, n) - np.array(exact, dtype=np.float64)) <= 0.5)
