"""Code that runs only in training (drop path, stochastic depth, noise layers).

torch.fx records one way through `if self.training:`: the mode the model is in when it is traced. A
parameter-free submodule whose forward runs other ops in train() than in eval() (timm's DropPath,
torchvision's StochasticDepth, a noise layer) therefore stays a module call in the QAT graph, running its own
code in the current mode; convert takes it as the identity where it is one in eval mode
(`qatkit.convert.ops.identity_in_eval`). prepare traces models in eval mode (the graph that is deployed);
mode-dependent code written inline, beside layers, is then left out of QAT: `train_only_ops` says what.
"""
from __future__ import annotations

import copy
import inspect
import operator
import re
import warnings
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from qatkit.convert import ops
from qatkit.convert.ops import graph_in_mode, own_parameter_free
from qatkit.errors import DataError, bad_value

_TENSOR_CONSTANT = re.compile(r"^_tensor_constant\d+$")


def _ops(graph: fx.Graph | None) -> list[tuple[str, str, str]] | None:
    """The (op, target, constant arguments) sequence of a graph; None for None (code fx cannot trace). F.dropout's
    arguments are left out: prepare makes it an nn.Dropout, which follows the mode. Tensor constants count as one
    target: fx numbers them after those an earlier trace left on the module."""
    if graph is None:
        return None
    return [(n.op, _TENSOR_CONSTANT.sub("_tensor_constant", getattr(n.target, "__name__", str(n.target))),
             "" if n.target is F.dropout else repr(fx.node.map_arg((n.args, n.kwargs), lambda _: "·")))
            for n in graph.nodes]


def mode_dependent(module: nn.Module) -> bool:
    """A parameter-free module of the model's own code whose forward runs other ops in train() than in eval()."""
    return own_parameter_free(module) and _ops(graph_in_mode(module, True)) != _ops(graph_in_mode(module, False))


class Proxy(fx.Proxy):
    """A proxy that records item assignment, `x[index] = value`, as an operator.setitem node (fx refuses it); prepare
    makes it functional where x is a tensor made in forward (Hugging Face's Swin builds its shifted-window mask so)."""

    def __setitem__(self, index, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class LeafTracer(fx.Tracer):
    """fx's tracer, keeping mode-dependent parameter-free submodules as calls (they follow train()/eval()).
    Buffers are graph values too (get_attr), so `self.mask[:, :T]` or a rotary cache `self.cos[:T]` sliced by an
    input's size stays symbolic: the graph takes any length."""

    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self._dependent: dict[int, bool] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return Proxy(node, self)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        """A module made inside forward (Hugging Face's DistilBERT: `nn.ReLU()(x)`) is no submodule of the model:
        without parameters or buffers, its forward's ops are traced; fx refuses it otherwise."""
        try:
            self.path_of_module(m)
        except NameError:
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                raise
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in ops.TRACED_THROUGH:  # nn.ELU, nn.ZeroPad2d…: their one functional call
            return False
        if super().is_leaf_module(m, qualname):
            return True
        if id(m) not in self._dependent:
            self._dependent[id(m)] = mode_dependent(m)
        return self._dependent[id(m)]


def trace(module: nn.Module, arguments: tuple[dict, dict] | None = None) -> fx.GraphModule:
    """fx.symbolic_trace with LeafTracer. `arguments`: `example_arguments`' (given, fixed); the arguments the
    example input does not give keep fixed values (`attention_mask=None`, `use_cache=False`): forward's code sees
    them, and they are no inputs of the graph."""
    return fx.GraphModule(module, traced_graph(LeafTracer(), module, arguments), type(module).__name__)


def traced_graph(tracer: fx.Tracer, module: nn.Module, arguments: tuple[dict, dict] | None) -> fx.Graph:
    """tracer's graph of module; given example arguments, only those given are placeholders: the others are fixed
    at their values, and forward's **kwargs (which fx makes a placeholder) takes nothing."""
    given, fixed = arguments or ({}, {})
    with warnings.catch_warnings():  # fx cannot check a fixed value that is not None, a bool or a number: it warns
        warnings.filterwarnings("ignore", "Was not able to add assertion")
        graph = tracer.trace(module, concrete_args=fixed or None)
    if arguments is not None:
        _drop_fixed(graph, given)
    return graph


def _traced(module: nn.Module, training: bool, arguments: tuple[dict, dict] | None) -> fx.Graph | None:
    """The graph of a copy of module in that mode, as `trace` traces it; None where fx cannot trace it."""
    try:
        return traced_graph(LeafTracer(), copy.deepcopy(module).train(training), arguments)
    except Exception:  # noqa: BLE001 - fx raises many types on code it cannot trace
        return None


def _drop_fixed(graph: fx.Graph, given: Collection[str]) -> None:
    """Remove the placeholders of the arguments not `given` (fixed: forward saw their values) and the checks fx adds
    that use them (the value is still the fixed one)."""
    fixed = [n for n in graph.nodes if n.op == "placeholder" and n.target not in given]
    checks = {n for n in graph.nodes if any(p in fixed for p in n.all_input_nodes)}
    while grown := {u for n in checks for u in n.users} - checks:
        checks |= grown
    for node in reversed(list(graph.nodes)):
        if node in checks or node in fixed:
            graph.erase_node(node)


def example_arguments(module: nn.Module, example) -> tuple[dict[str, object], dict[str, object]]:
    """The example input (a tensor, a tuple of forward's first arguments, or a dict of its arguments by name) by
    forward's argument names: the graph's inputs; and the other arguments' values, which the graph keeps fixed: a
    dict's values that are not tensors (`use_cache=False`, `return_dict=False`), else their defaults."""
    parameters = {p.name: p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    fixed = {}
    if isinstance(example, Mapping):
        given = {k: v for k, v in example.items() if isinstance(v, torch.Tensor)}
        fixed = {k: v for k, v in example.items() if k not in given}
        for k, v in fixed.items():  # a constant the graph keeps: tensors inside it would be frozen into the graph
            if v is not None and type(v) not in (bool, int, float, str):
                default = parameters[k].default if k in parameters else inspect.Parameter.empty
                fix = (f"pass {k!r} as a tensor" if default is inspect.Parameter.empty else
                       f"leave {k!r} out (its default: {default!r})")
                raise bad_value(f"example_inputs[{k!r}]", f"a {type(v).__name__}", "a tensor (an input of the graph) "
                                "or a constant that the graph keeps fixed: None, a bool, a number or a string", fix,
                                DataError)
    else:
        args = example if isinstance(example, tuple) else (example,)
        positional = [n for n, p in parameters.items() if p.kind != p.KEYWORD_ONLY]
        given = dict(zip(positional, args))
        if len(args) > len(positional):
            raise bad_value("example_inputs", f"{len(args)} inputs", f"at most {len(positional)}, the arguments of "
                            f"{type(module).__name__}.forward{tuple(positional)}", "pass one example per argument",
                            DataError)
    missing = [n for n, p in parameters.items() if n not in given and n not in fixed and p.default is p.empty]
    unknown = [n for n in (*given, *fixed) if n not in parameters]
    if unknown or missing:
        raise bad_value("example_inputs", [*given, *fixed], f"values for the arguments of {type(module).__name__}"
                        f".forward{tuple(parameters)}, every one without a default among them (missing: "
                        f"{missing or 'none'}; unknown: {unknown or 'none'})",
                        "name the example's inputs as forward's arguments", DataError)
    return given, {n: fixed.get(n, p.default) for n, p in parameters.items() if n not in given}


def train_only_ops(module: nn.Module, eval_graph: fx.Graph | None = None,
                   arguments: tuple[dict, dict] | None = None) -> list[str]:
    """What module's own code (mode-dependent submodules kept as calls) runs in train() but not in eval() (its
    eval-mode graph from `trace`, where the caller has it, traced with `arguments`): the targets of the ops only its
    train-mode graph has, else those it calls with other arguments (SDPA's dropout_p, functional batch_norm's
    training); ["code fx cannot trace"] where only eval mode traces."""
    train, evaluation = _ops(_traced(module, True, arguments)), _ops(eval_graph or _traced(module, False, arguments))
    if evaluation is None or train == evaluation:
        return []
    if train is None:
        return ["code fx cannot trace"]
    ops = {(op, target) for op, target, _ in evaluation}
    return ([target for op, target, _ in train if (op, target) not in ops]
            or [f"{target} with other arguments" for op, target, args in train if (op, target, args) not in evaluation]
            or ["ops in another order"])
