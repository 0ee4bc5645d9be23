"""Frozen, validated configuration: what to quantize (QATConfig) and how to train (TrainConfig).

Each option has one spelling. Configs are built in code, from dicts (`from_dict`) or YAML files
(`load_yaml`, through yaml.safe_load); unknown keys and bad values raise ConfigError naming them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from qatkit.errors import ConfigError, bad_value
from qatkit.primitives.qparams import INIT_METHODS
from qatkit.primitives.ranges import check_bits, qrange

T = TypeVar("T")
AUGMENTS = ("none", "crop-flip")  # training-time augmentation (qatkit.data.loader.BatchLoader)
MAX_SEED = 2**63 - 1  # torch.manual_seed's range (seed + epoch stays below 2**64)


def _check_choice(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise bad_value(what, value, ", ".join(allowed), f"set {what} to one of these")


def _check_bool(what: str, value: object, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise bad_value(what, value, "true or false" + (" or null" if optional else ""), f"set {what} to true or false")


def _check_number(what: str, value: object, lo: float, hi: float = math.inf, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi or not (integer or _finite(value)):
        span = f"{'an integer' if integer else 'a number'} in [{lo}, {hi}]"
        raise bad_value(what, value, span, f"set {what} within that range")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one tensor is quantized: x̂ = (clamp(round(x/s) + z, qmin, qmax) - z) * s."""

    bits: int = 8
    symmetric: bool = True  # z = 0
    signed: bool = True  # int (True) or uint (False) codes
    per_channel: bool = False
    axis: int = 0  # channel axis when per_channel
    narrow: bool = False  # one code fewer: [-127, 127] for int8 (symmetric), [0, 2^b - 2] unsigned
    init: str = "mse"  # range initialisation: minmax | percentile | mse
    learnable: bool = True  # scale (and asymmetric zero point) trained by LSQ
    power_of_two: bool = False  # s = 2^k: learned as 2^round(log2 s), straight through the rounding
    # A layer's weights: s_w nudged so that the layer's requantization multiplier s_x·s_w/s_y is exact
    # (QLayer.weight_scale)
    exact_multiplier: bool = False
    # Values in [0, 1) (a softmax's output): s = 2^-bits and z = 0, fixed (neither calibrated nor learned), uint
    # codes. ONNX Runtime's QLinearSoftmax, which it fuses DQ → Softmax → Q into, then gives the float softmax's codes.
    unit_range: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_choice("init", self.init, INIT_METHODS)
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise bad_value("axis", self.axis, "an integer (the channel dimension)", "set axis to e.g. 0")
        for what in ("symmetric", "signed", "per_channel", "narrow", "learnable", "power_of_two", "exact_multiplier",
                     "unit_range"):
            _check_bool(what, getattr(self, what))
        if self.unit_range and (self.signed or not self.symmetric or self.per_channel or self.narrow):
            raise bad_value("unit_range", True, "a per-tensor unsigned symmetric full-range spec (signed=False, "
                            "symmetric=True, per_channel=False, narrow=False)", "set those fields with unit_range")
        if self.power_of_two and self.exact_multiplier:
            raise bad_value("exact_multiplier", True, "False with power_of_two (power-of-two scales make every "
                            "multiplier exact already)", "set one of power_of_two and exact_multiplier")

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed, self.narrow)


@dataclass(frozen=True, kw_only=True)
class LayerRule:
    """Per-layer override, matched by glob on the module's qualified name or its type name."""

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    per_channel: bool | None = None
    skip: bool = False  # leave the layer in float

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise bad_value("rule pattern", self.pattern, "a non-empty glob such as 'layer1.*' or 'Linear'", "fix the rule")
        for what in ("weight_bits", "act_bits"):
            if getattr(self, what) is not None:
                check_bits(getattr(self, what), f"rule '{self.pattern}' {what}")
        _check_bool(f"rule '{self.pattern}' per_channel", self.per_channel, optional=True)
        _check_bool(f"rule '{self.pattern}' skip", self.skip)

    def matches(self, name: str, type_name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern) or fnmatch.fnmatchcase(type_name, self.pattern)


@dataclass(frozen=True, kw_only=True)
class QATConfig:
    """What `qatkit.prepare` quantizes and how. Defaults follow Nagel et al. 2021's QAT recipe:
    symmetric per-channel weights, asymmetric per-tensor activations, MSE range init, learnable
    scales, BN folded; first and last layer at 8 bits (LSQ's practice)."""

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    act_symmetric: bool = False
    weight_init: str = "mse"
    act_init: str = "mse"
    learnable: bool = True
    first_last_bits: int | None = 8  # None: first/last layers follow weight_bits/act_bits
    output_bits: int | None = 8  # the model's output (logits) as integers, as an int8 runtime returns it; None: float
    # Inputs of residual adds and average pools (the skip path, which no layer multiplies); every layer's input
    # is requantized to its act bits. None: act_bits everywhere.
    residual_bits: int | None = 8
    # A matmul of two activations (attention's Q·Kᵀ and weights·V): both inputs and the output as integers at these
    # bits, as ONNX Runtime's QLinearMatMul computes it. None: such matmuls stay float.
    matmul_bits: int | None = 8
    # False: BatchNorm stays a float op between integer layers; ONNX Runtime's float BN and adds round otherwise than
    # PyTorch's, so the exported model matches qatkit's to within float rounding, not bit for bit (ResNet-20 W8A8:
    # max step diff 2, a few codes in a thousand)
    fold_bn: bool = True
    # Every scale a power of two: each requantization multiplier is then 2^-n, which the runtime's float32
    # multiply and integer-only hardware's fixed-point multiply-and-shift compute identically.
    power_of_two_scales: bool = False
    # Free scales, every conv/linear requantization multiplier s_x·s_w/s_y held on a grid (2^-16 for 8-bit outputs)
    # where ONNX Runtime's float32 product acc·M is exact: each weight scale nudged (straight through) to the
    # nearest such value, so integer-only hardware's fixed-point multiply-and-shift computes the runtime's integers.
    exact_multipliers: bool = False
    # Residual adds and global average pools requantized exactly: each one's inputs and output share one activation
    # quantizer (scale and zero point), so the runtime's rescale factors s_in/s_out are 1 and both its float32
    # arithmetic and integer-only hardware's compute the same integers. With exact_multipliers, fixed-point hardware
    # then computes ONNX Runtime's integers through a whole residual network, whose skip path has one range.
    exact_adds: bool = False
    # 8-bit weights quantized at 7 bits ([-64, 63], as ORT's quantizer's reduce_range): ONNX Runtime's fast u8·s8
    # kernels on x86 CPUs without VNNI (AVX2) cannot saturate then, so the export keeps them int8 (with full-range
    # 8-bit weights it stores uint8 + 128, exact on every CPU but slower there; ORT_NUMERICS.md)
    reduce_range: bool = False
    rules: tuple[LayerRule, ...] = ()
    # Quantization-error regulariser Σ_k λ_k·mean((x_k - x̂_k)²): {parameter-name glob: λ}, e.g.
    # {"*.weight": 1e-4}; given as a mapping, kept as a tuple of (glob, λ) pairs so the config stays frozen.
    error_penalty: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        for what in ("first_last_bits", "output_bits", "residual_bits", "matmul_bits"):
            if getattr(self, what) is not None:
                check_bits(getattr(self, what), what)
        _check_choice("weight_init", self.weight_init, INIT_METHODS)
        _check_choice("act_init", self.act_init, INIT_METHODS)
        if not isinstance(self.rules, (tuple, list)):
            raise bad_value("rules", self.rules, "a list of layer rules (LayerRule, or mappings such as "
                            "{pattern: 'fc', weight_bits: 8})", "write rules: as a list, each rule under a -")
        rules = tuple(r if isinstance(r, LayerRule) else _from_mapping(LayerRule, r, "rules[]") for r in self.rules)
        object.__setattr__(self, "rules", rules)
        for what in ("per_channel", "act_symmetric", "learnable", "fold_bn", "power_of_two_scales", "exact_multipliers",
                     "exact_adds", "reduce_range"):
            _check_bool(what, getattr(self, what))
        if self.power_of_two_scales and self.exact_multipliers:
            raise bad_value("exact_multipliers", True, "False with power_of_two_scales (power-of-two scales make "
                            "every multiplier exact already)", "set one of power_of_two_scales and exact_multipliers")
        object.__setattr__(self, "error_penalty", error_penalty_pairs(self.error_penalty))

    def weight_spec(self, bits: int, per_channel: bool) -> QuantSpec:
        bits = 7 if self.reduce_range and bits == 8 else bits
        return QuantSpec(bits=bits, symmetric=True, signed=True, per_channel=per_channel, init=self.weight_init,
                         learnable=self.learnable, power_of_two=self.power_of_two_scales,
                         exact_multiplier=self.exact_multipliers)

    def act_spec(self, bits: int, unsigned: bool = False) -> QuantSpec:
        """Activations: asymmetric uint by default; after a ReLU, unsigned with zero point fixed at 0."""
        symmetric = self.act_symmetric or unsigned
        return QuantSpec(bits=bits, symmetric=symmetric, signed=symmetric and not unsigned, init=self.act_init,
                         learnable=self.learnable, power_of_two=self.power_of_two_scales)


def error_penalty_pairs(penalty: object) -> tuple[tuple[str, float], ...]:
    """{parameter glob: λ} (or (glob, λ) pairs) as (glob, λ) pairs, each λ a number >= 0."""
    pairs = list(penalty.items()) if isinstance(penalty, Mapping) else penalty
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise bad_value("error_penalty", penalty, "a mapping {parameter glob: lambda}", "e.g. {'*.weight': 1e-4}")
    for glob, lam in pairs:
        _check_number(f"error_penalty['{glob}']", lam, 0.0)
    return tuple((str(g), float(lam)) for g, lam in pairs)


OPTIMIZERS = ("adamw", "sgd")
PENALTY_SCHEDULES = ("constant", "cosine")
NONFINITE = ("stop", "skip")  # what fit does with a batch whose loss or gradient is NaN/Inf


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How `qatkit.fit` trains. Defaults are a QAT fine-tune from float weights. batch_size, calib_batches and
    augment are the settings of the batches `qatkit run`/`train` make (fit trains on the loader it is given)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    scale_lr: float | None = None  # lr of quantizer scales/zero points (None: lr / 100)
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 0.0
    distill: float = 0.0  # weight of KL(teacher || student) on logits; 0 = off
    temperature: float = 1.0
    bn_freeze_epoch: int | None = None  # from this epoch on, BN uses its running statistics
    calib_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    augment: str = "none"
    # A NaN/Inf loss or gradient: "stop" raises QatkitError naming epoch, step (and parameter); "skip" drops
    # the batch (no optimizer step, the schedule still advances) and stops only if > half an epoch is dropped.
    nonfinite: str = "stop"
    # Progressive precision: the epochs split into len(progressive_bits) equal stages, stage k training every
    # quantizer at max(progressive_bits[k], its own bit-width), the last stage (with the last epoch) at its own
    # bit-width: (8, 4, 2) takes a W2A2 model 8 → 4 → 2 bits, a W4A4 one 8 → 4 → 4.
    progressive_bits: tuple[int, ...] = ()
    # λ of QATConfig.error_penalty over training: "constant", or "cosine", rising from 0 at the first step to λ at
    # the last (as Nagel et al. 2022 anneal their oscillation-dampening weight): weights move freely early on and
    # are pulled onto their grid points late, where oscillating weights would otherwise flip to the end.
    penalty_schedule: str = "constant"
    # Each epoch's history row gets "oscillating": the share of sub-8-bit weights whose integer code moved against
    # its previous move at least once (Nagel et al. 2022's oscillations); costs one weight quantization per step.
    track_oscillations: bool = False
    progress: bool = True  # a line per epoch, and on a terminal a progress bar
    # Largest global L2 norm of the gradients each step (all parameters together, scales included; clipped after the
    # ranks' average under DDP), as transformer fine-tuning recipes clip at 1.0; None: not clipped.
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        _check_number("epochs", self.epochs, 0, integer=True)
        _check_number("batch_size", self.batch_size, 1, integer=True)
        _check_number("lr", self.lr, 0.0)
        if self.scale_lr is not None:
            _check_number("scale_lr", self.scale_lr, 0.0)
        clip = self.grad_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf):
            raise bad_value("grad_clip", self.grad_clip, "a positive finite number, or None (no clipping)",
                            "set grad_clip to e.g. 1.0, or leave it out")
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_number("momentum", self.momentum, 0.0, 1.0)
        _check_number("warmup_epochs", self.warmup_epochs, 0.0)
        _check_number("distill", self.distill, 0.0, 1.0)
        _check_number("temperature", self.temperature, 1e-3)
        if self.bn_freeze_epoch is not None:
            _check_number("bn_freeze_epoch", self.bn_freeze_epoch, 0, integer=True)
        _check_number("calib_batches", self.calib_batches, 1, integer=True)
        _check_number("seed", self.seed, 0, integer=True)
        if self.seed > MAX_SEED:
            raise bad_value("seed", self.seed, "an integer in [0, 2**63 - 1] (torch.manual_seed's range)", "pass a smaller --seed")
        _check_choice("nonfinite", self.nonfinite, NONFINITE)
        _check_choice("augment", self.augment, AUGMENTS)
        _check_choice("penalty_schedule", self.penalty_schedule, PENALTY_SCHEDULES)
        _check_bool("track_oscillations", self.track_oscillations)
        stages = self.progressive_bits
        if not isinstance(stages, (tuple, list)) or any(isinstance(b, bool) or not isinstance(b, int) for b in stages) \
                or any(b < 2 or b > 8 for b in stages) or list(stages) != sorted(stages, reverse=True) \
                or len(stages) == 1:
            raise bad_value("progressive_bits", stages, "two or more bit-widths in 2..8, highest first, e.g. [8, 4, 2] "
                            "(or [] for off: one stage trains at the model's own bit-widths)",
                            "list the stages from high to low precision")
        object.__setattr__(self, "progressive_bits", tuple(stages))
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise bad_value("device", self.device, "'cpu', 'cuda' or 'cuda:N'", "pass --device cpu or cuda")


def _from_mapping(cls: type[T], data: object, where: str) -> T:
    """Build a config dataclass from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, Mapping):
        raise bad_value(where, data, f"a mapping of {cls.__name__} fields", "write it as key: value pairs")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise bad_value(f"{where} key", unknown[0], ", ".join(names), "remove or correct the key")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = str(hints[key])
        if "float" in hint and isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if _finite(value) else value  # YAML writes 1 for 1.0; 10**400 is refused below
        if hint == "<class 'bool'>" and not isinstance(value, bool):
            raise bad_value(f"{where}.{key}", value, "true or false", f"write {key}: true or {key}: false")
        if hint == "<class 'str'>" and not isinstance(value, str):
            raise bad_value(f"{where}.{key}", value, "a string", f"quote the value of {key}")
        kwargs[key] = tuple(value) if key in ("rules", "progressive_bits") and isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a value of a type the dataclass cannot take at all
        raise ConfigError(f"{where}: {e}. Fix: check the types of the values") from None


def qat_config_from_dict(data: object) -> QATConfig:
    return _from_mapping(QATConfig, data, "qat")


def train_config_from_dict(data: object) -> TrainConfig:
    return _from_mapping(TrainConfig, data, "train")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config (for results.json, checkpoints and YAML)."""
    return dataclasses.asdict(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config with yaml.safe_load (data only, never objects); must be a mapping."""
    p = Path(path)
    if not p.is_file():
        raise bad_value("--config", str(p), "an existing YAML file", "check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {str(p)!r} is not valid YAML ({str(e).splitlines()[0]}). Fix: correct the file") from None
    except RecursionError:
        raise ConfigError(f"--config {str(p)!r} is not valid YAML (nested too deeply); allowed: a few hundred levels "
                          "of nesting at most. Fix: correct the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise bad_value("--config content", type(data).__name__, "a mapping of options", "write key: value pairs at the top level")
    return data
