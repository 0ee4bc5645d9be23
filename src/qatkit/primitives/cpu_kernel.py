"""A fused CPU kernel for fake quantization of float32 tensors (per-tensor activations, per-channel weights), and
for the errors of the MSE range search's candidates (one pass per candidate and row, no temporaries).

Eager PyTorch spends a dozen element-wise passes (and their allocations) on one fake-quantized tensor in
forward and backward; this kernel does one vectorised pass each way on torch's thread count, optionally
with the ReLU before it fused in (relu(x) quantized, relu's gradient mask applied: no relu tensor). It
computes what primitives.fake_quant's eager formulas do: the same IEEE division x/s, round half to even
(nearbyintf in the default rounding mode), clamp and product, so forward outputs and input gradients are
the eager ones bit for bit. The scale and zero-point gradients are sums: per block of 4096 values in 8 float
lanes (value i into lane i mod 16), then in double in block order, so they depend neither on the thread count
nor on the instruction set (their last bits differ from torch's own sum, which uses another order). The
forward pass is vectorised by the compiler (target clones); the backward pass, whose masked sums gcc leaves
scalar, is written in AVX-512 and AVX2 intrinsics (the same lanes), with portable C elsewhere.

The C source below is compiled once per machine with the system C compiler into a cache folder
($QATKIT_CACHE, else ~/.cache/qatkit) and loaded with ctypes; its OpenMP threads are torch's own pool
(torch's libgomp.so.1 is the one loaded in the process). Where it cannot be built (no compiler,
unwritable cache) `load()` returns None with a warning, once, and fake quantization stays on eager
PyTorch ops: same results, slower training. QATKIT_KERNEL=0 turns the kernel off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from qatkit.primitives.qparams import MIN_SCALE

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define BLOCK 4096

/* relu: quantize max(x, 0) (NaN stays NaN, as torch's relu keeps it), with relu's gradient mask x > 0. */
CLONES static void forward_block(const float *restrict x, float *restrict y, int64_t n, float s, float z, float qmin,
                                 float qmax, int relu) {
    for (int64_t i = 0; i < n; i++) {
        float v = (relu & (x[i] < 0.0f)) ? 0.0f : x[i];
        float q = nearbyintf(v / s) + z;
        q = q < qmin ? qmin : q;
        q = q > qmax ? qmax : q;
        y[i] = (q - z) * s;
    }
}

/* The backward pass sums in LANES float partial sums (value i of a block into lane i % LANES, the lanes then added in
   order): the same sums from the AVX-512, AVX2 and portable paths. 16 lanes: one AVX-512 register or two AVX2 ones
   (with 8, the AVX-512 loop added its two halves to one register one after the other, a chain of dependent additions
   that bounded it, not memory: twice as slow). */
#define LANES 16

/* One value of the backward pass: its gradient, and its terms of the two sums added to its lane. */
static inline void backward_one(float x, float g, float *gx, float s, float z, float qmin, float qmax, int relu,
                                float *ss, float *sc) {
    float v = (relu & (x < 0.0f)) ? 0.0f : x;
    float xs = v / s;
    float r = nearbyintf(xs) + z;
    float q = r < qmin ? qmin : r;
    q = q > qmax ? qmax : q;
    int inside = (r >= qmin) & (r <= qmax);
    *gx = (inside & ((relu == 0) | (x > 0.0f))) ? g : 0.0f;
    *ss += g * (inside ? (q - z) - xs : q - z);
    *sc += inside ? 0.0f : g;
}

/* One block: gradient of x, and the block's sums of g·dx̂/ds and of g where clamped. */
static void backward_block_portable(const float *restrict x, const float *restrict g, float *restrict gx, int64_t n,
                                    float s, float z, float qmin, float qmax, int relu, float *ss, float *sc) {
    for (int64_t i = 0; i < n; i++)
        backward_one(x[i], g[i], gx + i, s, z, qmin, qmax, relu, ss + i % LANES, sc + i % LANES);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* 8 values of backward_block_portable in AVX2 intrinsics, value for value (gcc does not vectorize the selects in its
   reductions): IEEE division, rounding in the current mode (nearbyintf), no fused multiply-add. Its selects as
   max/min(bound, value), which return the second operand where either is NaN or both are zeros of either sign: the
   value, as the scalar compare-and-select keeps it (relu: max(0, x) is x for NaN and -0, as x < 0 ? 0 : x). Inside
   the range is q == r: the clamp left r as it was (NaN equals nothing, as it fails qmin <= r <= qmax). Their terms are
   added to the 8 lanes acc_s, acc_c. */
__attribute__((target("avx2"))) static inline void backward_8_avx2(const float *restrict x, const float *restrict g,
        float *restrict gx, __m256 vs, __m256 vz, __m256 lo, __m256 hi, int relu, __m256 *acc_s, __m256 *acc_c) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 xv = _mm256_loadu_ps(x), gv = _mm256_loadu_ps(g);
    __m256 v = relu ? _mm256_max_ps(zero, xv) : xv;
    __m256 xs = _mm256_div_ps(v, vs);
    __m256 r = _mm256_add_ps(_mm256_round_ps(xs, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC), vz);
    __m256 q = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
    __m256 inside = _mm256_cmp_ps(q, r, _CMP_EQ_OQ);
    __m256 pass = relu ? _mm256_and_ps(inside, _mm256_cmp_ps(xv, zero, _CMP_GT_OQ)) : inside;
    _mm256_storeu_ps(gx, _mm256_and_ps(pass, gv));
    __m256 d = _mm256_sub_ps(_mm256_sub_ps(q, vz), _mm256_and_ps(inside, xs));  /* (q - z) - xs, or (q - z) - 0 */
    *acc_s = _mm256_add_ps(*acc_s, _mm256_mul_ps(gv, d));
    *acc_c = _mm256_add_ps(*acc_c, _mm256_andnot_ps(inside, gv));
}

/* backward_block_portable 16 values (LANES) at a time: values i..i+7 into lanes 0-7, i+8..i+15 into lanes 8-15. The
   rest (under 16 values) goes to the portable code, the lanes lined up. */
__attribute__((target("avx2"))) static void backward_block_avx2(const float *restrict x, const float *restrict g,
        float *restrict gx, int64_t n, float s, float z, float qmin, float qmax, int relu, float *ss, float *sc) {
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
    __m256 s0 = _mm256_loadu_ps(ss), s1 = _mm256_loadu_ps(ss + 8), c0 = _mm256_loadu_ps(sc), c1 = _mm256_loadu_ps(sc + 8);
    int64_t full = n - n % LANES;
    for (int64_t i = 0; i < full; i += LANES) {
        backward_8_avx2(x + i, g + i, gx + i, vs, vz, lo, hi, relu, &s0, &c0);
        backward_8_avx2(x + i + 8, g + i + 8, gx + i + 8, vs, vz, lo, hi, relu, &s1, &c1);
    }
    _mm256_storeu_ps(ss, s0);
    _mm256_storeu_ps(ss + 8, s1);
    _mm256_storeu_ps(sc, c0);
    _mm256_storeu_ps(sc + 8, c1);
    backward_block_portable(x + full, g + full, gx + full, n - full, s, z, qmin, qmax, relu, ss, sc);
}

/* The same in AVX-512, 16 values (the 16 lanes) a register: each value's operations as above (mask registers for the
   masks). */
__attribute__((target("avx512f"))) static void backward_block_avx512(const float *restrict x, const float *restrict g,
        float *restrict gx, int64_t n, float s, float z, float qmin, float qmax, int relu, float *ss, float *sc) {
    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), lo = _mm512_set1_ps(qmin),
                 hi = _mm512_set1_ps(qmax), zero = _mm512_setzero_ps();
    __m512 acc_s = _mm512_loadu_ps(ss), acc_c = _mm512_loadu_ps(sc);
    int64_t full = n - n % LANES;
    for (int64_t i = 0; i < full; i += LANES) {
        __m512 xv = _mm512_loadu_ps(x + i), gv = _mm512_loadu_ps(g + i);
        __m512 v = relu ? _mm512_max_ps(zero, xv) : xv;
        __m512 xs = _mm512_div_ps(v, vs);
        __m512 r = _mm512_add_ps(_mm512_roundscale_ps(xs, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC), vz);
        __m512 q = _mm512_min_ps(hi, _mm512_max_ps(lo, r));
        __mmask16 inside = _mm512_cmp_ps_mask(q, r, _CMP_EQ_OQ);
        __mmask16 pass = relu ? inside & _mm512_cmp_ps_mask(xv, zero, _CMP_GT_OQ) : inside;
        _mm512_storeu_ps(gx + i, _mm512_maskz_mov_ps(pass, gv));
        __m512 d = _mm512_sub_ps(_mm512_sub_ps(q, vz), _mm512_maskz_mov_ps(inside, xs));
        acc_s = _mm512_add_ps(acc_s, _mm512_mul_ps(gv, d));
        acc_c = _mm512_add_ps(acc_c, _mm512_maskz_mov_ps((__mmask16)~inside, gv));
    }
    _mm512_storeu_ps(ss, acc_s);
    _mm512_storeu_ps(sc, acc_c);
    backward_block_portable(x + full, g + full, gx + full, n - full, s, z, qmin, qmax, relu, ss, sc);
}
#endif

/* vector: the widest code up to 2 (AVX-512), 1 (AVX2), 0 (portable) the CPU has (the tests compare them). */
static void backward_block(const float *restrict x, const float *restrict g, float *restrict gx, int64_t n, float s,
                           float z, float qmin, float qmax, int relu, int vector, double *sum_s, double *sum_c) {
    float ss[LANES] = {0.0f}, sc[LANES] = {0.0f}, ts = 0.0f, tc = 0.0f;
#if defined(__x86_64__) && defined(__GNUC__)
    if (vector >= 2 && __builtin_cpu_supports("avx512f"))
        backward_block_avx512(x, g, gx, n, s, z, qmin, qmax, relu, ss, sc);
    else if (vector >= 1 && __builtin_cpu_supports("avx2"))
        backward_block_avx2(x, g, gx, n, s, z, qmin, qmax, relu, ss, sc);
    else
#endif
        backward_block_portable(x, g, gx, n, s, z, qmin, qmax, relu, ss, sc);
    for (int j = 0; j < LANES; j++) {
        ts += ss[j];
        tc += sc[j];
    }
    *sum_s = ts;
    *sum_c = tc;
}

/* The MSE range search's errors: for row c of x (n values) and candidate g (scale s, zero point z), the sum over the
   row of ((clamp(round(x/s) + z, qmin, qmax) - z)·s - x)², each value's error in float32 as the quantizer computes
   it, its square added in double to lane i % LANES, the lanes then in order. */
CLONES static double squared_error(const float *restrict x, int64_t n, float s, float z, float qmin, float qmax) {
    double acc[LANES] = {0.0}, total = 0.0;
    for (int64_t i = 0; i < n; i += LANES) {
        int64_t m = n - i < LANES ? n - i : LANES;
        for (int64_t j = 0; j < m; j++) {
            float q = nearbyintf(x[i + j] / s) + z;
            q = q < qmin ? qmin : q;
            q = q > qmax ? qmax : q;
            float d = (q - z) * s - x[i + j];
            acc[j] += (double)(d * d);
        }
    }
    for (int j = 0; j < LANES; j++)
        total += acc[j];
    return total;
}

/* err[g * rows + c]: squared_error of row c of x (rows runs of n values) at candidate g (s, z: grid x rows). */
void qatkit_mse_errors(const float *x, int64_t rows, int64_t n, const float *s, const float *z, int64_t grid,
                       float qmin, float qmax, double *err, int threads) {
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t g = 0; g < grid; g++)
        for (int64_t c = 0; c < rows; c++)
            err[g * rows + c] = squared_error(x + c * n, n, s[g * rows + c], z[g * rows + c], qmin, qmax);
}

/* A quantizer's raw parameters to the scale and zero point it applies (map = 0: as they are):
   s = max(|raw|, min_scale), with map = 2 then its nearest power of two 2^round(log2 s) (s = m·2^e, m in [0.5, 1):
   2^e where m >= sqrt(1/2), else 2^(e-1)); z = round(clamp(raw, qmin, qmax)); NaN stays NaN, as in torch's clamp. */
static float floored_abs(float raw, float min_scale) {
    float a = fabsf(raw);
    return a < min_scale ? min_scale : a;
}
static float mapped_scale(float raw, float min_scale, int map) {
    if (!map)
        return raw;
    float a = floored_abs(raw, min_scale);
    if (map != 2 || !isfinite(a))
        return a;
    int e;
    float m = frexpf(a, &e);
    return ldexpf(1.0f, (double)m >= 0.70710678118654752 ? e : e - 1);  /* in double: exactly m >= sqrt(1/2) */
}
static float mapped_zero_point(float raw, float qmin, float qmax, int map) {
    return !map ? raw : nearbyintf(raw < qmin ? qmin : raw > qmax ? qmax : raw);
}

/* x holds `channels` runs of k values (channel c: x[c*k .. c*k+k), scale s[c], zero point z[c]; one channel for
   per-tensor). Blocks of at most BLOCK values of one channel run in parallel on the OpenMP pool (torch's own:
   the same libgomp.so.1 is loaded once per process); each channel's block sums are added in block order, so the
   result does not depend on the thread count. */
void qatkit_fq_forward(const float *x, float *y, int64_t channels, int64_t k, const float *s, const float *z,
                       float qmin, float qmax, int relu, int map_s, int map_z, float min_scale, int threads) {
    int64_t per = (k + BLOCK - 1) / BLOCK, blocks = channels * per;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t c = b / per, i0 = c * k + (b % per) * BLOCK, len = c * k + k - i0 < BLOCK ? c * k + k - i0 : BLOCK;
        forward_block(x + i0, y + i0, len, mapped_scale(s[c], min_scale, map_s), mapped_zero_point(z[c], qmin, qmax, map_z),
                      qmin, qmax, relu);
    }
}

/* Also the gradients of s and z (of the raw parameters with map_s / map_z: the chain rule through |.| and the
   floor at min_scale, the clamp and round, with torch's masks), each float32 operation as torch does it in eager mode:
   grad_s = f32(sum_s)·grad_scale, grad_z = f32(sum_c)·(-s)·grad_scale. */
int qatkit_fq_backward(const float *x, const float *g, float *gx, int64_t channels, int64_t k, const float *s,
                       const float *z, float qmin, float qmax, int relu, int map_s, int map_z, float min_scale,
                       float grad_scale, int threads, int vector, float *grad_s, float *grad_z) {
    int64_t per = (k + BLOCK - 1) / BLOCK, blocks = channels * per;
    double *part = malloc(2 * blocks * sizeof(double));
    if (!part) return 1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t c = b / per, i0 = c * k + (b % per) * BLOCK, len = c * k + k - i0 < BLOCK ? c * k + k - i0 : BLOCK;
        backward_block(x + i0, g + i0, gx + i0, len, mapped_scale(s[c], min_scale, map_s),
                       mapped_zero_point(z[c], qmin, qmax, map_z), qmin, qmax, relu, vector, &part[2 * b],
                       &part[2 * b + 1]);
    }
    for (int64_t c = 0; c < channels; c++) {
        double ds = 0.0, dc = 0.0;
        for (int64_t j = c * per; j < (c + 1) * per; j++) {
            ds += part[2 * j];
            dc += part[2 * j + 1];
        }
        float gs = (float)ds * grad_scale, gz = (float)dc * -mapped_scale(s[c], min_scale, map_s) * grad_scale;
        if (map_s) {  /* where(|raw| >= min_scale, gs [* 2^k / |raw|: power of two, straight through], 0) * sgn(raw) */
            float sign = s[c] > 0.0f ? 1.0f : s[c] < 0.0f ? -1.0f : s[c];
            if (map_s == 2)
                gs = gs * (mapped_scale(s[c], min_scale, map_s) / floored_abs(s[c], min_scale));
            gs = (fabsf(s[c]) >= min_scale ? gs : 0.0f) * sign;
        }
        if (map_z)
            gz = (z[c] >= qmin) & (z[c] <= qmax) ? gz : 0.0f;
        grad_s[c] = gs;
        grad_z[c] = gz;
    }
    free(part);
    return 0;
}
"""

# The backward pass's widest code: 2 AVX-512, 1 AVX2 (where the CPU has it), 0 portable: the same results (the tests
# compare them).
VECTOR = 2
# Below this many values a second thread costs more than it saves.
_PARALLEL_MIN = 1 << 16
_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off"]
# OpenMP threads and simd; where the compiler has no OpenMP runtime, simd only (one thread), else neither
_OPENMP = (["-fopenmp"], ["-fopenmp-simd"], [])

_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("QATKIT_CACHE") or Path.home() / ".cache" / "qatkit")


def _compile() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *_FLAGS, platform.machine(), sys.platform]).encode()).hexdigest()
    path = _cache_dir() / f"fake_quant_{key[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, lib = Path(tmp) / "fake_quant.c", Path(tmp) / "fake_quant.so"
            src.write_text(_SOURCE)
            for extra in _OPENMP:
                done = subprocess.run([compiler, *_FLAGS, *extra, str(src), "-o", str(lib), "-lm"],
                                      capture_output=True, text=True, check=False)
                if done.returncode == 0:
                    break
            else:
                raise OSError(f"{compiler} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            os.replace(lib, path)  # atomic: another process may be compiling the same file
    lib = ctypes.CDLL(str(path))
    f32, i64, ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
    flag = ctypes.c_int
    lib.qatkit_fq_forward.argtypes = [ptr, ptr, i64, i64, ptr, ptr, f32, f32, flag, flag, flag, f32, flag]
    lib.qatkit_fq_backward.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, f32, f32, flag, flag, flag, f32, f32, flag, flag, ptr, ptr]
    lib.qatkit_mse_errors.argtypes = [ptr, i64, i64, ptr, ptr, i64, f32, f32, ptr, flag]
    lib.qatkit_fq_forward.restype = lib.qatkit_mse_errors.restype = None
    lib.qatkit_fq_backward.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (eager PyTorch) where it cannot be built; tried once."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("QATKIT_KERNEL", "1") != "0":
            try:
                _lib = _compile()
            except (OSError, subprocess.SubprocessError) as e:
                warnings.warn(f"qatkit: fused fake-quant CPU kernel unavailable ({e}); using eager PyTorch ops "
                              "(same results, slower training). Fix: install a C compiler (cc/gcc/clang), or set "
                              "QATKIT_KERNEL=0 to silence this", RuntimeWarning, stacklevel=3)
    return _lib


def usable(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Whether the kernel can take this call: float32 on the CPU, per-tensor or per-channel with float32 parameters."""
    return (x.dtype == torch.float32 and x.is_cpu and x.numel() > 0 and x.dim() >= 1
            and scale.dtype == torch.float32 and zero_point.dtype == torch.float32
            and scale.is_cpu and zero_point.is_cpu and load() is not None)


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= _PARALLEL_MIN else 1


def _params(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale.contiguous(), zero_point.contiguous()


def forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
            relu: bool = False, map_scale: int = 0, map_zero_point: bool = False) -> torch.Tensor:
    """(clamp(round(x/s) + z, qmin, qmax) - z)·s of a contiguous float32 tensor whose first dimension holds the
    channels of a (C,) scale and zero point (or any shape, for 0-d ones); of relu(x) with relu=True.
    map_scale: 1, s = max(|scale|, MIN_SCALE); 2, its nearest power of two; map_zero_point: z = round(clamp(
    zero_point, qmin, qmax))."""
    s, z = _params(scale, zero_point)
    y = torch.empty_like(x)
    _lib.qatkit_fq_forward(x.data_ptr(), y.data_ptr(), s.numel(), x.numel() // s.numel(), s.data_ptr(), z.data_ptr(),
                           qmin, qmax, relu, map_scale, map_zero_point, MIN_SCALE, _threads(x.numel()))
    return y


def backward(x: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
             qmax: int, relu: bool = False, map_scale: int = 0, map_zero_point: bool = False,
             grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dscale, dL/dzero_point) for contiguous x and grad laid out as in `forward`; the parameter
    gradients (LSQ, times grad_scale; float32, shaped like the scale) come from per-channel sums of float32
    block sums in float64, in block order."""
    s, z = _params(scale, zero_point)
    grad_x = torch.empty_like(x)
    grad_s, grad_z = torch.empty(scale.shape), torch.empty(scale.shape)
    if _lib.qatkit_fq_backward(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), s.numel(), x.numel() // s.numel(),
                               s.data_ptr(), z.data_ptr(), qmin, qmax, relu, map_scale, map_zero_point, MIN_SCALE,
                               grad_scale, _threads(x.numel()), VECTOR, grad_s.data_ptr(), grad_z.data_ptr()):
        raise MemoryError(f"fake-quant backward: no memory for the block sums of {x.numel()} values")
    return grad_x, grad_s, grad_z


def mse_errors(rows: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, qmin: int, qmax: int
               ) -> torch.Tensor | None:
    """The MSE range search's quantization errors (float64, (G, C): the mean over row c of float32 rows (C, N) of
    each value's squared error at candidate g, scales and zero points (G, C)); None where the kernel cannot take
    them (not float32 on the CPU, or no kernel): the caller computes them in PyTorch."""
    if not (rows.dtype == scales.dtype == zero_points.dtype == torch.float32 and rows.is_cpu and scales.is_cpu
            and rows.dim() == 2 and rows.shape[1] > 0 and load() is not None):
        return None
    rows, scales, zero_points = rows.contiguous(), scales.contiguous(), zero_points.contiguous()
    err = torch.empty(scales.shape, dtype=torch.float64)
    _lib.qatkit_mse_errors(rows.data_ptr(), rows.shape[0], rows.shape[1], scales.data_ptr(), zero_points.data_ptr(),
                           scales.shape[0], qmin, qmax, err.data_ptr(), _threads(rows.numel() * scales.shape[0]))
    return err / rows.shape[1]
