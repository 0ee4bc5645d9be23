"""Tracing a model whose forward branches on its input: torch.fx with the example input running alongside.

`torch.fx.symbolic_trace` cannot decide `assert x.dim() == 4`, `if x.shape[1] != self.channels:` or
`for i in range(x.size(1))`: its values are symbols. Here every traced value also carries what the model
computes on the example input, so such Python control flow takes the example's way and the graph records
the tensor ops that way leads to (sizes used as tensor arguments stay symbolic: a reshape by x.size(0) keeps
any batch size). A graph is only accepted when it computes what the model computes on the example and on
other batch sizes; control flow that depends on tensor values elsewhere would still be frozen, so prepare
says that it traced this way.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace

from qatkit.prepare.modes import LeafTracer, Proxy, traced_graph


_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
# Tensor factories whose sizes may come from the input (torch.zeros(x.size(0), h), torch.arange(x.size(1))):
# PyTorch's argument parser refuses a proxy as a size, so they are recorded as graph nodes while tracing.
FACTORIES = ("zeros", "ones", "full", "arange")
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}
# torch.finfo(x.dtype).min (a mask's fill value), torch.tensor(√d, dtype=x.dtype) (Gemma's embedding scale): the
# example's dtype decides them, constants in the graph.
DECIDED = ("finfo", "iinfo", "tensor")


class _Concrete:
    """Python conversions of a proxy use the example's value."""

    def __len__(self) -> int:  # of a tensor: its first size
        return len(self.tracer.decide(self, shape_only=False))

    def __index__(self) -> int:
        return int(self.tracer.decide(self))

    def __int__(self) -> int:
        return int(self.tracer.decide(self))

    def __float__(self) -> float:
        return float(self.tracer.decide(self))

    def __getattr__(self, k: str) -> fx.proxy.Attribute:  # x.shape: its len() is a decision too
        return _ShadowAttribute(self, k)


class _ShadowProxy(_Concrete, Proxy):
    pass


class _ShadowAttribute(_Concrete, fx.proxy.Attribute):
    pass


class ConcreteTracer(LeafTracer):
    """Buffers are graph values as in LeafTracer (a causal mask sliced by the input's length stays symbolic), and
    static: Python code may branch on them, the same way for every input."""

    def __init__(self, shadow: nn.Module, example: dict[str, object], fixed: dict[str, object]):
        super().__init__()
        self.shadow, self.example, self.fixed = shadow, example, fixed  # shadow: a copy of the root, on the example
        self.values: dict[fx.Node, object] = {}
        self.static: set[fx.Node] = set()  # nodes computed from shapes, sizes, dtypes and constants only
        self.decisions = 0  # Python branches, asserts and loop counts taken from the example

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShadowProxy(node, self)

    def decide(self, proxy: fx.Proxy, shape_only: bool = True):
        """The example's value where Python needs one (a branch, an assert, a loop count, a length): only
        values computed from shapes, sizes and types; a branch on tensor values would freeze one input's way."""
        if shape_only and proxy.node not in self.static:
            raise fx.proxy.TraceError(f"Python control flow on tensor values (node '{proxy.node.name}') would follow "
                                      "the example's way on every input; branch on shapes, or use torch.where")
        self.decisions += 1
        return self.values[proxy.node]

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxies = []
        real = fx.node.map_aggregate((args, kwargs), lambda a: (proxies.append(a), self.values[a.node])[1]
                                     if isinstance(a, fx.Proxy) else a)
        if (kind == "get_attr" or (kind == "call_method" and target in _SHAPE_METHODS)
                or (kind == "call_function" and target is getattr and args[1] in _SHAPE_ATTRIBUTES)
                or (kind in ("call_function", "call_method") and proxies and all(p.node in self.static for p in proxies))):
            self.static.add(proxy.node)
        patched = nn.Module.__call__, nn.Module.__getattr__
        # the trace patches every module's call and attribute access; the example's values come from plain calls
        nn.Module.__call__, nn.Module.__getattr__ = _symbolic_trace._orig_module_call, _symbolic_trace._orig_module_getattr
        try:
            with torch.no_grad():
                self.values[proxy.node] = self._compute(kind, target, *real)
        finally:
            nn.Module.__call__, nn.Module.__getattr__ = patched
        return proxy

    def _compute(self, kind: str, target, args, kwargs):
        if kind == "placeholder":  # an input of the example, a fixed argument (fx names it "<name>_<n>"), **kwargs
            if target in self.example:
                return self.example[target]
            if target.startswith("*"):  # forward's *args / **kwargs, given nothing
                return {} if target.startswith("**") else ()
            return self.fixed.get(target.rsplit("_", 1)[0], args[0])
        if kind == "get_attr":
            return functools.reduce(getattr, target.split("."), self.shadow)
        if kind == "call_module":
            return self.shadow.get_submodule(target)(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.decide(obj))

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(len(self.decide(obj, shape_only=False)))])


def concrete_trace(module: nn.Module, arguments: tuple[dict, dict]) -> tuple[fx.GraphModule, int, list[int]]:
    """The module's graph along the example's control flow (`arguments`: modes.example_arguments' inputs by name and
    fixed arguments, such as `attention_mask=None`, which forward's code sees: `if mask is None` decides), how many
    decisions the example made, and the batch sizes it was checked on.

    Raises ValueError when the graph does not compute what the module does on the example, on its first
    sample alone and on the example twice over (a branch on the batch size, or on tensor values); a batch
    the model itself refuses (BatchNorm on one sample in training mode) is not checked."""
    example, fixed = arguments
    tracer = ConcreteTracer(copy.deepcopy(module), example, fixed)
    originals = {name: getattr(torch, name) for name in FACTORIES + DECIDED}
    for name, fn in originals.items():
        setattr(torch, name, _recorded(tracer, fn) if name in FACTORIES else _decided(tracer, fn))
    try:
        graph = traced_graph(tracer, module, arguments)
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
    gm = fx.GraphModule(module, graph, type(module).__name__)
    gm.graph.eliminate_dead_code(_in_place)  # the size arithmetic that only fed decisions
    gm.recompile()
    checked = []
    for change in (lambda a: a, lambda a: a[:1], lambda a: torch.cat([a, a])):
        args = {k: change(a) if isinstance(a, torch.Tensor) else a for k, a in example.items()}
        size = len(next(a for a in args.values() if isinstance(a, torch.Tensor)))
        agrees = _agrees(module, gm, args, fixed)
        if agrees is None:  # the model's own refusal of this batch size: nothing to compare
            continue
        if not agrees:
            seq_first = [n for n, m in module.named_modules() if getattr(m, "batch_first", True) is False]
            raise ValueError(f"the graph traced along the example input differs from the model on a batch of "
                             f"{size} (its forward branches on the batch size or on tensor values" + (
                                 f", or the batch is not axis 0: {', '.join(seq_first)} step along it; build them "
                                 "with batch_first=True" if seq_first else "") + ")")
        checked.append(size)
    return gm, tracer.decisions, checked


def input_sizes(module: nn.Module, gm: fx.GraphModule, arguments: tuple[dict, dict]) -> dict[str, list[int | None]]:
    """Which sizes of the example's tensor inputs the graph follows: per input (by name), per axis, None where the graph
    computes what `module` computes at other sizes (the batch axis; a length or an image size, as a symbolic trace
    keeps them), else the example's size (the graph differs from the module at another size, as a loop unrolled along
    the example does, or the module takes no other size). Probed on the example twice over along an axis, and on its
    first half (a model with a longest length); the axes of that size change together (a text's ids and attention
    mask, an image's height and width), one at a time where the module takes no other size of them all (_agrees).
    Probed on one sample, or on the whole example where the module takes no one sample (a graph: its nodes' features
    and its edges (2, E), E free)."""
    example, fixed = arguments
    tensors = {k: a[:1] for k, a in example.items() if isinstance(a, torch.Tensor)}  # (one sample: the batch is free)
    if _agrees(module, gm, {**example, **tensors}, fixed) is None:  # the module takes no one sample (a graph's nodes
        tensors = {k: a for k, a in example.items() if isinstance(a, torch.Tensor)}  # and edges): the example as is
    sizes = {k: [None] + list(a.shape[1:]) for k, a in tensors.items()}

    def follows(members: list[tuple[str, int]], n: int) -> bool | None:
        """Whether the graph equals the module with these axes (of size n) at half and twice n; None where the module
        runs neither."""
        verdicts = []
        for new in (2 * n, n // 2) if n > 1 else (2,):
            resized = dict(tensors)
            for k, axis in members:
                resized[k] = torch.cat([resized[k]] * 2, axis) if new > n else resized[k].narrow(axis, 0, new)
            verdicts.append(_agrees(module, gm, {**example, **resized}, fixed))
        verdicts = [v for v in verdicts if v is not None]  # (sizes the module takes)
        return all(verdicts) if verdicts else None

    for n in dict.fromkeys(n for a in tensors.values() for n in a.shape[1:]):
        members = [(k, axis) for k, a in tensors.items() for axis in range(1, a.dim()) if a.shape[axis] == n]
        verdict = follows(members, n)
        if verdict is None and len(members) > 1:  # the model takes no other size of them all: one at a time (a video's
            free = [m for m in members if follows([m], n)]  # depth of 3 beside its 3 channels)
        else:
            free = members if verdict else []
        for k, axis in free:
            sizes[k][axis] = None
    return sizes


def _agrees(module: nn.Module, gm: fx.GraphModule, args: dict, fixed: dict) -> bool | None:
    """Whether the graph computes what the module does on `args` (by name; the module also gets the `fixed` ones): run
    on copies (a forward may change its module: HF Swin's window size) from one random seed (a dropout draws alike);
    False where the graph fails, None where the module itself refuses the input."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            expected = copy.deepcopy(module)(**args, **fixed)
        except Exception:  # noqa: BLE001 - the model's own refusal: nothing to compare
            return None
        torch.manual_seed(0)
        try:  # (forward: no traceback printed)
            got = copy.deepcopy(gm).forward(**args)
        except Exception:  # noqa: BLE001 - the graph fails where the model runs
            return False
    return _same(got, expected)


def _recorded(tracer: ConcreteTracer, fn):
    """`fn` as a graph node when a size is symbolic, else `fn` itself."""

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        symbolic = []
        fx.node.map_aggregate((args, kwargs), lambda a: symbolic.append(a) if isinstance(a, fx.Proxy) else None)
        return tracer.create_proxy("call_function", fn, args, kwargs) if symbolic else fn(*args, **kwargs)

    return factory


def _decided(tracer: ConcreteTracer, fn):
    """`fn` of the example's values where its arguments are symbolic (a dtype: a decision, like a branch)."""

    @functools.wraps(fn)
    def decided(*args, **kwargs):
        args, kwargs = fx.node.map_aggregate((args, kwargs), lambda a: tracer.decide(a) if isinstance(a, fx.Proxy) else a)
        return fn(*args, **kwargs)

    return decided


def _in_place(node: fx.Node) -> bool:
    """Kept though nothing uses its result: `mask.masked_fill_(...)` (BART's causal mask) changes a tensor in place."""
    return node.is_impure() or (node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
