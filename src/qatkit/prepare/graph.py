"""Graph rewrite of a torch.fx-traced model into its QAT form.

1. Conv/ConvTranspose/Linear (per the layer plan) become QAT wrappers; a BatchNorm right after a conv is folded
   into it and a ReLU/ReLU6 right after is fused into its output range. F.dropout (dropout2d, …) calls become
   nn.Dropout modules (tracing froze their `training` argument to the mode at prepare time).
2. Activation quantizers go exactly where an integer runtime quantizes: before every quantized
   layer whose input is not already integer (the graph input, a sigmoid, a LayerNorm...), at the
   output of every quantized layer that does not feed the graph output directly, and at the output
   of residual adds, concatenations and average pools whose inputs are all integer, and at both inputs and
   the output of a matmul of two activations (attention; `matmul_bits`). Ops that keep
   values on the integer grid (max pool, ReLU, reshapes) pass quantization through.
3. Bit-widths: a layer's input has the layer's act bits; the inputs of residual adds and average pools
   (the skip path) have `residual_bits`, a matmul's inputs `matmul_bits`. A value that feeds both is quantized at the wider width and
   requantized for the narrower layers (an integer runtime's DequantizeLinear → QuantizeLinear).
4. A quantized layer is called as `layer(x, in_q)`, `in_q` being the quantizer that produced x, so
   it knows the input scale for its int32 bias and its integer forward.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from qatkit.config import QATConfig
from qatkit.convert import ops
from qatkit.nn import (FoldedBn, QAdd, QConv, QConvBn, QConvTranspose, QConvTransposeBn, QEmbedding, QGlobalAvgPool,
                       QLinear, QLinearBn, QMatMul)
from qatkit.prepare.rules import LAYER_TYPES, LayerPlan, layer_type, plan_for
from qatkit.quantizer import FakeQuantizer

WRAPPERS = {nn.Conv1d: QConv, nn.Conv2d: QConv, nn.Conv3d: QConv, nn.ConvTranspose1d: QConvTranspose,
            nn.ConvTranspose2d: QConvTranspose, nn.ConvTranspose3d: QConvTranspose, nn.Linear: QLinear,
            nn.Embedding: QEmbedding}
# (nn.SyncBatchNorm, BN of any rank synchronised across processes, folds after each of them)
FOLDABLE_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
               nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d,
               nn.ConvTranspose3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}  # (a Linear's: on its (N, C) output)
WRAPPERS_WITH_BN = {QConv: QConvBn, QConvTranspose: QConvTransposeBn, QLinear: QLinearBn}
FUSABLE_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
FUSABLE_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
# Ops whose output stays on the input's integer grid: quantization passes through them.
GRID_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout, nn.Identity, nn.ReLU,
                           nn.PixelShuffle)
# (those the integer model applies to codes, and ReLU and dropout)
GRID_PRESERVING_FUNCTIONS = {*ops.CODE_PRESERVING_FUNCTIONS, F.relu, torch.relu, F.dropout}
DROPOUT_FUNCTIONS = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                     F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                     F.feature_alpha_dropout: nn.FeatureAlphaDropout}
GRID_PRESERVING_METHODS = ops.CODE_PRESERVING_METHODS | {"relu"}
SHAPE_OPS = {getattr, "size", "dim"}  # shape arithmetic, not tensor compute
# Masks from the graph's inputs (`ids != 0`, then `.float()`): comparisons and casts of booleans are exact,
# and integer ops in the runtime (ONNX Equal/Not/Cast on int64 ids), not float islands.
# (x.ne(y) and torch.ne(x, y) are respelled x != y first: _Rewriter._respell)
MASK_FUNCTIONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.invert,
                  operator.and_, operator.or_, torch.logical_not, torch.tril, torch.triu, torch.where, torch.meshgrid,
                  torch.cumsum, torch.argmax, torch.argmin, ops.setitem}
MASK_METHODS = {"logical_not", "float", "long", "int", "bool", "to", "type_as", "tril", "triu", "cumsum", "argmax",
                "argmin"}
COMPARISONS = {name: getattr(torch, name) for name in ("eq", "ne", "lt", "le", "gt", "ge")}  # method: function
# Tensors made from sizes and constants (torch.arange(L), x.new_zeros(B, h), torch.zeros_like(x)): exact like
# masks, whatever their inputs.
FACTORY_FUNCTIONS = {torch.zeros, torch.ones, torch.full, torch.arange, torch.linspace, torch.zeros_like,
                     torch.ones_like, torch.full_like}
FACTORY_METHODS = {"new_zeros", "new_ones", "new_full"}
# Ops whose result may share memory with their first argument (a view of it, or the tensor itself: x += y returns x,
# dropout in eval x): an in-place op on one changes the other. Any other op's result is a tensor of its own.
ALIASING_FUNCTIONS = {operator.getitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.flatten,
                      torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk,
                      torch.split, torch.unbind, torch.unflatten, torch.narrow, torch.select, torch.t, torch.detach,
                      *DROPOUT_FUNCTIONS}
ALIASING_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
                    "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "chunk", "split", "unbind", "narrow",
                    "select", "to", "type", "type_as", "float", "long", "int", "bool", "detach", "as_strided"}
# In-place functions (F.relu_, torch.sigmoid_, F.hardtanh_: x's change is the result) and their functional form.
IN_PLACE_FUNCTIONS = {F.relu_: F.relu, torch.relu_: torch.relu, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh,
                      F.hardtanh_: F.hardtanh, F.leaky_relu_: F.leaky_relu, F.elu_: F.elu, F.celu_: F.celu,
                      F.selu_: F.selu, torch.clamp_: torch.clamp, torch.clamp_min_: torch.clamp_min,
                      torch.clamp_max_: torch.clamp_max}
# Functions (and the same-named tensor methods) written out in ops the integer model and ONNX export know
# (_written_out); torch.special's aliases as the functions they are.
WRITTEN_OUT = {torch.clip: "clip", torch.trunc: "trunc", torch.fix: "trunc", torch.frac: "frac",
               torch.remainder: "remainder", torch.fmod: "fmod", torch.logsumexp: "logsumexp",
               torch.logical_and: "logical_and", torch.logical_or: "logical_or", torch.logical_xor: "logical_xor",
               torch.outer: "outer", torch.ger: "outer", F.cosine_similarity: "cosine_similarity",
               torch.cosine_similarity: "cosine_similarity", F.pairwise_distance: "pairwise_distance",
               torch.pairwise_distance: "pairwise_distance", torch.special.erf: "erf", torch.special.expit: "sigmoid",
               torch.sort: "sort", torch.argsort: "argsort", torch.expm1: "expm1", torch.exp2: "exp2",
               torch.log2: "log2", torch.log10: "log10", torch.addcmul: "addcmul", torch.addcdiv: "addcdiv",
               torch.lerp: "lerp", torch.hypot: "hypot", torch.logit: "logit", torch.special.logit: "logit",
               torch.isnan: "isnan", torch.nan_to_num: "nan_to_num", torch.cdist: "cdist", torch.log1p: "log1p",
               torch.square: "square", torch.minimum: "minimum", torch.maximum: "maximum", torch.swapaxes: "swapaxes",
               torch.swapdims: "swapaxes", torch.clamp_min: "clamp_min", torch.clamp_max: "clamp_max",
               torch.addmm: "addmm", torch.baddbmm: "baddbmm", torch.linalg.vector_norm: "vector_norm",
               torch.linalg.norm: "linalg_norm", torch.norm: "norm", torch.dist: "dist", torch.tile: "tile",
               torch.diff: "diff", F.pad: "pad", F.one_hot: "one_hot", torch.index_add: "index_add",
               torch.atan2: "atan2", torch.arctan2: "atan2", torch.logcumsumexp: "logcumsumexp", torch.any: "any",
               torch.all: "all"}
# Their tensor methods (x.clip(), x.fix(), x.addmm(...)): those of the functions' names that tensors have.
WRITTEN_OUT_METHODS = {fn.__name__: name for fn, name in WRITTEN_OUT.items() if hasattr(torch.Tensor, fn.__name__)}
# The same functions under another name (_written_out).
ALIASES = {"erf": torch.erf, "sigmoid": torch.sigmoid, "clip": torch.clamp, "minimum": torch.min, "maximum": torch.max}
# Methods the integer model knows in another spelling (_Rewriter._respell), so their in-place form is known too.
RESPELLED_METHODS = {"div", *WRITTEN_OUT_METHODS}
FUNCTIONAL_LAYERS = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
# Arithmetic on sizes (C // n_head, 1 / math.sqrt(head_dim)): shape arithmetic, exact like masks.
SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.truediv,
                   math.sqrt, math.ceil, math.floor}  # (math.ceil(H / stride): timm's padding to 'same')
ADAPTIVE_AVG_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
# Ops an integer runtime runs on integers and requantizes (QLinearAdd, QLinearConcat, QLinearAveragePool).
REQUANT_MODULES = (*ADAPTIVE_AVG_POOL_MODULES, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
REQUANT_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}


@dataclass
class PrepareInfo:
    """What prepare did, for the report: one row per layer, the added quantizers, what stayed float."""

    layers: list[dict] = field(default_factory=list)
    act_quantizers: list[str] = field(default_factory=list)
    train_only: list[str] = field(default_factory=list)  # modules whose inline train-mode ops QAT leaves out
    float_ops: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    unconvertible: list[str] = field(default_factory=list)  # float ops that convert will refuse
    traced_along_example: str = ""  # how the root was traced when torch.fx alone could not
    shared_quantizers: list[list[str]] = field(default_factory=list)  # exact_adds: paths that hold one quantizer
    # per input of the traced root, per axis: None where the graph follows other sizes (the batch), else the size it
    # holds (prepare/concrete.py input_sizes); empty without example inputs
    input_sizes: dict[str, list[int | None]] = field(default_factory=dict)
    input_kinds: dict[str, str] = field(default_factory=dict)  # the example's: "float" or "integer" (input_kind)
    error_penalty: tuple[tuple[str, float], ...] = ()  # the QATConfig's: what fit applies unless given its own


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fusable_act(node: fx.Node | None, modules: dict[str, nn.Module]) -> str | None:
    if node is None:
        return None
    if node.op == "call_module":
        return FUSABLE_ACT_MODULES.get(type(modules[node.target]))
    if node.op == "call_function" and len(node.args) == 1 and not node.kwargs.get("inplace", False):
        return FUSABLE_ACT_FUNCTIONS.get(node.target)
    return None


def _is(node: fx.Node, modules, module_types: tuple, functions: set, methods: set = frozenset()) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], module_types)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _in_place(node: fx.Node, modules) -> int:
    """Whether the op changes its first argument in place, one the integer model knows out of place: x.relu_() (its
    method without the _), x[index] = value, F.relu(x, inplace=True) (then the position of `inplace`, whose value
    it may also be given at), a module built with inplace=True; 0 where not."""
    if node.op == "call_method":
        return int(node.target.endswith("_") and node.target[:-1] in ops.METHODS | RESPELLED_METHODS)
    if node.op == "call_module":
        return int(getattr(modules[node.target], "inplace", False) is True)
    if node.op != "call_function" or not isinstance(node.args[0] if node.args else None, fx.Node):
        return 0
    if node.target is operator.setitem or node.target in IN_PLACE_FUNCTIONS:
        return 1
    try:
        position = list(inspect.signature(node.target).parameters).index("inplace")
    except (TypeError, ValueError):  # builtins without a signature; functions without the argument
        return 0
    given = node.args[position] if len(node.args) > position else node.kwargs.get("inplace", False)
    return position if given is True else 0


def _alias_root(x: fx.Node) -> fx.Node:
    """The tensor x is a view of (through views and x += y), or x."""
    while x.op in ("call_function", "call_method") and x.target in ALIASING_FUNCTIONS | ALIASING_METHODS:
        x = x.args[0]
    return x


def _call_args(node: fx.Node, names: tuple[str, ...]) -> dict:
    """A call's arguments by name (the first len(names) of its signature; None where not given)."""
    a = dict.fromkeys(names)
    a.update(zip(names, node.args), **{k: v for k, v in node.kwargs.items() if k in names})
    return a


def _pair_reads(node: fx.Node) -> list[tuple[fx.Node, int]] | None:
    """The users of a call that returns a pair (torch.var_mean, torch.median(x, dim)), each with the part it reads:
    x[0] or x.values 0, x[1] or x.indices 1; None where one reads it otherwise."""
    reads = []
    for user in node.users:
        part = user.args[1] if user.op == "call_function" and user.target in (operator.getitem, getattr) else None
        if part not in (0, 1, "values", "indices"):
            return None
        reads.append((user, part if type(part) is int else ("values", "indices").index(part)))
    return reads


def _along(dim: int, index: slice) -> tuple:
    """The getitem index of `index` along axis `dim` (negative: from the end), whatever x's rank."""
    return (*[slice(None)] * dim, index) if dim >= 0 else (Ellipsis, index, *[slice(None)] * (-1 - dim))


RANK = "qatkit_rank"  # node.meta key: the rank of the node's tensor on the example input (record_ranks)


def _global_mean_rank(node: fx.Node) -> int | None:
    """The rank (4 or 5) of x where `node` is x.mean(dims[, keepdim]) or torch.mean(x, dims[, keepdim]) over every
    spatial axis of an image or a volume (dims 2, 3[, 4] in any order or sign: a global average pool, as in timm's
    squeeze-excite `x.mean((2, 3), keepdim=True)` and ConvNeXt's head); None otherwise, or where x's rank is unknown
    (record_ranks found it on the example input). A mean over other axes (a LayerNorm written out) stays a mean."""
    if not ((node.op == "call_function" and node.target is torch.mean) or (node.op == "call_method"
                                                                           and node.target == "mean")):
        return None
    a = _call_args(node, ("input", "dim", "keepdim"))
    rank = a["input"].meta.get(RANK) if isinstance(a["input"], fx.Node) else None
    dims = a["dim"]
    if (rank not in (4, 5) or set(node.kwargs) - {"dim", "keepdim"} or not isinstance(a["keepdim"], (bool, type(None)))
            or not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims)):
        return None
    return rank if sorted(d % rank for d in dims) == list(range(2, rank)) else None


def _needs_rank(n: fx.Node) -> bool:
    """Whether respelling `n` needs its input's rank: a mean over several axes (_global_mean_rank), x.movedim,
    x.T, x.t(), x.tile(dims), x.index_add(dim, ...)."""
    if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    return ((n.target in (torch.mean, "mean") and isinstance(_call_args(n, ("input", "dim"))["dim"], (tuple, list)))
            or n.target in (torch.movedim, torch.moveaxis, "movedim", "moveaxis", torch.t, "t", torch.tile, "tile",
                            torch.index_add, "index_add", "index_add_")
            or (n.target is getattr and n.args[1] == "T"))


def record_ranks(gm: fx.GraphModule, example: dict[str, object]) -> None:
    """Set node.meta[RANK] of the input of each op whose respelling needs it (_needs_rank), from one run of a copy of
    the graph (a forward may change its module's state) on the example input (forward's arguments by name); nothing
    where the graph has no such op, or where it does not run on the example positionally (those ops then stay as
    written); and of each BatchNorm1d's input (a Linear's BN folds only on its (N, C) output)."""
    modules = dict(gm.named_modules())
    candidates = {n.args[0].name: n.args[0] for n in gm.graph.nodes if _needs_rank(n) or n.op == "call_module" and
                  isinstance(modules.get(n.target), (nn.BatchNorm1d, nn.SyncBatchNorm)) and n.args
                  and isinstance(n.args[0], fx.Node)}
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if not candidates or set(placeholders) - set(example):
        return

    class Ranks(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n.name in candidates and isinstance(out, torch.Tensor):
                candidates[n.name].meta[RANK] = out.dim()
            return out

    try:
        with torch.no_grad():
            Ranks(copy.deepcopy(gm)).run(*(example[name] for name in placeholders))
    except Exception:  # noqa: BLE001 - a graph that only runs by name: those ops stay as written
        return


def _var_arguments(node: fx.Node) -> tuple | None:
    """(x, dims, correction, keepdim) of x.var/std(dim, unbiased, keepdim) or (dim, correction=, keepdim=) over given
    axes; None for other spellings (every element: dim None)."""
    a = _call_args(node, ("input", "dim", "unbiased", "keepdim"))
    dims, correction = a["dim"], node.kwargs.get("correction")
    if isinstance(dims, int):
        dims = (dims,)
    if (not isinstance(dims, (tuple, list)) or not dims or not all(type(d) is int for d in dims)
            or set(node.kwargs) - {"dim", "unbiased", "keepdim", "correction"}
            or (correction is not None and a["unbiased"] is not None)):
        return None
    correction = correction if correction is not None else int(a["unbiased"] is not False)
    if type(correction) not in (int, float) or not isinstance(a["keepdim"], (bool, type(None))):
        return None
    return a["input"], tuple(dims), correction, bool(a["keepdim"])


def _moved(node: fx.Node) -> list[int] | None:
    """The permutation that x.movedim(source, destination) is, from x's rank (record_ranks); None where unknown."""
    a = _call_args(node, ("input", "source", "destination"))
    rank, source, destination = a["input"].meta.get(RANK), a["source"], a["destination"]
    source, destination = ([v] if type(v) is int else v for v in (source, destination))
    if (not isinstance(rank, int) or not isinstance(source, (list, tuple)) or not isinstance(destination, (list, tuple))
            or len(source) != len(destination) or not all(type(v) is int for v in [*source, *destination])):
        return None
    source, destination = [v % rank for v in source], [v % rank for v in destination]
    rest = iter(d for d in range(rank) if d not in source)
    moved = dict(zip(destination, source))
    return [moved[i] if i in moved else next(rest) for i in range(rank)]


def _rot90(node: fx.Node) -> tuple | None:
    """(x, k mod 4, dims) of torch.rot90(x, k=1, dims=(0, 1)) / x.rot90(k, dims) with constant arguments; else None."""
    a = _call_args(node, ("input", "k", "dims"))
    k, dims = 1 if a["k"] is None else a["k"], (0, 1) if a["dims"] is None else a["dims"]
    if type(k) is not int or not isinstance(dims, (tuple, list)) or [type(d) for d in dims] != [int, int]:
        return None
    return a["input"], k % 4, tuple(dims)


def _index_of(node: fx.Node, name: str) -> tuple | None:
    """The index x[...] that computes x.narrow(dim, start, length) (start ≥ 0) or x.index_select(dim, index): a
    slice or the index tensor at axis dim; None where the arguments are not those."""
    if name == "narrow":
        a = _call_args(node, ("input", "dim", "start", "length"))
        if not all(type(a[k]) is int for k in ("dim", "start", "length")) or a["start"] < 0:
            return None
        at, dim = slice(a["start"], a["start"] + a["length"]), a["dim"]
    else:
        a = _call_args(node, ("input", "dim", "index"))
        if type(a["dim"]) is not int or not isinstance(a["index"], fx.Node):
            return None
        at, dim = a["index"], a["dim"]
    return (slice(None),) * dim + (at,) if dim >= 0 else (Ellipsis, at) + (slice(None),) * (-dim - 1)


def _fetch(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _describe(node: fx.Node, modules, plans) -> str:
    if node.op == "call_module":
        skipped = ", skipped by rule" if getattr(plans.get(node.target), "skip", False) else ""
        return f"{node.target} ({type(modules[node.target]).__name__}{skipped})"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def _matmul_plan(equation: str, operands: int) -> tuple[list[int], list[int], list[int]] | None:
    """For an einsum equation of two operands that is a batched matrix product (the same batch letters in both,
    one letter summed over, one kept from each, each letter once per term): the permutations of a to
    (batch, i, k), of b to (batch, k, j) and of their product (batch, i, j) to the output; None otherwise."""
    eq = equation.replace(" ", "")
    if operands != 2 or "." in eq or eq.count("->") != 1 or eq.count(",") != 1:
        return None
    terms, out = eq.split("->")
    a, b = terms.split(",")
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    batch = [c for c in out if c in a and c in b]
    summed = [c for c in a if c in b and c not in out]
    i, j = [c for c in a if c not in b], [c for c in b if c not in a]
    if len(summed) != 1 or len(i) != 1 or len(j) != 1 or sorted(out) != sorted(batch + i + j):
        return None
    middle = batch + i + j
    return ([a.index(c) for c in batch + i + summed], [b.index(c) for c in batch + summed + j],
            [middle.index(c) for c in out])


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, config: QATConfig, plans: dict[str, LayerPlan], root: nn.Module):
        self.gm, self.graph, self.config, self.plans, self.root = gm, gm.graph, config, plans, root
        self.modules = dict(gm.named_modules())
        self.info = PrepareInfo()
        self.wrapped: dict[fx.Node, LayerPlan] = {}
        self.wrapped_targets: set[str] = set()
        self.quantized: dict[fx.Node, str] = {}  # node whose output is integer -> its quantizer's path
        self.inserted: dict[fx.Node, fx.Node] = {}  # float node -> quantizer node added after it
        self.erased: set[fx.Node] = set()
        self.masks: set[fx.Node] = set()  # graph inputs and the exact masks computed from them
        self.sizes: set[fx.Node] = set()  # x.size(), x.shape and arithmetic on them (also masks)
        self.changes: list[fx.Node] = []  # in-place ops left as written, in graph order (_respell)

    def run(self) -> PrepareInfo:
        for node in list(self.graph.nodes):  # (all first: a layer's first/last bits look at the layer calls after it)
            self._linear_by_matmul(node)
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target in FUNCTIONAL_LAYERS:
                self._functional_layer(node)
            elif node.op == "call_function" and node.target is F.embedding:
                self._functional_embedding(node)
            else:
                self._respell(node)
        self.calls = Counter(n.target for n in self.graph.nodes if n.op == "call_module")
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
                self._dropout_module(node)
            elif node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                self._attention(node)
            elif node.op == "call_function" and node.target is torch.einsum:
                self._einsum(node)
            elif node.op == "call_module" and layer_type(self.modules[node.target]) in WRAPPERS:
                self._wrap(node)
        self.modules = dict(self.gm.named_modules())
        for node in list(self.graph.nodes):
            if node not in self.erased:
                self._place_quantizers(node)
        self._assign_bits()
        if self.config.exact_adds:
            self._share_skip_quantizers()
        self.gm.delete_all_unused_submodules()
        self.graph.lint()
        self.gm.recompile()
        return self.info

    def _keeps_grid(self, node: fx.Node) -> bool:
        """Moves or selects values without computing new ones (in eval mode: drop path is the identity there)."""
        return (_is(node, self.modules, GRID_PRESERVING_MODULES, GRID_PRESERVING_FUNCTIONS, GRID_PRESERVING_METHODS)
                or (node.op == "call_module" and ops.identity_in_eval(self.modules[node.target]))
                or (_is(node, self.modules, (), set(ops.REDUCE_FUNCTIONS), ops.REDUCE_METHODS)
                    and ops.reduces(node.args, node.target))
                or (node.op == "call_function" and node.target is getattr and node.args[1] == "values"))

    def _attention(self, node: fx.Node) -> None:
        """F.scaled_dot_product_attention as the ops it computes: softmax(q·kᵀ·scale (+ mask)) (→ dropout) · v, so
        that both matmuls run on integers (QMatMul); a causal mask from positions (torch.arange, >), attn_mask
        applied as SDPA does (ops.masked_scores), dropout_p as an nn.Dropout that follows train()/eval(),
        enable_gqa as SDPA's repeat_interleave of the key and value heads."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, (None, None, None, None, 0.0, False, None, False)))
        a.update(zip(names, node.args), **node.kwargs)
        g, q, k, v = self.graph, a["query"], a["key"], a["value"]
        with g.inserting_before(node):
            if a["enable_gqa"]:  # grouped-query attention: each key/value head serves Hq / Hkv query heads, as SDPA
                heads = (g.call_method("size", (t, -3)) for t in (q, k))
                groups = g.call_function(operator.floordiv, tuple(heads))
                k, v = (g.call_method("repeat_interleave", (t, groups, -3)) for t in (k, v))
            scale = a["scale"]
            if scale is None:  # 1/√E, E = q.size(-1)
                scale = g.call_function(operator.truediv, (1.0, g.call_function(math.sqrt, (g.call_method("size", (q, -1)),))))
            scores = g.call_function(operator.mul, (
                g.call_function(operator.matmul, (q, g.call_method("transpose", (k, -2, -1)))), scale))
            if a["is_causal"]:  # position j > i is masked (the upper triangle, as SDPA's tril)
                rows = g.call_function(torch.arange, (g.call_method("size", (q, -2)),))
                cols = g.call_function(torch.arange, (g.call_method("size", (k, -2)),))
                future = g.call_function(operator.gt, (g.call_function(operator.getitem, (cols, (None, slice(None)))),
                                                       g.call_function(operator.getitem, (rows, (slice(None), None)))))
                scores = g.call_method("masked_fill", (scores, future, float("-inf")))
            if a["attn_mask"] is not None:
                scores = g.call_function(ops.masked_scores, (scores, a["attn_mask"]))
            weights = g.call_method("softmax", (scores, -1))
            if a["dropout_p"]:
                path = f"dropout_{node.name}"
                self.gm.add_submodule(path, nn.Dropout(a["dropout_p"]))
                weights = g.call_module(path, (weights,))
            out = g.call_function(operator.matmul, (weights, v))
        self._replace(node, out)

    def _einsum(self, node: fx.Node) -> None:
        """torch.einsum of two tensors that is a batched matrix product ("bhid,bhjd->bhij"): permutes around a
        matmul, so that it runs on integers (QMatMul) as `@` does; other equations stay einsum (a float op)."""
        equation, *operands = node.args
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        plan = _matmul_plan(equation, len(operands)) if isinstance(equation, str) and not node.kwargs else None
        if plan is None:
            return
        g = self.graph
        with g.inserting_before(node):
            a, b = (t if p == sorted(p) else g.call_method("permute", (t, *p)) for t, p in zip(operands, plan[:2]))
            out = g.call_function(operator.matmul, (a, b))
            if plan[2] != sorted(plan[2]):
                out = g.call_method("permute", (out, *plan[2]))
        self._replace(node, out)

    def _respell(self, node: fx.Node) -> None:
        """An op spelled as the op the integer model knows: torch.topk as ops.topk (ONNX's order among equal values),
        x.type(dtype) as x.to(dtype) (GPT-2), x.expand_as(y) as x.expand(y.size()) (DistilBERT), x.view_as(y) and
        x.reshape_as(y) as x.view/reshape(y.size()), torch.bmm (BART) and torch.mm as @, torch.var_mean/std_mean as
        var/std and mean, x.ne(y) and torch.ne(x, y) as x != y (RoBERTa), x.add(y) and torch.sub(x, y,
        alpha=a) as x + y and x - y·a (prepare quantized torch.add(x, y, alpha=2) as x + y), x.div(y) and torch.div(x,
        y, rounding_mode="floor") as x / y and x // y, rounding_mode="trunc" from x // y; an in-place op (x.relu_(),
        F.relu(x, inplace=True), nn.ReLU(inplace=True), x[index] = value: _in_place) whose change nothing else shows
        (_unobserved) as its
        functional form, whose result x's later uses read (BART's causal mask: `mask.masked_fill_(cond, 0)` after
        `torch.full`; an item assignment as ops.setitem: Hugging Face's Swin mask; an in-place module stays one, its
        input's later uses rewired)."""
        g, method = self.graph, node.target if node.op == "call_method" else None
        if node.target is torch.topk or method == "topk":
            node.op, node.target = "call_function", ops.topk
        elif method == "type" and len(node.args) == 2 and isinstance(node.args[1], (torch.dtype, fx.Node)):
            node.target = "to"
        elif method == "expand_as" and len(node.args) == 2:
            with g.inserting_before(node):
                node.args = (node.args[0], g.call_method("size", (node.args[1],)))
            node.target = "expand"
        elif method in ("view_as", "reshape_as") and len(node.args) == 2:  # x.view_as(y): x.view(y.size())
            with g.inserting_before(node):
                node.args = (node.args[0], g.call_method("size", (node.args[1],)))
            node.target = method[:-3]
        elif node.target in (torch.bmm, torch.mm) or method in ("bmm", "mm"):
            node.op, node.target = "call_function", operator.matmul
        elif (node.target in (torch.var_mean, torch.std_mean) and (reads := _pair_reads(node)) is not None
              and _var_arguments(node) is not None):  # (var or std, mean): the two as written out below
            x, dims, _, keepdim = _var_arguments(node)
            with g.inserting_before(node):
                spread = g.call_function(torch.var if node.target is torch.var_mean else torch.std, node.args,
                                         node.kwargs)
                mean = g.call_method("mean", (x, dims), {"keepdim": bool(keepdim)})
            self._split(node, reads, (spread, mean))
            self._respell(spread)
        elif (method in ("median", "kthvalue") or node.target in (torch.median, torch.kthvalue)) and (
                self._order_statistic(node, method or node.target.__name__)):
            pass  # (rewritten there)
        elif method in COMPARISONS or node.target in COMPARISONS.values():  # ids.ne(pad) (RoBERTa's positions)
            node.op, node.target = "call_function", getattr(operator, method or node.target.__name__)
        elif ((method in ("add", "sub") or node.target in (torch.add, torch.sub)) and len(node.args) == 2
              and set(node.kwargs) <= {"alpha"}):  # x.add(y), torch.sub(x, y, alpha=a): x + y, x - y·a
            x, y = node.args
            if node.kwargs.get("alpha", 1) != 1:  # (torch rounds y·a + x once; the integer model and ONNX twice)
                with g.inserting_before(node):
                    y = g.call_function(operator.mul, (y, node.kwargs["alpha"]))
            combine = operator.add if (method or node.target.__name__) == "add" else operator.sub
            node.op, node.target, node.args, node.kwargs = "call_function", combine, (x, y), {}
        elif ((method == "div" or node.target is torch.div) and len(node.args) == 2
              and node.kwargs.get("rounding_mode") == "trunc" and set(node.kwargs) == {"rounding_mode"}):
            x, y = node.args  # x // y, one more where the quotient is negative and not whole (of ints: ints)
            with g.inserting_before(node):
                call = g.call_function
                floor = call(operator.floordiv, (x, y))
                below_x, below_y = (call(operator.lt, (v, 0)) if isinstance(v, fx.Node) else v < 0 for v in (x, y))
                if isinstance(below_x, fx.Node) and isinstance(below_y, fx.Node):
                    negative = call(operator.ne, (below_x, below_y))
                else:  # one a number: the other's test, negated where the number is negative
                    test, number = (below_x, below_y) if isinstance(below_x, fx.Node) else (below_y, below_x)
                    negative = call(operator.invert, (test,)) if number else test
                inexact = call(operator.ne, (call(operator.mod, (x, y)), 0))
                out = call(torch.where, (call(operator.and_, (negative, inexact)), call(operator.add, (floor, 1)),
                                         floor))
            self._replace(node, out)
        elif ((method == "div" or node.target is torch.div) and len(node.args) == 2
              and node.kwargs.get("rounding_mode") in (None, "floor") and set(node.kwargs) <= {"rounding_mode"}):
            divide = operator.floordiv if node.kwargs.get("rounding_mode") == "floor" else operator.truediv
            node.op, node.target, node.kwargs = "call_function", divide, {}  # x.div(y), torch.div(x, y, "floor")
        elif (method in ("var", "std") or node.target in (torch.var, torch.std)) and (
                moments := _var_arguments(node)) is not None:  # mean of the squared deviations, as a LayerNorm
            x, dims, correction, keepdim = moments  # written out: ops the integer model knows
            with g.inserting_before(node):
                d = g.call_function(operator.sub, (x, g.call_method("mean", (x, dims), {"keepdim": True})))
                out = g.call_method("sum", (g.call_function(operator.mul, (d, d)), dims), {"keepdim": keepdim})
                n = g.call_method("size", (x, dims[0]))  # the count of values each sum adds
                for dim in dims[1:]:
                    n = g.call_function(operator.mul, (n, g.call_method("size", (x, dim))))
                out = g.call_function(operator.truediv, (out, g.call_function(operator.sub, (n, correction))))
                if (method or node.target.__name__) == "std":
                    out = g.call_method("sqrt", (out,))
            self._replace(node, out)
        elif (method in ("movedim", "moveaxis") or node.target in (torch.movedim, torch.moveaxis)) and (
                order := _moved(node)) is not None:
            node.op, node.target, node.args, node.kwargs = "call_method", "permute", (node.args[0], *order), {}
        elif (((node.op == "call_function" and node.target is getattr and node.args[1] == "T")
               or ((method == "t" or node.target is torch.t) and len(node.args) == 1))
              and isinstance(rank := node.args[0].meta.get(RANK), int)):  # x.T, x.t() (rank <= 2): axes reversed
            node.op, node.target, node.args = "call_method", "permute", (node.args[0], *range(rank - 1, -1, -1))
        elif (method == "rot90" or node.target is torch.rot90) and (turn := _rot90(node)) is not None:
            x, k, (a, b) = turn  # k quarter turns from axis a towards b: flips and a transpose (on the codes)
            with g.inserting_before(node):
                out = x
                if k == 2:
                    out = g.call_method("flip", (out, [a, b]))
                elif k:
                    out = g.call_method("transpose", (g.call_method("flip", (out, [b if k == 1 else a])), a, b))
            self._replace(node, out)
        elif node.op == "call_function" and node.target is getattr and node.args[1] in ("mT", "mH"):
            node.op, node.target, node.args = "call_method", "transpose", (node.args[0], -2, -1)  # (real tensors)
        elif (method in ("narrow", "index_select") or node.target in (torch.narrow, torch.index_select)) and (
                index := _index_of(node, method or node.target.__name__)) is not None:
            node.op, node.target, node.args, node.kwargs = "call_function", operator.getitem, (node.args[0], index), {}
        elif (rank := _global_mean_rank(node)) is not None:  # x.mean((2, 3)): the global average pool it is
            x, keepdim = node.args[0], _call_args(node, ("input", "dim", "keepdim"))["keepdim"]
            with g.inserting_before(node):
                out = g.call_function(F.adaptive_avg_pool2d if rank == 4 else F.adaptive_avg_pool3d, (x, 1))
                if not keepdim:
                    out = g.call_function(torch.flatten, (out, 1))
            self._replace(node, out)
        elif (out := self._written_out(node)) is not None:
            self._replace(node, out)
        elif in_place := _in_place(node, self.modules):
            order = {n: i for i, n in enumerate(g.nodes)}
            x = node.args[0]
            if not self._unobserved(x, node, order):  # QAT runs it as written (_last_change), convert refuses it
                node.meta[ops.UNSEEN_CHANGE] = (f"{_describe(node, self.modules, self.plans)} changes in place a "
                                                "tensor that shares memory with an input, a buffer or one read later "
                                                "(its base or another view of it)")
                self.info.unconvertible.append(node.meta[ops.UNSEEN_CHANGE])
                self.changes.append(node)
                return
            x.replace_all_uses_with(node, delete_user_cb=lambda user: order[user] > order[node])
            if node.target is operator.setitem:  # x[index] = value: ops.setitem(x, value, *index)
                _, index, value = node.args
                node.target, node.args = ops.setitem, (x, value, *(index if isinstance(index, tuple) else (index,)))
            elif method:
                node.target = method[:-1]
                self._respell(node)  # (x.add_(y, alpha=a) as x + y·a)
            elif node.target in IN_PLACE_FUNCTIONS:  # F.hardtanh_(x): F.hardtanh(x)
                node.target = IN_PLACE_FUNCTIONS[node.target]
                self._respell(node)  # (torch.clamp_min_(x, 0) as torch.clamp(x, min=0))
            elif node.op == "call_function":
                node.args, node.kwargs = node.args[:in_place], {**node.kwargs, "inplace": False}

    def _written_out(self, node: fx.Node) -> fx.Node | None:
        """WRITTEN_OUT's functions and methods in ops the integer model knows, inserted before `node` (the result, or
        None for any other node): ALIASES as the functions they name (torch.minimum/maximum of two tensors: the
        elementwise torch.min/max); swapaxes/swapdims as transpose; x.clamp_min(v) as x.clamp(min=v); log1p(x) as
        log(1 + x); x.square() as x ** 2 (x·x); trunc(x) as sign(x)·floor(|x|), frac(x) as x - trunc(x);
        remainder(x, y) and fmod(x, y) as x - floor(x / y)·y and x - trunc(x / y)·y; logsumexp as max + log Σ exp(x -
        max); logical_and/or/xor of the inputs as bools (&, |, !=); outer(a, b) as a[:, None]·b[None, :];
        cosine_similarity as the sum of F.normalize's products (PyTorch's formula, the same floats) and
        pairwise_distance as (x1 - x2 + eps).norm(p); torch.special.erf/expit as erf/sigmoid; sort and argsort as
        ops.topk of every value; expm1, exp2, log2 and log10 from exp and log; addcmul, addcdiv, lerp (both of
        PyTorch's forms), hypot, logit, isnan (x != x), nan_to_num (where and clamp), cdist (the pairs'
        differences' norm); addmm and baddbmm as β·input + α·(m1 @ m2); linalg.vector_norm, linalg.norm (vector and
        Frobenius; not other matrix norms), torch.norm and dist as x.norm (of the flat x over every value); tile as
        repeat; diff as slices; F.pad circular as the far ends of each axis joined to it; F.one_hot (given the number
        of classes) as ids == arange; index_add as scatter_add; atan2 from atan, logcumsumexp from a running sum of
        exp; any and all as counts of the non-zero (zero) values."""
        written = WRITTEN_OUT_METHODS if node.op == "call_method" else WRITTEN_OUT if node.op == "call_function" else {}
        if (name := written.get(node.target)) is None:
            return None
        g = self.graph
        call = g.call_function
        a = _call_args(node, {"clip": ("input", "min", "max"), "logsumexp": ("input", "dim", "keepdim"),
                              "sort": ("input", "dim", "descending"), "argsort": ("input", "dim", "descending"),
                              "cosine_similarity": ("x1", "x2", "dim", "eps"),
                              "pairwise_distance": ("x1", "x2", "p", "eps", "keepdim"),
                              "addcmul": ("input", "tensor1", "tensor2", "value"), "lerp": ("input", "end", "weight"),
                              "addcdiv": ("input", "tensor1", "tensor2", "value"), "logit": ("input", "eps"),
                              "nan_to_num": ("input", "nan", "posinf", "neginf"), "cdist": ("x1", "x2", "p"),
                              "addmm": ("input", "mat1", "mat2"), "baddbmm": ("input", "batch1", "batch2"),
                              "vector_norm": ("input", "ord", "dim", "keepdim"),
                              "linalg_norm": ("input", "ord", "dim", "keepdim"),
                              "norm": ("input", "p", "dim", "keepdim"),
                              "dist": ("input", "other", "p"), "tile": ("input", "dims"),
                              "diff": ("input", "n", "dim", "prepend", "append"), "pad": ("input", "pad", "mode"),
                              "one_hot": ("input", "num_classes"), "index_add": ("input", "dim", "index", "source"),
                              "logcumsumexp": ("input", "dim"), "any": ("input", "dim", "keepdim"),
                              "all": ("input", "dim", "keepdim")
                              }.get(name, ("input", "other")))
        x, y = list(a.values())[:2]

        def trunc(v):
            return call(operator.mul, (call(torch.sign, (v,)), call(torch.floor, (call(torch.abs, (v,)),))))

        with g.inserting_before(node):
            if name in ALIASES:
                return call(ALIASES[name], node.args, node.kwargs)
            if name == "swapaxes":
                return g.call_method("transpose", node.args, node.kwargs)
            if name in ("clamp_min", "clamp_max"):  # (one bound, by position or name)
                bound = name[-3:]
                value = node.args[1] if len(node.args) == 2 else node.kwargs.get(bound)
                return (call(torch.clamp, (x,), {bound: value})
                        if len(node.args) + len(node.kwargs) == 2 and value is not None else None)
            if name in ("log1p", "square"):  # (x alone)
                if len(node.args) != 1 or node.kwargs:
                    return None
                return (call(torch.log, (call(operator.add, (1.0, x)),)) if name == "log1p"
                        else call(operator.pow, (x, 2)))
            if name == "trunc":
                return trunc(x)
            if name in ("addmm", "baddbmm"):  # β·input + α·(m1 @ m2) (β = 0: input not read, as PyTorch)
                beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
                product = call(operator.matmul, tuple(a.values())[1:])
                product = product if alpha == 1 else call(operator.mul, (product, alpha))
                return product if beta == 0 else call(operator.add, (x if beta == 1 else call(operator.mul, (x, beta)),
                                                                     product))
            if name in ("vector_norm", "linalg_norm", "norm", "dist"):  # x.norm(p, dim, keepdim); over every value
                p = a["p"] if name in ("norm", "dist") else a["ord"]  # (dim None): the flat x's
                if name == "linalg_norm" and p not in (None, "fro") and not isinstance(a["dim"], int):
                    return None  # a matrix norm (nuclear, spectral, max column sums)
                p = ("fro" if name == "norm" else 2.0) if p is None else p
                x, dim, keep = (call(operator.sub, (x, y)), None, False) if name == "dist" else (x, a["dim"],
                                                                                                bool(a["keepdim"]))
                if dim is None:
                    return None if keep else g.call_method("norm", (call(torch.flatten, (x,)), p, 0))
                return None if node.target == "norm" else g.call_method("norm", (x, p, dim), {"keepdim": keep})
            if name == "tile":  # x.repeat(dims), fewer dims than axes padded with leading 1s
                dims = list(node.args[1:]) if len(node.args) > 2 else a["dims"]
                dims, rank = [dims] if type(dims) is int else dims, x.meta.get(RANK)
                if not isinstance(dims, (tuple, list)) or not isinstance(rank, int):
                    return None
                return g.call_method("repeat", (x, *[1] * (rank - len(dims)), *dims))
            if name == "atan2":  # atan(y / x), turned by π towards y's side where x < 0; on the y axis (x = ±0) ±π/2,
                y, x = x, y  # and at y = ±0 ±0 or ±π by the zeros' signs, as PyTorch's (x / 1 there: no NaN for
                zero = call(operator.eq, (x, 0.0))  # where's gradient to carry)

                def negative(v):  # v < 0, -0 included (1 / -0 = -inf)
                    return call(operator.or_, (call(operator.lt, (v, 0.0)),
                                               call(operator.lt, (call(operator.truediv, (1.0, v)), 0.0))))
                side = call(torch.where, (negative(y), -1.0, call(torch.ones_like, (y,))))  # (y's dtype)
                base = call(torch.atan, (call(operator.truediv, (y, call(torch.where, (zero, 1.0, x)))),))
                off_axis = call(torch.where, (call(operator.lt, (x, 0.0)),
                                              call(operator.add, (base, call(operator.mul, (side, math.pi)))), base))
                on_axis = call(torch.where, (call(operator.eq, (y, 0.0)), call(torch.where, (negative(x), call(
                    operator.mul, (side, math.pi)), call(operator.mul, (side, 0.0)))), call(operator.mul, (
                        side, math.pi / 2))))
                return call(torch.where, (zero, on_axis, off_axis))
            if name in ("any", "all"):  # the count of non-zero (zero) values along dim above 0 (at 0)
                test, count = (operator.ne, operator.gt) if name == "any" else (operator.eq, operator.eq)
                along = () if a["dim"] is None else (a["dim"],)
                counted = g.call_method("sum", (call(test, (x, 0)), *along), {"keepdim": bool(a["keepdim"])}
                                        if along else {})
                return call(count, (counted, 0))
            if name == "logcumsumexp":  # max + log Σ exp(x - max) along dim, running
                top = call(torch.amax, (x, a["dim"]), {"keepdim": True})
                running = call(torch.cumsum, (call(torch.exp, (call(operator.sub, (x, top)),)), a["dim"]))
                return call(operator.add, (call(torch.log, (running,)), top))
            if name == "one_hot":  # ids compared with 0 … n - 1 (n given: the classes are not read from the data)
                n = a["num_classes"]
                if type(n) is not int or n < 0:
                    return None
                classes = call(torch.arange, (n,), {"device": call(getattr, (x, "device"))})
                return g.call_method("long", (call(operator.eq, (call(torch.unsqueeze, (x, -1)), classes)),))
            if name == "index_add":  # x.scatter_add(dim, the index along dim expanded to source's shape, α·source)
                dim, source, alpha = a["dim"], a["source"], node.kwargs.get("alpha", 1)
                rank = x.meta.get(RANK)
                if type(dim) is not int or not (dim < 0 or isinstance(rank, int)):
                    return None
                trailing = -1 - dim if dim < 0 else rank - 1 - dim  # axes after dim
                index = g.call_method("expand", (g.call_method("view", (a["index"], -1, *[1] * trailing)),
                                                 g.call_method("size", (source,))))
                source = source if alpha == 1 else call(operator.mul, (source, alpha))
                return call(torch.scatter_add, (x, dim, index, source))
            if name == "diff":  # prepend and append joined to x along dim, then n times x[1:] - x[:-1] along it
                n, dim = 1 if a["n"] is None else a["n"], -1 if a["dim"] is None else a["dim"]
                parts = [v for v in (a["prepend"], x, a["append"]) if v is not None]
                out = call(torch.cat, (parts, dim)) if len(parts) > 1 else x
                for _ in range(n):
                    out = call(operator.sub, (call(operator.getitem, (out, _along(dim, slice(1, None)))),
                                              call(operator.getitem, (out, _along(dim, slice(None, -1))))))
                return out
            if name == "pad":  # mode "circular" (ONNX opset 17 has none): each axis's far ends joined to it, the
                pads = a["pad"]  # last axis first, as PyTorch pads
                if a["mode"] != "circular" or not isinstance(pads, (tuple, list)) or any(
                        type(v) is not int or v < 0 for v in pads):
                    return None
                out = x
                for i in range(len(pads) // 2):
                    before, after = pads[2 * i], pads[2 * i + 1]
                    dim = -1 - i
                    parts = ([call(operator.getitem, (out, _along(dim, slice(-before, None))))] if before else []) + [
                        out] + ([call(operator.getitem, (out, _along(dim, slice(None, after))))] if after else [])
                    out = call(torch.cat, (parts, dim)) if len(parts) > 1 else out
                return out
            if name in ("expm1", "exp2"):  # exp(x) - 1, exp(x·ln 2)
                return (call(operator.sub, (call(torch.exp, (x,)), 1.0)) if name == "expm1"
                        else call(torch.exp, (call(operator.mul, (x, math.log(2.0))),)))
            if name in ("log2", "log10"):  # log(x) / ln 2, log(x) / ln 10
                return call(operator.truediv, (call(torch.log, (x,)), math.log(2.0 if name == "log2" else 10.0)))
            if name in ("addcmul", "addcdiv"):  # x + value·(t1 ∘ t2)
                t = call(operator.mul if name == "addcmul" else operator.truediv, (a["tensor1"], a["tensor2"]))
                return call(operator.add, (x, t if a["value"] in (None, 1) else call(operator.mul, (t, a["value"]))))
            if name == "lerp":  # PyTorch's two forms: x + w·(end - x) where |w| < ½, else end - (end - x)·(1 - w)
                w, span = a["weight"], call(operator.sub, (y, x))
                near = call(operator.add, (x, call(operator.mul, (w, span))))
                far = call(operator.sub, (y, call(operator.mul, (span, call(operator.sub, (1.0, w))))))
                if not isinstance(w, fx.Node):
                    return near if abs(w) < 0.5 else far
                return call(torch.where, (call(operator.lt, (call(torch.abs, (w,)), 0.5)), near, far))
            if name == "hypot":
                return call(torch.sqrt, (call(operator.add, (call(operator.mul, (x, x)), call(operator.mul, (y, y)))),))
            if name == "logit":  # log(x / (1 - x)), x clamped to [eps, 1 - eps] when eps is given
                if a["eps"] is not None:
                    x = call(torch.clamp, (x, a["eps"], 1.0 - a["eps"]))
                return call(torch.log, (call(operator.truediv, (x, call(operator.sub, (1.0, x)))),))
            if name == "isnan":  # NaN is the value unequal to itself
                return call(operator.ne, (x, x))
            if name == "nan_to_num":  # NaN → nan (0), ±inf → the given values, else float32's largest finite
                big = torch.finfo(torch.float32).max
                out = call(torch.clamp, (x,), {"min": -big if a["neginf"] is None else a["neginf"],
                                                "max": big if a["posinf"] is None else a["posinf"]})
                return call(torch.where, (call(operator.ne, (x, x)), 0.0 if a["nan"] is None else a["nan"], out))
            if name == "cdist":  # ‖x1_i - x2_j‖_p of every pair: their differences' norm (PyTorch's direct form)
                diff = call(operator.sub, (call(torch.unsqueeze, (x, -2)), call(torch.unsqueeze, (y, -3))))
                return g.call_method("norm", (diff, 2.0 if a["p"] is None else a["p"], -1))
            if name == "frac":
                return call(operator.sub, (x, trunc(x)))
            if name in ("remainder", "fmod"):
                q = call(operator.truediv, (x, y))
                whole = call(torch.floor, (q,)) if name == "remainder" else trunc(q)
                return call(operator.sub, (x, call(operator.mul, (whole, y))))
            if name == "logsumexp":
                dim, keep = a["dim"], bool(a["keepdim"])
                top = call(torch.amax, (x, dim), {"keepdim": True})
                total = call(torch.sum, (call(torch.exp, (call(operator.sub, (x, top)),)), dim), {"keepdim": keep})
                return call(operator.add, (call(torch.log, (total,)),
                                           top if keep else call(torch.amax, (x, dim), {"keepdim": False})))
            if name.startswith("logical_"):
                p, q = (g.call_method("bool", (v,)) for v in (x, y))
                return call({"logical_and": operator.and_, "logical_or": operator.or_,
                             "logical_xor": operator.ne}[name], (p, q))
            if name in ("sort", "argsort"):  # stable: ONNX TopK's order among equal values (quantized values tie)
                dim = -1 if a["dim"] is None else a["dim"]
                ranked = call(ops.topk, (x, g.call_method("size", (x, dim)), dim, bool(a["descending"])))
                return ranked if name == "sort" else call(operator.getitem, (ranked, 1))
            if name == "outer":
                return call(operator.mul, (call(torch.unsqueeze, (x, 1)), call(torch.unsqueeze, (y, 0))))
            if name == "cosine_similarity":
                dim, eps = 1 if a["dim"] is None else a["dim"], 1e-8 if a["eps"] is None else a["eps"]
                unit = [call(F.normalize, (v, 2.0, dim, eps)) for v in (x, y)]
                return call(torch.sum, (call(operator.mul, tuple(unit)), dim))
            p, eps = 2.0 if a["p"] is None else a["p"], 1e-6 if a["eps"] is None else a["eps"]
            diff = call(operator.add, (call(operator.sub, (x, y)), eps))
            return g.call_method("norm", (diff, p, -1), {"keepdim": bool(a["keepdim"])})

    def _unobserved(self, x, node: fx.Node, order: dict[fx.Node, int]) -> bool:
        """Whether an in-place change of x at `node` shows nowhere but in x's own later uses (which then read
        `node`'s result): nothing after `node` reads a tensor that shares x's memory (following views, and x += y,
        back to their base and on to the base's other views made before `node`), and that base is no input, buffer or
        parameter."""
        root = _alias_root(x)
        if root.op in ("get_attr", "placeholder"):  # a buffer's change would outlast this call, an input's show outside
            return False
        shared, todo = set(), [root]
        while todo:
            n = todo.pop()
            shared.add(n)
            todo += [u for u in n.users if u not in shared and order[u] < order[node]  # (later views: of the result)
                     and u.op in ("call_function", "call_method") and u.target in ALIASING_FUNCTIONS | ALIASING_METHODS
                     and u.args[0] is n]
        return not any(order[u] > order[node] for n in shared - {x} for u in n.users)

    def _functional_embedding(self, node: fx.Node) -> None:
        """F.embedding(ids, self.weight) of an nn.Embedding subclass's own forward (BART's learned positions:
        `super().forward(positions + offset)`): a plain nn.Embedding on that table, called on the ids, so the table is
        quantized as a planned layer's (the subclass's other code stays as traced). Other lookups stay float ops."""
        a = _call_args(node, ("input", "weight", "padding_idx", "max_norm"))
        path, table = self._own_layer(a["weight"])
        if (type(table) is nn.Embedding or not isinstance(table, nn.Embedding) or a["max_norm"] is not None
                or path not in self.plans):
            return
        plain = nn.Embedding(*table.weight.shape, padding_idx=a["padding_idx"], _weight=table.weight)
        self._call_instead(node, path, plain, a["input"])

    def _functional_layer(self, node: fx.Node) -> None:
        """F.linear(x, w, bias) or F.conv2d(x, w, bias, stride, padding, …) where w is a planned layer's own weight
        (timm's Swin V2, BEiT, EVA: `F.linear(x, self.qkv.weight, qkv_bias)`; timm's Conv2dSame pads x to 'same'
        itself and convolves with padding 0) or computed from it by tensor ops on parameters and constants (timm's
        StdConv2d and ScaledStdConv2d standardize it, with a trained gain; a merged LoRA update): that layer, or a
        plain one of the call's settings on its weight and bias, called on x (plus a Linear's other bias), so it is
        quantized as a planned layer; a computed weight is that computation as a parametrization of the plain
        layer's weight (see _weight_function), so the weight quantizer sees it and what it is computed from trains.
        Other weights stay a float op."""
        cls = FUNCTIONAL_LAYERS[node.target]
        names = ("input", "weight", "bias") + (() if cls is nn.Linear else ("stride", "padding", "dilation", "groups"))
        a = _call_args(node, names)
        path, layer = self._own_layer(a["weight"])
        computed = None
        if path is None and isinstance(a["weight"], fx.Node):
            path, layer, computed = self._weight_function(a["weight"])
        bias = a["bias"]
        own_bias = isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias"
        settings = {k: a[k] for k in names[3:] if a[k] is not None}
        symbolic = []  # (settings computed in the graph)
        fx.node.map_arg(list(settings.values()), symbolic.append)
        added = None if bias is None or own_bias else bias  # a Linear's bias of its own: added after the layer
        if not isinstance(layer, cls) and computed is None and not symbolic:
            self._parameter_layer(node, cls, a, settings)
            return
        if (not isinstance(layer, cls) or path not in self.plans or symbolic
                or (added is not None and not (cls is nn.Linear and layer.bias is None))):
            return
        if computed is not None or type(layer) is not nn.Linear or (layer.bias is not None and not own_bias):
            # a plain layer of the call's settings (and bias: F.linear(x, self.fc.weight) adds none of fc's)
            if any(n.op == "call_module" and n.target == path for n in self.graph.nodes):
                return  # (the layer itself is called too: it keeps its own settings)
            plain = (nn.Linear(layer.in_features, layer.out_features, bias=own_bias) if cls is nn.Linear
                     else cls(layer.in_channels, layer.out_channels, layer.kernel_size, bias=own_bias, **settings))
            plain.weight, plain.bias = layer.weight, layer.bias if own_bias else None
            if computed is not None:
                parametrize.register_parametrization(plain, "weight", computed[0], unsafe=True)
            layer = plain
        self._call_instead(node, path, layer, a["input"], added)
        self._erase_unread(computed[1] if computed else [])  # the weight's computation, now the parametrization's

    def _linear_by_matmul(self, node: fx.Node) -> bool:
        """x @ W.T (W.t(), W.transpose(0, 1), W.permute(1, 0)) of a 2-D parameter W, as minimal GPTs tie their head
        to the token embedding (`h @ self.wte.weight.T`), and x @ W of a W stored (in, out) (_in_out_weight): made
        F.linear(x, W), which _functional_layer quantizes as a layer (its weight per channel at the weight bits, not
        as an 8-bit activation of a matmul or a float op)."""
        if not (_is(node, self.modules, (), {operator.matmul, torch.matmul, torch.mm}, {"matmul", "mm"})
                and len(node.args) == 2 and not node.kwargs and isinstance(t := node.args[1], fx.Node)):
            return False
        if t.op == "get_attr":
            return self._in_out_weight(node, t)
        if not (len(t.users) == 1 and t.args and isinstance(w := t.args[0], fx.Node) and w.op == "get_attr"):
            return False
        try:
            weight = self.root.get_parameter(w.target)
        except AttributeError:
            return False
        transposed = (t.target is getattr and t.args[1:] == ("T",) or t.target in (torch.t, "t") and len(t.args) == 1
                      or t.target in (torch.transpose, "transpose") and sorted(a % 2 for a in t.args[1:]) == [0, 1]
                      and len(t.args) == 3 or t.target == "permute" and tuple(t.args[1:]) in ((1, 0), ((1, 0),)))
        if weight.ndim != 2 or not transposed:
            return False
        node.op, node.target, node.args = "call_function", F.linear, (node.args[0], w)
        self.graph.erase_node(t)
        return True

    def _in_out_weight(self, node: fx.Node, w: fx.Node) -> bool:
        """x @ W of a bare 2-D parameter W stored (in, out) that the graph reads nowhere else (pygcn's
        `torch.mm(x, self.weight)`, hand-written attention's `x @ self.W_q`): made F.linear(x, W) with W replaced, in
        the QAT model only, by its transpose (F.linear's (out, in) weight, a parameter trained in its place), so the
        product is quantized as a layer."""
        try:
            weight = self.root.get_parameter(w.target)
        except AttributeError:
            return False
        owner, _, name = w.target.rpartition(".")
        if (weight.ndim != 2 or len(w.users) != 1
                or isinstance(self.root.get_submodule(owner), (nn.Embedding, *LAYER_TYPES))
                or [n for n in self.graph.nodes if n.op == "get_attr" and n.target == w.target] != [w]):
            return False
        transposed = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
        for module in (self.root, self.gm):
            setattr(module.get_submodule(owner), name, transposed)
        node.op, node.target, node.args = "call_function", F.linear, (node.args[0], w)
        return True

    def _parameter_layer(self, node: fx.Node, cls: type, a: dict, settings: dict) -> None:
        """F.linear(x, w, b) / F.conv2d(x, w, b, …) on a parameter that is no such layer's own weight: a bare
        nn.Parameter (`F.linear(x, self.w1, self.b1)`) or another layer's table (fairseq's output projection
        `F.linear(x, self.embed_tokens.weight)`, tied to the embedding): a plain layer holding that parameter (and a
        parameter bias) at a path of its own, `<weight's path>_linear` / `_conv`, so it is quantized and trains the
        same parameter. Its plan: the weight's layer's (the embedding's), else the config's for that path and
        class, at first_last_bits where it is the graph's first or last layer call (a module planned as first or
        last keeps its bits too). Other weights (buffers, computed ones) and biases stay a float op."""
        def parameter(arg) -> nn.Parameter | None:
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                return None
            try:
                return self.root.get_parameter(arg.target)
            except AttributeError:
                return None

        weight, bias = parameter(a["weight"]), parameter(a["bias"])
        dims = 0 if cls is nn.Linear else int(cls.__name__[-2])
        if weight is None or weight.ndim != dims + 2 or (a["bias"] is not None and (
                bias is None or bias.shape != weight.shape[:1])):
            return
        if cls is nn.Linear:
            plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            groups = settings.get("groups", 1)
            plain = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None,
                        **settings)
        plain.weight, plain.bias = weight, bias
        owner = a["weight"].target.rpartition(".")[0]
        path = f"{a['weight'].target.replace('.', '_')}_{'linear' if cls is nn.Linear else 'conv'}"
        while hasattr(self.gm, path):  # (a second call on the same weight: a layer of its own, the parameter shared)
            path += "_"
        calls = [n for n in self.graph.nodes if n.op == "call_module" and n.target in self.plans
                 or n.op == "call_function" and n.target in FUNCTIONAL_LAYERS]
        edge = self.config.first_last_bits if node in (calls[0], calls[-1]) else None
        self.plans[path] = self.plans.get(owner) or plan_for(path, cls.__name__, self.config, edge)
        self._call_instead(node, path, plain, a["input"])

    def _weight_function(self, weight: fx.Node) -> tuple[str | None, nn.Module | None, tuple | None]:
        """Where `weight` is computed from one layer's own weight by tensor ops on parameters, buffers and constants
        only (no input): (that layer's path, the layer, (a module computing `weight` from the stored weight, the
        nodes of the computation in graph order)); else (None, None, None)."""
        nodes, todo = set(), [weight]
        while todo:
            n = todo.pop()
            if n in nodes:
                continue
            if n.op not in ("get_attr", "call_function", "call_method") or (
                    n.op != "get_attr" and _is(n, self.modules, (), FACTORY_FUNCTIONS, FACTORY_METHODS)):
                return None, None, None
            nodes.add(n)
            todo += n.all_input_nodes
        stored = [n for n in nodes if n.op == "get_attr" and n.target.endswith(".weight")]
        path, layer = self._own_layer(stored[0]) if len(stored) == 1 else (None, None)
        if layer is None or weight in stored:
            return None, None, None
        ordered = [n for n in self.graph.nodes if n in nodes]
        graph, root = fx.Graph(), nn.Module()
        env = {stored[0]: graph.placeholder("weight")}
        for n in ordered:
            if n in env:
                continue
            if n.op == "get_attr":  # another parameter or buffer of the model (a gain): the function's own
                name, value = n.target.replace(".", "_"), _fetch(self.gm, n.target)
                if isinstance(value, nn.Parameter):
                    root.register_parameter(name, value)
                else:
                    root.register_buffer(name, value)
                env[n] = graph.get_attr(name)
            else:
                env[n] = graph.node_copy(n, lambda x: env[x])
        graph.output(env[weight])
        return path, layer, (fx.GraphModule(root, graph, "ComputedWeight"), ordered)

    def _own_layer(self, weight) -> tuple[str | None, nn.Module | None]:
        """(path, module) of the model's module whose own weight the get_attr node `weight` reads; (None, None) for
        any other weight (computed, or not a module's `.weight`)."""
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
            return None, None
        path = weight.target[: -len(".weight")]
        try:  # the model's layer: the traced module holds only its weight, in a plain nn.Module
            return path, self.root.get_submodule(path)
        except AttributeError:
            return None, None

    def _call_instead(self, node: fx.Node, path: str, layer: nn.Module, x: fx.Node, add: fx.Node | None = None) -> None:
        """`node` (a functional call on `layer`'s own weight) becomes a call of `layer` at `path` on x (plus `add`);
        the get_attr nodes it read go where nothing else reads them."""
        self.gm.add_submodule(path, layer)
        self.modules[path] = layer
        with self.graph.inserting_before(node):
            out = self.graph.call_module(path, (x,))
            if add is not None:
                out = self.graph.call_function(operator.add, (out, add))
        read = [a for a in node.all_input_nodes if a.op == "get_attr"]
        self._replace(node, out)
        self._erase_unread(read)

    def _split(self, node: fx.Node, reads: list[tuple[fx.Node, int]], parts: tuple[fx.Node, fx.Node]) -> None:
        """A pair-valued node's reads (_pair_reads) read `parts` instead; node is erased."""
        for user, i in reads:
            self._replace(user, parts[i])
        self.graph.erase_node(node)

    def _order_statistic(self, node: fx.Node, name: str) -> bool:
        """kthvalue(x, k, dim, keepdim) and median(x, dim, keepdim) (the lower median, the ((n + 1) // 2)-th smallest)
        as the last of ops.topk's k smallest (values and positions; equal values in ONNX's order), median(x) of every
        value as the flat x's; False (left as it is) where the pair they return is read otherwise than by its parts."""
        g, call = self.graph, self.graph.call_function
        a = _call_args(node, ("input", "k", "dim", "keepdim") if name == "kthvalue" else ("input", "dim", "keepdim"))
        x, dim, keepdim = a["input"], a["dim"], bool(a["keepdim"])
        reads = _pair_reads(node) if name == "kthvalue" or dim is not None else None  # (else one tensor)
        if reads is None and (name == "kthvalue" or dim is not None):
            return False
        with g.inserting_before(node):
            if dim is None and name == "median":
                x, dim = call(torch.flatten, (x,)), 0
            dim = -1 if dim is None else dim
            k = a["k"] if name == "kthvalue" else call(operator.floordiv, (
                call(operator.add, (g.call_method("size", (x, dim)), 1)), 2))
            ranked = call(ops.topk, (x, k, dim, False))
            parts = tuple(call(operator.getitem, (call(operator.getitem, (ranked, i)), _along(dim, slice(-1, None))))
                          for i in (0, 1))
            if not keepdim:
                parts = tuple(call(torch.squeeze, (p, dim)) for p in parts)
        if reads is None:  # median(x): the value
            self._replace(node, parts[0])
        else:
            self._split(node, reads, parts)
        return True

    def _replace(self, node: fx.Node, out: fx.Node) -> None:
        """`node`'s users read `out` (computed before it) instead; node is erased. Its rank (record_ranks) goes to out,
        for a respelling of a later op that needs it (torch.mm(x.mean((2, 3)).t(), ...): the mean became a pool)."""
        if RANK in node.meta:
            out.meta[RANK] = node.meta[RANK]
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)

    def _erase_unread(self, nodes: list[fx.Node]) -> None:
        """Erase those of `nodes` that nothing reads any more, last first (a computation given in graph order is
        erased from its result back)."""
        for n in reversed(nodes):
            if not n.users:
                self.graph.erase_node(n)

    def _dropout_module(self, node: fx.Node) -> None:
        """F.dropout(x, p, self.training) (or dropout2d, alpha_dropout…): tracing froze `training` to the mode at
        prepare time; the matching module (nn.Dropout…) follows the QAT model's train()/eval() instead."""
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        path = f"dropout_{node.name}"
        self.gm.add_submodule(path, DROPOUT_FUNCTIONS[node.target](p))
        with self.graph.inserting_before(node):
            new = self.graph.call_module(path, (node.args[0],))
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    # ---- step 1: wrap, fold BN, fuse activation -------------------------------------------------
    def _wrap(self, node: fx.Node) -> None:
        module, plan = self.modules[node.target], self.plans.get(node.target)
        if plan is None or plan.skip:
            return
        if node.target in self.wrapped_targets:  # a second call of the same layer: same wrapper (its BN folded in too)
            self.wrapped[node] = plan
            if isinstance(self.gm.get_submodule(node.target), FoldedBn):
                bn_call = _sole_user(node)
                bn_call.replace_all_uses_with(node)
                self.graph.erase_node(bn_call)
            return
        if isinstance(module, nn.Embedding):  # ids in, float rows out: no input or output quantizer
            self._add_wrapper(node, plan, QEmbedding(module, self.config.weight_spec(plan.weight_bits, plan.per_channel)),
                              act_bits=None, bn_folded=False, act=None, output="float")
            return
        # A layer called more than once shares one wrapper, so it can absorb no call's activation, and a BN only where
        # every call goes through the same BN and nothing else calls it (a Siamese encoder, a weight-shared loop).
        single_call = self.calls[node.target] == 1
        end, bn = node, None
        user = _sole_user(node) if single_call or self._shared_bn(node) else None
        if (self.config.fold_bn and user is not None and user.op == "call_module"
                and type(self.modules[user.target]) in (FOLDABLE_BN.get(layer_type(module)), nn.SyncBatchNorm)
                and self.modules[user.target].track_running_stats  # without running stats BN cannot fold
                and (WRAPPERS[layer_type(module)] is QConv or WRAPPERS[layer_type(module)] is QConvTranspose
                     and module.groups == 1 or node.meta.get(RANK) == 2)):  # (see QConvTransposeBn; a Linear: (N, C))
            bn, end = self.modules[user.target], user
        scale = self._layer_scale(node, module) if single_call and bn is None else None
        if scale is not None:  # γ * layer(x): γ folded into the layer's weight and bias, as BN is
            end = scale[0]
        act = _fusable_act(_sole_user(end), self.modules) if single_call else None
        act_node = _sole_user(end) if act else None
        feeds_output = single_call and all(u.op == "output" for u in (act_node or end).users)
        out_bits = self.config.output_bits if feeds_output else self.config.act_bits
        out_spec = None if out_bits is None else self.config.act_spec(out_bits, unsigned=act is not None)
        w_spec = self.config.weight_spec(plan.weight_bits, plan.per_channel)
        wrapper = (WRAPPERS_WITH_BN[WRAPPERS[layer_type(module)]](module, bn, w_spec, act=act, out_spec=out_spec)
                   if bn is not None else WRAPPERS[layer_type(module)](module, w_spec, act=act, out_spec=out_spec,
                                                                 layer_scale=scale and scale[1]))
        for extra in (n for n in (end if end is not node else None, act_node) if n is not None):
            extra.replace_all_uses_with(node)
            self.graph.erase_node(extra)
        if scale is not None:
            self._drop_unread(scale[2])
        self._add_wrapper(node, plan, wrapper, bn_folded=bn is not None, act=act,
                          output="float" if out_spec is None else f"A{out_bits}",
                          scale_folded=scale[2][0].target if scale else None)

    def _shared_bn(self, node: fx.Node) -> bool:
        """Every call of node's layer is read by a call of one BN module only, and that BN has no other call."""
        readers = [_sole_user(n) for n in self.graph.nodes if n.op == "call_module" and n.target == node.target]
        return all(r is not None and r.op == "call_module" and r.target == readers[0].target for r in readers) and (
            self.calls[readers[0].target] == len(readers))

    def _layer_scale(self, node: fx.Node, module: nn.Module) -> tuple[fx.Node, nn.Parameter, list[fx.Node]] | None:
        """Where a Linear's or Conv's output is only multiplied by a parameter γ with one value per output channel
        (timm's LayerScale `x * self.gamma`, ConvNeXt's `self.gamma.reshape(1, -1, 1, 1) * x`, CaiT's, DeiT III's):
        (the product's node, γ, γ's nodes: its get_attr first, then views of it); else None."""
        mul = _sole_user(node)
        if (WRAPPERS[layer_type(module)] not in (QLinear, QConv) or mul is None or mul.kwargs or len(mul.args) != 2
                or not _is(mul, self.modules, (), {operator.mul, torch.mul}, {"mul"})):
            return None
        other = mul.args[1] if mul.args[0] is node else mul.args[0]
        chain = []
        while isinstance(other, fx.Node) and other.op == "call_method" and other.target in ("reshape", "view",
                                                                                           "unsqueeze"):
            chain.append(other)
            other = other.args[0]
        if not (isinstance(other, fx.Node) and other.op == "get_attr"):
            return None
        gamma = _fetch(self.gm, other.target)
        if not isinstance(gamma, nn.Parameter):
            return None
        view = gamma
        for n in reversed(chain):  # γ as the product sees it
            if not all(type(a) is int for a in n.args[1:]) or n.kwargs:
                return None
            view = getattr(view, n.target)(*n.args[1:])
        channels, rank = module.weight.shape[0], module.weight.dim()
        expected = (channels,) if isinstance(module, nn.Linear) else (channels,) + (1,) * (rank - 2)
        if tuple(view.shape[-len(expected):]) != expected or any(d != 1 for d in view.shape[:-len(expected)]) or (
                view.dim() > len(expected) + (0 if isinstance(module, nn.Linear) else 1)):
            return None  # (a Linear's γ is (C,); a conv's (C, 1, …) or (1, C, 1, …): more axes would broadcast x)
        return mul, gamma, [other, *reversed(chain)]

    def _drop_unread(self, nodes: list[fx.Node]) -> None:
        """Erase `nodes` (a get_attr, then views of it) where nothing reads them any more, last first; an attribute no
        get_attr reads any more leaves the graph module (its layer holds it now)."""
        self._erase_unread(nodes)
        target = nodes[0].target
        if not any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
            owner, _, name = target.rpartition(".")
            delattr(self.gm.get_submodule(owner), name)

    def _add_wrapper(self, node: fx.Node, plan: LayerPlan, wrapper: nn.Module, **row) -> None:
        with torch.no_grad():
            wrapper.weight_quant.init_from(wrapper.folded()[0])
        self.gm.add_submodule(node.target, wrapper)
        self.wrapped[node] = plan
        self.wrapped_targets.add(node.target)
        self.info.layers.append({"name": node.target, "type": type(self.modules[node.target]).__name__,
                                 "weight_bits": wrapper.weight_quant.spec.bits, "per_channel": plan.per_channel,
                                 "act_bits": plan.act_bits, **row})  # act_bits None: the input is not quantized

    # ---- step 2: activation quantizers ----------------------------------------------------------
    def _new_quantizer(self, after: fx.Node, bits: int, unsigned: bool, only_for: fx.Node | None = None) -> fx.Node:
        """Add a quantizer after `after`, used by `only_for` (one consumer) or by all its users. A softmax of an
        integer input gets s = 2^-bits, z = 0 (QuantSpec.unit_range): an integer runtime fuses DQ → Softmax → Q
        (ONNX Runtime's QLinearSoftmax), which computes the float softmax's codes at that scale only."""
        spec = self.config.act_spec(bits, unsigned=unsigned)
        source = after  # (through dropout and reshapes, which the runtime moves quantization across)
        while self._keeps_grid(source) and source.all_input_nodes:
            source = source.all_input_nodes[0]
        if self._is_softmax(source) and source.all_input_nodes[0] in self.quantized:
            spec = dataclasses.replace(self.config.act_spec(bits, unsigned=True), unit_range=True)
        path = f"quant_{after.name}"
        self.gm.add_submodule(path, FakeQuantizer(spec, kind="act"))
        anchor = self._last_change(after)
        with self.graph.inserting_after(anchor):
            qnode = self.graph.call_module(path, (after,))
        if only_for is None:  # (readers before an in-place change keep x as it was then)
            order = {n: i for i, n in enumerate(self.graph.nodes)} if anchor is not after else None
            after.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode and (
                order is None or order[user] > order[qnode]))
        else:
            only_for.replace_input_with(after, qnode)
        self.quantized[qnode] = path
        self.info.act_quantizers.append(path)
        return qnode

    def _last_change(self, x: fx.Node) -> fx.Node:
        """The last op that changes x's memory in place as QAT runs it (through a view of it: `x[:, :4].relu_()`,
        which convert refuses), else x: a quantizer of x goes after it, as later reads of x see the change."""
        return next((n for n in reversed(self.changes) if _alias_root(n.args[0]) is _alias_root(x)), x)

    def _place_quantizers(self, node: fx.Node) -> None:
        if node in self.wrapped and isinstance(self.modules[node.target], QEmbedding):
            return  # ids in, float out
        if node in self.wrapped:
            self._quantize_layer_input(node)
            if self.modules[node.target].out_quant is not None:
                self.quantized[node] = f"{node.target}.out_quant"
            return
        inputs = node.all_input_nodes
        shape_op = node.target in SHAPE_OPS and not (node.target is getattr and node.args[1] in ("values", "indices"))
        if (node.op in ("call_function", "call_method") and shape_op) or (
                inputs and all(a in self.sizes for a in inputs)
                and (node.target is operator.getitem or _is(node, self.modules, (), SIZE_ARITHMETIC))):
            self.sizes.add(node)
        if self._reduction_indices(node):  # torch.max(x, dim)[1], .indices: integer positions, exact
            self.masks.add(node)
            return
        keeps_grid = self._keeps_grid(node)  # traces a parameter-free module of the model's own code: once
        if (node in self.sizes or node.op == "placeholder"
                or _is(node, self.modules, (), FACTORY_FUNCTIONS, FACTORY_METHODS)
                or (inputs and all(a in self.masks for a in inputs)
                    and (keeps_grid or _is(node, self.modules, (), MASK_FUNCTIONS, MASK_METHODS)))):
            self.masks.add(node)
            return
        if keeps_grid:
            if inputs and inputs[0] in self.quantized:
                self.quantized[node] = self.quantized[inputs[0]]
            return  # computes nothing new: never a float island of its own
        if self._is_activation_matmul(node):  # both inputs integer (quantized here where they are not): QLinearMatMul
            for a in node.args:
                if a not in self.quantized:
                    self._new_quantizer(a, self.config.matmul_bits, unsigned=False, only_for=node)
            self._requant_module(node, QMatMul, list(node.args))
            return
        is_add = node.target in (operator.add, operator.iadd, torch.add)
        if is_add and len(node.args) == 2 and len(inputs) == 2 and all(a in self.quantized for a in inputs):
            self._requant_module(node, QAdd, list(node.args))
            return
        if self._is_global_pool(node) and inputs[0] in self.quantized:
            self._requant_module(node, QGlobalAvgPool, [node.args[0]])
            return
        if (_is(node, self.modules, REQUANT_MODULES, REQUANT_FUNCTIONS) and inputs
                and all(a in self.quantized for a in inputs) and not (is_add and len(inputs) != 2)):
            # x + constant stays float: the constant has no integer form here
            act_node = _sole_user(node) if _fusable_act(_sole_user(node), self.modules) == "relu" else None
            self._new_quantizer(act_node or node, self.config.act_bits, unsigned=act_node is not None)
            return
        if node.op in ("call_module", "call_function", "call_method"):  # (sizes returned above, as masks)
            if (described := _describe(node, self.modules, self.plans)) not in self.info.float_ops:  # a module called twice: once
                self.info.float_ops.append(described)
                if not ops.convertible(node, self.modules):
                    self.info.unconvertible.append(described)

    def _reduction_indices(self, node: fx.Node) -> bool:
        pair = node.args[0] if node.op == "call_function" and node.target in (operator.getitem, getattr) else None
        return (isinstance(pair, fx.Node) and node.args[1] in (1, "indices") and ops.reduces(pair.args, pair.target)
                and _is(pair, self.modules, (), set(ops.REDUCE_FUNCTIONS), ops.REDUCE_METHODS))

    def _is_softmax(self, node: fx.Node) -> bool:
        return _is(node, self.modules, (nn.Softmax,), {F.softmax, torch.softmax}, {"softmax"})  # (Softmax2d: F.softmax)

    def _is_activation_matmul(self, node: fx.Node) -> bool:
        """a @ b of two computed tensors (not a parameter, not a mask), with matmul_bits set."""
        is_matmul = (node.op == "call_function" and node.target in (operator.matmul, torch.matmul)) or (
            node.op == "call_method" and node.target == "matmul")
        return (is_matmul and self.config.matmul_bits is not None and len(node.args) == 2 and not node.kwargs
                and all(isinstance(a, fx.Node) and a.op != "get_attr" and a not in self.masks for a in node.args))

    def _is_global_pool(self, node: fx.Node) -> bool:
        if node.op == "call_module" and isinstance(self.modules[node.target], ADAPTIVE_AVG_POOL_MODULES):
            size = self.modules[node.target].output_size
        elif node.op == "call_function" and node.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                                                             F.adaptive_avg_pool3d):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        else:
            return False
        return set(size if isinstance(size, (tuple, list)) else [size]) == {1}

    def _requant_module(self, node: fx.Node, cls, inputs: list[fx.Node]) -> None:
        """Replace `node` (and a ReLU after an add) by `cls`, which holds the output quantizer and runs
        the runtime's integer arithmetic in eval mode; called as cls(*inputs, *their quantizers)."""
        act_node = _sole_user(node) if cls is QAdd and _fusable_act(_sole_user(node), self.modules) == "relu" else None
        bits = self.config.matmul_bits if cls is QMatMul else self.config.act_bits
        spec = self.config.act_spec(bits, unsigned=act_node is not None)
        path = f"{ {QAdd: 'qadd', QGlobalAvgPool: 'qpool', QMatMul: 'qmatmul'}[cls]}_{node.name}"
        self.gm.add_submodule(path, cls(spec, act="relu" if act_node else None) if cls is QAdd else cls(spec))
        last = act_node or node
        with self.graph.inserting_before(node):
            quantizers = [self.graph.get_attr(self.quantized[x]) for x in inputs]
            new = self.graph.call_module(path, (*inputs, *quantizers))
        last.replace_all_uses_with(new)
        for old in (act_node, node):
            if old is not None:
                self.graph.erase_node(old)
                self.erased.add(old)
        self.quantized[new] = f"{path}.out_quant"
        self.info.act_quantizers.append(f"{path}.out_quant")

    def _quantize_layer_input(self, node: fx.Node) -> None:
        x = node.args[0]
        if x not in self.quantized:
            qnode = self.inserted.get(x)
            if qnode is None:
                qnode = self.inserted[x] = self._new_quantizer(x, self.wrapped[node].act_bits, unsigned=False, only_for=node)
            else:
                node.replace_input_with(x, qnode)
            x = qnode
        with self.graph.inserting_before(node):
            in_q = self.graph.get_attr(self.quantized[x])
        node.args = (x, in_q) + tuple(node.args[1:])

    def _assign_bits(self) -> None:
        """Bits of the activation quantizers, from what their consumers do. A quantized layer multiplies its
        input, which has the layer's input bits; residual adds and average pools only add, and take
        `residual_bits` (None: act_bits), as LSQ and PACT keep the skip path unquantized. A quantizer is as wide as
        its widest consumer; a layer asking for fewer bits gets its own requantizer (one per width)."""
        layers: dict[str, dict[tuple[int, fx.Node], list[fx.Node]]] = {}  # quantizer path -> (bits, input) -> layers
        widths: dict[str, int] = {}  # quantizer path -> bits it is set to
        residual = self.config.residual_bits or self.config.act_bits
        for node in self.graph.nodes:
            if node in self.wrapped and not isinstance(self.gm.get_submodule(node.target), QEmbedding):
                path = node.args[1].target
                layers.setdefault(path, {}).setdefault((self.wrapped[node].act_bits, node.args[0]), []).append(node)
                widths[path] = max(widths.get(path, 0), self.wrapped[node].act_bits)
            elif node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), (QAdd, QGlobalAvgPool, QMatMul)):
                module = self.gm.get_submodule(node.target)
                n_in = 1 if isinstance(module, QGlobalAvgPool) else 2  # (*inputs, *their quantizers)
                for q in node.args[n_in:]:
                    bits = self.config.matmul_bits if isinstance(module, QMatMul) else residual
                    widths[q.target] = max(widths.get(q.target, 0), bits)
        for path, bits in widths.items():
            quantizer = self.gm.get_submodule(path)
            if int(quantizer.bits) != bits:
                quantizer.set_bits(bits)
            unsigned = quantizer.spec.symmetric and not quantizer.spec.signed
            for (narrow, x), consumers in layers.get(path, {}).items():
                if narrow < bits:
                    self._requantize_for(x, consumers, narrow, unsigned)
        for row in self.info.layers:  # the output widths are final now
            out_q = self.gm.get_submodule(row["name"]).out_quant
            row["output"] = "float" if out_q is None else f"A{int(out_q.bits)}"

    def _share_skip_quantizers(self) -> None:
        """exact_adds: the input and output quantizers of each residual add and global average pool, and through
        them every quantizer they connect, become one quantizer (at the widest of their bits; unsigned only if all
        were). Calibration observes the group's values at each of its call sites; training sums their gradients."""
        parent: dict[str, str] = {}

        def root(path: str) -> str:
            while parent.setdefault(path, path) != path:
                path = parent[path]
            return path

        for node in self.graph.nodes:
            module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, (QAdd, QGlobalAvgPool)):
                n_in = 2 if isinstance(module, QAdd) else 1  # called as (*inputs, *their quantizers)
                paths = [q.target for q in node.args[n_in:]] + [f"{node.target}.out_quant"]
                for path in paths:
                    parent[root(path)] = root(paths[0])
        groups: dict[str, list[str]] = {}
        for path in parent:
            groups.setdefault(root(path), []).append(path)
        for members in groups.values():
            quantizers = [self.gm.get_submodule(path) for path in members]
            unsigned = all(q.spec.symmetric and not q.spec.signed for q in quantizers)
            shared = FakeQuantizer(self.config.act_spec(max(int(q.bits) for q in quantizers), unsigned), kind="act")
            for path in members:
                owner, _, name = path.rpartition(".")
                setattr(self.gm.get_submodule(owner) if owner else self.gm, name, shared)
            self.info.shared_quantizers.append(members)

    def _requantize_for(self, x: fx.Node, consumers: list[fx.Node], bits: int, unsigned: bool) -> None:
        """One `bits`-wide quantizer between x and the layers `consumers` that read it."""
        path = f"quant_{x.name}_a{bits}"
        self.gm.add_submodule(path, FakeQuantizer(self.config.act_spec(bits, unsigned=unsigned), kind="act"))
        with self.graph.inserting_after(x):
            qnode = self.graph.call_module(path, (x,))
        self.info.act_quantizers.append(path)
        for node in consumers:
            old = node.args[1]
            with self.graph.inserting_before(node):
                node.args = (qnode, self.graph.get_attr(path), *node.args[2:])
            if not old.users:
                self.graph.erase_node(old)


def prepare_graph(gm: fx.GraphModule, config: QATConfig, plans: dict[str, LayerPlan], root: nn.Module) -> PrepareInfo:
    """Rewrite `gm` (traced from `root`) in place into its QAT form; returns what was done."""
    return _Rewriter(gm, config, plans, root).run()
