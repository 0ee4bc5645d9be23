"""Module-swap fallback for code torch.fx cannot trace (data-dependent control flow, ...).

Without a graph there is no telling which BN follows which conv or who consumes a layer's output,
so each Conv/Linear is swapped for a wrapper that quantizes its own input and returns float output;
its children that can be traced are still prepared as graphs.
"""
from __future__ import annotations

from torch import nn


def swap_layers(module: nn.Module, prefix: str, config, plans, info, prepare_child) -> nn.Module:
    from qatkit.prepare.graph import (
        WRAPPERS,  # import here: fx imports this package's siblings
    )
    from qatkit.prepare.rules import layer_type

    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        plan = plans.get(path)
        if layer_type(child) in WRAPPERS:
            if plan is None or plan.skip:
                continue
            w_spec = config.weight_spec(plan.weight_bits, plan.per_channel)
            ids_in = isinstance(child, nn.Embedding)  # no input quantizer
            wrapper = WRAPPERS[layer_type(child)](child, w_spec, **({} if ids_in else {"input_spec": config.act_spec(plan.act_bits)}))
            wrapper.weight_quant.init_from(wrapper.weight.detach())
            setattr(module, name, wrapper)
            info.layers.append({"name": path, "type": type(child).__name__, "weight_bits": w_spec.bits,
                                "per_channel": plan.per_channel, "act_bits": None if ids_in else plan.act_bits, "bn_folded": False,
                                "act": None, "output": "float"})
        elif len(list(child.children())) > 0:
            setattr(module, name, prepare_child(child, path, config, plans, info))
    return module
