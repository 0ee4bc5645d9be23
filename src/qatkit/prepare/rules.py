"""Per-layer settings: the config's defaults, first/last-layer bits, and LayerRule overrides."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from qatkit.config import QATConfig
from qatkit.errors import bad_value


@dataclass(frozen=True)
class LayerPlan:
    """What one Conv/Linear gets: its weight bits and granularity, and the bits of its input."""

    weight_bits: int
    act_bits: int
    per_channel: bool
    skip: bool


LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # (their weight is their own)


def layer_type(module: nn.Module) -> type:
    """The module's class; for one whose weight is parametrized (torch.nn.utils.parametrizations.weight_norm,
    spectral_norm: PyTorch makes it a ParametrizedConv2d, …), the class it was."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def plan_layers(model: nn.Module, config: QATConfig, quantizable: tuple[type, ...],
                edge: tuple[str, str] | None = None) -> dict[str, LayerPlan]:
    """Plan every quantizable layer by qualified name; a rule that matches no layer is an error (a rule may also
    name a layer prepare makes of F.linear / F.conv*d on a bare parameter: `<its path, . as _>_linear` / `_conv`).

    "First" and "last" are the first and last quantizable layers in definition order (the stem conv
    and the classifier in the zoo), kept at `first_last_bits` as LSQ does; `edge` names them instead (prepare's
    second pass, when a planned subclass turned out not to be quantized). A subclass of nn.Embedding (Hugging
    Face's BART positional embedding, whose forward computes the positions it looks up) or of a Linear or conv
    (timm's Conv2dSame, which pads its input itself) is planned too: fx traces its forward, and prepare quantizes
    the lookup of its own table, the product with its own (or a computed) weight.
    """
    names = [n for n, m in model.named_modules()
             if layer_type(m) in quantizable or isinstance(m, (nn.Embedding, *LAYER_TYPES))]
    edge = set(edge or names[:1] + names[-1:]) if config.first_last_bits is not None else set()
    plans, used = {}, set()
    for name in names:
        bits = config.first_last_bits if name in edge else None
        plans[name] = plan_for(name, layer_type(model.get_submodule(name)).__name__, config, bits, used)
    for name, p in model.named_parameters():  # the layers prepare makes of F.linear / F.conv*d on bare parameters
        owner = model.get_submodule(name.rpartition(".")[0])
        if 2 <= p.ndim <= 5 and not isinstance(owner, LAYER_TYPES):
            kind, type_name = ("linear", "Linear") if p.ndim == 2 else ("conv", f"Conv{p.ndim - 2}d")
            plan_for(f"{name.replace('.', '_')}_{kind}", type_name, config, used=used)  # (their rules are used)
    for i, rule in enumerate(config.rules):
        if i not in used:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise bad_value("rule pattern", rule.pattern, f"a glob matching a layer name or type ({shown})",
                            "correct the glob; names are as in model.named_modules()")
    return plans


def plan_for(name: str, type_name: str, config: QATConfig, bits: int | None = None,
             used: set[int] | None = None) -> LayerPlan:
    """The plan of layer `name` of class `type_name`: the config's bits (or `bits`, a first or last layer's), then
    the rules that match it, later ones winning; the indices of those rules are added to `used`."""
    w_bits, a_bits = bits or config.weight_bits, bits or config.act_bits
    per_channel, skip = config.per_channel, False
    for i, rule in enumerate(config.rules):
        if rule.matches(name, type_name):
            if used is not None:
                used.add(i)
            w_bits = rule.weight_bits or w_bits
            a_bits = rule.act_bits or a_bits
            per_channel = per_channel if rule.per_channel is None else rule.per_channel
            skip = skip or rule.skip
    return LayerPlan(w_bits, a_bits, per_channel, skip)
