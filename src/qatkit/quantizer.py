"""FakeQuantizer: a quantizer's state (scale, zero point, bits, flags) as Parameters and buffers.

Modes: quantize (default), observe (calibration: record statistics, pass x through), off
(`enabled` = False: pass through). State lives in the state_dict, so `.to()`, checkpoints and DDP
carry it without special code.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qatkit.devices import HostBuffers
from qatkit.config import QuantSpec
from qatkit.errors import DataError, QatkitError, bad_value, listed
from qatkit.primitives import (
    fake_quantize,
    lsq_grad_scale,
    qparams_from_minmax,
    qparams_from_tensor,
    qrange,
    quantize_codes,
)
from qatkit.primitives.fake_quant import ABS, POWER_OF_TWO, per_channel_view
from qatkit.primitives.qparams import MIN_SCALE, power_of_two_ceil, power_of_two_nearest
from qatkit.primitives.ranges import check_bits

_SAMPLES_PER_BATCH = 4096  # values kept per observed batch for percentile / MSE activation init
_MAX_SAMPLE_BATCHES = 64


class FakeQuantizer(HostBuffers, nn.Module):
    """Fake-quantizes a weight (`kind="weight"`, per-channel capable) or an activation (per-tensor)."""

    host_buffers = ("bits", "initialized", "enabled")

    def __init__(self, spec: QuantSpec, *, kind: str, channels: int | None = None):
        super().__init__()
        assert kind in ("weight", "act"), kind
        assert not spec.per_channel or channels, "per-channel quantizers need the channel count"
        self.spec, self.kind = spec, kind
        self.axis = spec.axis if spec.per_channel else None
        shape = (channels,) if spec.per_channel else ()
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=spec.learnable)
        zero_point = torch.zeros(shape)
        if spec.learnable and not spec.symmetric:
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)
        self.register_buffer("bits", torch.tensor(spec.bits))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("enabled", torch.tensor(True))
        self.observing = False
        self._reset_observer()
        if spec.unit_range:
            self.scale.requires_grad_(False)
            self._set_unit_range()

    # ---- integer range and effective parameters -------------------------------------------------
    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(int(self.bits), self.spec.signed, self.spec.narrow)

    def scale_zp(self, floor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale |s| (an optimizer step past zero flips its sign instead of killing its gradient, as a
        clamp would), at least `floor` (a layer's bias room: QLayer.scale_floor), with spec.power_of_two its nearest
        power of two 2^round(log2 |s|), straight through the rounding (gradient 2^round(log2 |s|) / |s|); zero point
        rounded to an integer with a straight-through gradient."""
        scale = self.scale.abs() if floor is None else torch.maximum(self.scale.abs(), floor)
        scale = torch.clamp(scale, min=MIN_SCALE)
        if self.spec.power_of_two:
            pow2 = power_of_two_nearest(scale.detach())
            scale = pow2 + (scale - scale.detach()) * (pow2 / scale.detach())  # the value: pow2 exactly
        if not isinstance(self.zero_point, nn.Parameter):
            return scale, self.zero_point  # a buffer: set by range init to an integer in range
        zp = torch.clamp(self.zero_point, *self.qrange)
        return scale, zp + (torch.round(zp) - zp).detach()

    def qparams(self, floor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, integer zero point) as used in the forward pass, detached."""
        scale, zp = self.scale_zp(floor)
        return scale.detach(), zp.detach()

    @property
    def active(self) -> bool:
        return bool(self.enabled) and not self.observing and bool(self.initialized)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, relu: bool = False, scale: torch.Tensor | None = None,
                floor: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantized x; of relu(x) with relu=True (fused with the quantization where the kernel runs).
        `scale`: the scale to use instead of the quantizer's own (a layer's exact-multiplier weight scale, computed
        from this quantizer's, whose gradient it carries back); else `floor`: the least scale (as scale_zp)."""
        enabled, initialized = bool(self.enabled), bool(self.initialized)  # (self.active, read once)
        if relu and not (enabled and not self.observing and initialized):  # no fake quantization to fuse it into
            x, relu = torch.relu(x), False
        if not enabled:
            return x
        if self.observing:
            self._observe(x)
            return x
        if x.numel() == 0:  # (an expert no token was routed to): nothing to quantize, nor to set a range from
            return torch.relu(x) if relu else x
        self._check_axis(x)
        if not initialized:  # weights, or activations never calibrated: initialise from this tensor
            self.init_from(x)
        qmin, qmax = self.qrange
        per_scale = x.numel() // (self.scale.numel() if self.kind == "weight" else max(x.shape[0], 1) if x.dim() else 1)
        # the mapping of scale_zp, inside the fake-quant's autograd node (cheaper than its small ops' own)
        map_scale = 0 if scale is not None else POWER_OF_TWO if self.spec.power_of_two else ABS
        if scale is None and floor is not None:  # (|s| at least floor: the kernel maps the rest, as scale_zp does)
            raw = torch.maximum(self.scale.abs(), floor)
        else:
            raw = self.scale if scale is None else scale
        return fake_quantize(x, raw, self.zero_point, qmin, qmax, self.axis,
                             lsq_grad_scale(per_scale, qmax), relu, map_scale=map_scale,
                             map_zero_point=isinstance(self.zero_point, nn.Parameter))

    def codes(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes of x (as float values) under the current parameters (`scale`: as in forward)."""
        own, zp = self.qparams()
        return quantize_codes(x, own if scale is None else scale.detach(), zp, *self.qrange, self.axis)

    def quant_error(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Δ = x - x̂ with its exact almost-everywhere gradient: the integer codes are piecewise
        constant, so dΔ/dx = 1, dΔ/ds = -(q - z), and dΔ/dz = s where the codes are clamped, 0 elsewhere
        (the STE would give dΔ/dx = 0 inside the range). `scale`: as in forward."""
        if not self.initialized:
            self.init_from(x)
        own, zp = self.scale_zp()
        scale = own if scale is None else scale
        qmin, qmax = self.qrange
        s, z = per_channel_view(scale, x, self.axis), per_channel_view(zp, x, self.axis)
        codes = torch.round(x.detach() / s.detach()) + z.detach()
        clamped = (codes < qmin) | (codes > qmax)
        return x - (torch.clamp(codes, qmin, qmax) - torch.where(clamped, z, z.detach())) * s

    def _check_axis(self, x: torch.Tensor) -> None:
        """A per-channel quantizer's axis must exist in x and hold as many channels as it has scales."""
        if self.axis is not None and not (-x.ndim <= self.axis < x.ndim and x.shape[self.axis] == self.scale.numel()):
            raise bad_value("axis", self.axis, f"a dimension of the {x.ndim}-D {self.kind} of shape {tuple(x.shape)} "
                            f"with {self.scale.numel()} channels", "set QuantSpec.axis to the channel dimension (0 for weights)")

    # ---- range initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def _set_unit_range(self) -> None:  # s = 2^-bits, z = 0 (QuantSpec.unit_range)
        self._set(torch.tensor(2.0 ** -int(self.bits)), torch.tensor(0.0))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        if self.spec.unit_range:
            return
        self._check_axis(x)
        if not bool(torch.isfinite(x).all()):  # (a NaN or Inf range would make every later output NaN)
            raise DataError(f"the {self.kind} range of a quantizer would be set from a tensor of shape "
                            f"{tuple(x.shape)} holding NaN or Inf; allowed: finite values. Fix: check the model's "
                            "weights and inputs for NaN/Inf, and calibrate (qatkit.calibrate) on finite batches")
        scale, zp = qparams_from_tensor(x.float(), *self.qrange, symmetric=self.spec.symmetric, axis=self.axis,
                                        method=self.spec.init, power_of_two=self.spec.power_of_two)
        self._set(scale, zp)

    @torch.no_grad()
    def _set(self, scale: torch.Tensor, zp: torch.Tensor) -> None:
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.initialized.fill_(True)

    def _reset_observer(self) -> None:
        self._min = self._max = None
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1).cpu()
        if flat.numel() == 0:  # an empty batch shows no range
            return
        lo, hi = flat.min(), flat.max()
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        if len(self._samples) < _MAX_SAMPLE_BATCHES:
            idx = torch.randint(flat.numel(), (min(flat.numel(), _SAMPLES_PER_BATCH),), generator=self._generator)
            self._samples.append(flat[idx])

    def start_observing(self) -> None:
        self._reset_observer()
        self.observing = True

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Set scale/zero point from what was observed (min/max exact, percentile/MSE on samples)."""
        self.observing = False
        if self._min is None or self.spec.unit_range:
            self._reset_observer()
            return  # never reached by the calibration data: stays uninitialised, set at first use; or fixed
        qmin, qmax = self.qrange
        po2 = self.spec.power_of_two
        if self.spec.init == "minmax":
            self._set(*qparams_from_minmax(self._min, self._max, qmin, qmax, self.spec.symmetric, po2))
        else:
            sample = torch.cat(self._samples + [self._min.view(1), self._max.view(1)])
            self._set(*qparams_from_tensor(sample, qmin, qmax, symmetric=self.spec.symmetric, method=self.spec.init,
                                           power_of_two=po2))
        self._reset_observer()

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Change the bit-width, keeping the represented range (for progressive precision 8→4→2)."""
        old_min, old_max = self.qrange
        self.spec = dataclasses.replace(self.spec, bits=check_bits(bits))
        self.bits.fill_(bits)
        qmin, qmax = self.qrange
        if self.spec.unit_range:
            return self._set_unit_range()
        if not self.initialized:
            return
        if self.spec.symmetric:  # z stays 0: keep the largest representable magnitude
            self.scale.mul_(old_max / qmax)
        else:
            ratio = (old_max - old_min) / (qmax - qmin)
            self.scale.mul_(ratio)
            self.zero_point.copy_(torch.clamp(torch.round(qmin + (self.zero_point - old_min) / ratio), qmin, qmax))
        if self.spec.power_of_two:  # up to a power of two: the range stays representable
            self.scale.copy_(power_of_two_ceil(self.scale.abs()))

    def extra_repr(self) -> str:
        s = self.spec
        gran = f"per-channel(axis={self.axis})" if s.per_channel else "per-tensor"
        return (f"{self.kind}, bits={int(self.bits)}, {'sym' if s.symmetric else 'asym'}, "
                f"{'int' if s.signed else 'uint'}, {gran}{', power-of-two' if s.power_of_two else ''}")


def check_qat_model(model, doing: str) -> None:
    """Refuse, for `doing`, what is no QAT model (one qatkit.prepare made, or a module holding quantizers): a float
    model, an integer model, a path."""
    if isinstance(model, nn.Module) and (hasattr(model, "qat_info")
                                         or any(isinstance(m, FakeQuantizer) for m in model.modules())):
        return
    what = ("an integer model (qatkit.convert's)" if type(model).__name__ == "IntegerModel" else
            f"a {type(model).__name__} without quantizers" if isinstance(model, nn.Module) else type(model).__name__)
    raise bad_value(f"the model {doing} takes", what, "a QAT model from qatkit.prepare",
                    "qat = qatkit.prepare(float_model, config, example_inputs), then calibrate or train it")


def check_ranges(model: nn.Module, doing: str) -> None:
    """Refuse a model with an enabled quantizer that has no range yet (`doing`: what needs them, in the message):
    its integer path would compute with a placeholder scale (an evaluation's logits all 0)."""
    if not isinstance(model, nn.Module):  # (an integer model: its ranges are fixed)
        return
    if unset := [name for name, m in model.named_modules() if isinstance(m, FakeQuantizer) and bool(m.enabled)
                 and not bool(m.initialized) and not m.spec.unit_range]:
        raise QatkitError(f"{doing} needs every quantizer's range, but these have none: "
                          f"{listed(map(repr, unset), 4)}; allowed: ranges set "
                          "by qatkit.calibrate or training (a quantizer whose input was empty on every batch, an "
                          "expert no token was routed to, gets none). Fix: run qatkit.calibrate(model, batches) on "
                          "batches that reach them")
