"""The quantization-error regulariser Σ_k λ_k·mean(Δ_k²), Δ_k = x_k - x̂_k over quantized tensors.

This is the seed's λ·Δ² term and Nagel et al. 2022's dampening loss: it pulls weights towards their
rounding grid points, which damps weights oscillating across a rounding boundary in low-bit QAT.
Groups are parameter-name globs (`"*.weight"`, `"fc1.bias"`); the first matching glob gives λ.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from qatkit import kernels
from qatkit.errors import bad_value, listed
from qatkit.nn import QLayer


def _quantized_layers(model: nn.Module) -> list[tuple[str, QLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QLayer) and bool(m.weight_quant.enabled)]


def check_penalty_globs(model: nn.Module, penalty: Mapping[str, float]) -> None:
    """Each glob of `penalty` matches a quantized weight or bias (quantization_errors' names); else ConfigError."""
    names = [f"{name}.{p}" for name, _ in _quantized_layers(model) for p in ("weight", "bias")]
    for glob in penalty:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise bad_value("error_penalty glob", glob, "a glob matching a quantized weight or bias "
                            f"({listed(names, 4) or 'none: the model has no quantized layer'})",
                            "correct the glob ('*.weight' for every layer)")


def quantization_errors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Δ for every quantized weight and bias, keyed by parameter name ("fc1.weight", "fc1.bias").

    A bias is quantized to int32 at scale s_in·s_w, s_in being the scale the layer's input had in its
    last forward; biases of layers not yet run are left out.
    """
    errors = {}
    for name, layer in _quantized_layers(model):
        w, b = layer.folded()
        in_q = layer.last_input_quant
        floor = layer.scale_floor(in_q, b)
        s_w = layer.weight_scale(in_q, floor)
        s_w = layer.weight_quant.scale_zp(floor)[0] if s_w is None and floor is not None else s_w
        errors[f"{name}.weight"] = layer.weight_quant.quant_error(w, s_w)
        if b is not None and in_q is not None:
            bias_scale = in_q.qparams()[0] * (layer.weight_quant.qparams()[0] if s_w is None else s_w.detach())
            errors[f"{name}.bias"] = b - kernels.bias_codes(b, bias_scale).to(b.dtype) * bias_scale
    return errors


def quantization_error_penalty(model: nn.Module, penalty: Mapping[str, float] | Iterable[tuple[str, float]]) -> torch.Tensor:
    """Σ_k λ_k·mean(Δ_k²) over the parameters matched by the globs of `penalty` (0 when empty)."""
    total = torch.zeros(())
    penalty = dict(penalty)  # a mapping or QATConfig's (glob, λ) pairs
    if not penalty:
        return total
    for name, delta in quantization_errors(model).items():
        lam = next((lam for glob, lam in penalty.items() if fnmatch.fnmatchcase(name, glob)), 0.0)
        if lam:
            total = total.to(delta.device) + lam * delta.pow(2).mean()
    return total
