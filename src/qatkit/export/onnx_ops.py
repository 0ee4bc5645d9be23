"""ONNX forms of the integer model's `call` nodes (the closed op table of convert/ops.py).

Ops that keep the integer grid run on the codes; the rest run in float on dequantized inputs.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import reduce

import numpy as np
from onnx import TensorProto
from onnx import helper as onnx_helper

from qatkit.convert.ops import GETATTR, NAME_OF
from qatkit.errors import QatkitError
from qatkit.kernels import onnx_pads

BINARY = {"add": "Add", "iadd": "Add", "sub": "Sub", "mul": "Mul", "truediv": "Div", "matmul": "MatMul"}
# (Selu: PyTorch's constants; Round: half to even, as torch.round)
UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "sqrt": "Sqrt", "exp": "Exp", "neg": "Neg", "sin": "Sin",
         "cos": "Cos", "softsign": "Softsign", "selu": "Selu", "log": "Log", "abs": "Abs", "erf": "Erf", "sign": "Sign",
         "reciprocal": "Reciprocal", "floor": "Floor", "ceil": "Ceil", "round": "Round", "tan": "Tan", "atan": "Atan",
         "asin": "Asin", "acos": "Acos", "sinh": "Sinh", "cosh": "Cosh"}
COMPARE = {"eq": "Equal", "ne": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}
LOGICAL = {"and_": "And", "or_": "Or"}
FACTORIES = ("zeros", "ones", "full", "arange", "linspace", "zeros_like", "ones_like", "full_like", "new_zeros",
             "new_ones", "new_full")


@dataclass
class Value:
    """An exported value: a float tensor, integer codes with (scale, zero point) initializers, or shape data."""

    name: str
    kind: str  # "float" | "quant" | "shape" | "int" (dims, token ids) | "bool"
    scale: str | None = None
    zero_point: str | None = None
    dq: str | None = None  # its DequantizeLinear output, once made


def _ints(v, n: int = 2) -> list[int]:
    return [v] * n if isinstance(v, int) else list(v)


def _dims(args: list) -> list:
    """Shape/permutation arguments given as f(x, a, b, c) or f(x, [a, b, c])."""
    return list(args[1]) if len(args) == 2 and isinstance(args[1], list) else list(args[1:])


def _arg(args, kwargs, i, key, default):
    return args[i] if len(args) > i else kwargs.get(key, default)


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def export_call(ex, node: dict) -> Value:
    fn, name = node["fn"], node["name"]
    short = fn.rsplit(".", 1)[-1]
    args = [_resolve(ex, a) for a in node["args"]]
    kwargs = {k: _resolve(ex, v) for k, v in node["kwargs"].items()}
    if short in _WINDOWED:  # a window computed from the input's size (avg_pool2d(x, x.size()[2:]), GeM): the
        args = args[:1] + [_at_example(ex, a) for a in node["args"][1:]]  # example's (the check at other sizes
        kwargs = {k: _at_example(ex, v) for k, v in node["kwargs"].items()}  # then keeps the sizes, noted)
    x = args[0] if args else None
    rank = ex.rank(node["args"][0]["node"]) if node["args"] and isinstance(node["args"][0], dict) and "node" in node["args"][0] else None

    def same_kind(out: str) -> Value:  # a grid-keeping op: integer codes stay integer codes
        return Value(out, x.kind, x.scale, x.zero_point)

    if short in ("identity", "contiguous", "dropout", "clone", "detach"):
        return x
    if short == "getattr" and isinstance(x, list):  # torch.max(x, dim).values / .indices
        return x[("values", "indices").index(args[1])]
    if short == "getattr":  # x.shape; x.device (which a factory's device= reads; ONNX has no devices); x.dtype
        if args[1] == "dtype":  # as the kind of value it makes (what `.to(x.dtype)` casts to)
            return _kind(x)
        return Value(ex.op("Shape", [x.name], "shape"), "shape") if args[1] == "shape" else Value("", "device")
    if short in ("to", "type_as"):  # a cast to a dtype (from x.dtype, torch.float32, …) or to another tensor's type
        target = _kind(args[1]) if short == "type_as" else next((a for a in args[1:] if a in _ONNX_TYPES), None)
        if target is None or target == _kind(x):  # .to(device) or to its own type: nothing to do
            return x
        if target == "float":
            return Value(ex.floats(x), "float")
        return Value(ex.op("Cast", [x.name], name, to=_ONNX_TYPES[target]), target)
    if short in ("tril", "triu"):  # zeroes on codes are not zero values: a quantized x runs dequantized
        k = _arg(args, kwargs, 1, "diagonal", 0)
        src, kind = (ex.floats(x), "float") if x.kind == "quant" else (x.name, x.kind)
        return Value(ex.op("Trilu", [src, ex.const("k", np.array(k, np.int64))], name, upper=int(short == "triu")), kind)
    if short in FACTORIES:
        return _factory(ex, short, args, kwargs, name)
    if short == "size":
        return _size(ex, x, args[1]) if len(args) > 1 else Value(ex.op("Shape", [x.name], "shape"), "shape")
    if short == "getitem":
        if isinstance(x, list):
            return x[args[1]]
        index_nodes = [a["node"] for a in (node["args"][1] if isinstance(node["args"][1], list) else [node["args"][1]])
                       if isinstance(a, dict) and "node" in a]
        return _getitem(ex, x, args[1], rank, one_axis_index=len(index_nodes) == 1 and ex.rank(index_nodes[0]) == 1)
    if short == "setitem":  # ops.setitem(x, value, *index)
        index = node["args"][2:]
        mask_rank = ex.rank(index[0]["node"]) if len(index) == 1 and isinstance(index[0], dict) and "node" in index[0] \
            else None
        return _setitem(ex, x, args[1], args[2:], rank, name, mask_rank)
    if short in ("argmax", "argmin"):  # (CLIP's end-of-text token: text.argmax(dim=-1)) the first extreme position
        dim, keep = _arg(args, kwargs, 1, "dim", None), int(bool(_arg(args, kwargs, 2, "keepdim", False)))
        src = x.name if x.kind in ("quant", "int") else ex.floats(x)
        if dim is None:  # over all values
            src, dim = ex.op("Reshape", [src, ex.const("flat", np.array([-1], np.int64))], "flat"), 0
        return Value(ex.op("ArgMax" if short == "argmax" else "ArgMin", [src], name, axis=dim, keepdims=keep), "int")
    if short == "cumsum":  # (DETR's positions: not_mask.cumsum(1, dtype=torch.float32)) in float32, or int64
        floats = _arg(args, kwargs, 2, "dtype", None) == "float" or _kind(x) == "float"
        src = _c(ex, x) if floats else x.name if x.kind == "int" else ex.op("Cast", [x.name], "i", to=TensorProto.INT64)
        axis = ex.const("axis", np.array(_axis(_arg(args, kwargs, 1, "dim", None), rank), np.int64))
        return Value(ex.op("CumSum", [src, axis], name), "float" if floats else "int")
    if short == "meshgrid":  # YOLO's anchor grid from two aranges: each input unsqueezed and expanded to the grid
        return _meshgrid(ex, list(args[0]) if len(args) == 1 and isinstance(args[0], list) else args,
                         kwargs.get("indexing", "ij"), name)
    if short in ("chunk", "split", "unbind"):  # the pieces as Slices (Gathers), as many and as large as the example's
        pieces = ex.shapes[node["name"]]
        dim = _axis(_arg(args, kwargs, 1 if short == "unbind" else 2, "dim", 0), rank)
        if ex.varies_with_batch(node["args"][0]["node"], dim):
            raise QatkitError(f"{short} along an axis whose size follows the batch (node '{name}', dim {dim}) has no "
                              "ONNX form in qatkit: its pieces would change with the batch. Fix: split along another "
                              "axis")
        if short == "unbind":
            return [_keep(ex, x, "Gather", [ex.const("i", np.array(i, np.int64))], "piece", axis=dim)
                    for i in range(len(pieces))]
        ends = np.cumsum([p.shape[dim] for p in pieces]).tolist()
        return [Value(_slice_axis(ex, x.name, a, b, dim), x.kind, x.scale, x.zero_point)
                for a, b in zip([0] + ends[:-1], ends)]
    if short in COMPARE and isinstance(x, Value):  # masks from ids, lengths, positions (int64) or constants (float)
        other = args[1]
        if _kind(x) == "int" and (type(other) is int or isinstance(other, Value) and _kind(other) == "int"):
            pair = [x.name, _i(ex, other)]
        else:
            pair = [_c(ex, x), _c(ex, other)]
        out = ex.op(COMPARE[short], pair, "eq" if short == "ne" else name)
        return Value(out if short != "ne" else ex.op("Not", [out], name), "bool")
    if short in LOGICAL and x.kind == "bool" and args[1].kind == "bool":
        return Value(ex.op(LOGICAL[short], [x.name, args[1].name], name), "bool")
    if short == "invert" and x.kind == "bool":
        return Value(ex.op("Not", [x.name], name), "bool")
    if short == "float":  # a mask, positions or sizes as float32; floats and codes as their float values
        if _kind(x) == "float":
            return Value(ex.floats(x), "float")
        return Value(ex.op("Cast", [x.name], name, to=TensorProto.FLOAT), "float")
    if short in ("long", "int", "bool"):  # (BERT's (ids != 0).long()); int32 and int64 values alike, as int64
        target = "bool" if short == "bool" else "int"
        if _kind(x) == target:
            return x
        return Value(ex.op("Cast", [ex.floats(x) if x.kind == "quant" else x.name], name, to=_ONNX_TYPES[target]), target)
    if short in ("relu",) and x.kind == "quant":  # max(q, z): ReLU on the codes
        return same_kind(ex.op("Max", [x.name, x.zero_point], name))
    if short in ("max_pool1d", "max_pool2d", "max_pool3d"):
        k = _arg(args, kwargs, 1, "kernel_size", None)
        if short == "max_pool1d" and _whole_length(ex, node):  # F.max_pool1d(h, h.size(2)): max over time, any length
            return _reduce_max_min(ex, x, "amax", 2, True, rank, name)
        stride = _arg(args, kwargs, 2, "stride", None) or k
        pad = _arg(args, kwargs, 3, "padding", 0)
        dil = _arg(args, kwargs, 4, "dilation", 1)
        n = int(short[-2])  # spatial axes
        k, stride, pad, dil = ([v] * n if isinstance(v, int) else list(v) for v in (k, stride, pad, dil))
        src = x.name if x.kind == "quant" else ex.floats(x)
        out = ex.op("MaxPool", [src], name, kernel_shape=k, strides=stride, pads=pad * 2, dilations=dil,
                    ceil_mode=int(bool(_arg(args, kwargs, 5, "ceil_mode", False))))
        return same_kind(out) if x.kind == "quant" else Value(out, "float")
    if short == "flatten":
        start, end = _axis(_arg(args, kwargs, 1, "start_dim", 0), rank), _axis(_arg(args, kwargs, 2, "end_dim", -1), rank)
        tail = list(ex.shapes[node["args"][0]["node"]].shape[end + 1:])
        shape = ex.const("shape", np.array([0] * start + [-1] + tail, np.int64))
        return _keep(ex, x, "Reshape", [shape], name)
    if short in ("reshape", "view"):
        whole = len(args) == 2 and isinstance(args[1], Value) and args[1].kind == "shape"  # x.view(y.size())
        return _keep(ex, x, "Reshape", [args[1].name if whole else ex.shape_tensor(_dims(args))], name)
    if short == "expand" and len(args) == 2 and isinstance(args[1], Value):  # to another tensor's x.size()
        return _keep(ex, x, "Expand", [args[1].name], name)
    if short == "expand":  # torch's -1 keeps a size: 1 under ONNX's broadcasting
        return _keep(ex, x, "Expand", [ex.shape_tensor([1 if d == -1 else d for d in _dims(args)])], name)
    if short == "permute":
        return _keep(ex, x, "Transpose", [], name, perm=[_axis(d, rank) for d in _dims(args)])
    if short == "transpose":
        perm = list(range(rank))
        a, b = _axis(args[1], rank), _axis(args[2], rank)
        perm[a], perm[b] = perm[b], perm[a]
        return _keep(ex, x, "Transpose", [], name, perm=perm)
    if short in ("unsqueeze", "squeeze"):
        dim = _arg(args, kwargs, 1, "dim", None)
        axes = [] if dim is None else [ex.const("axes", np.array([dim], np.int64))]
        return _keep(ex, x, short.capitalize(), axes, name)
    if short == "pixel_shuffle":  # (N, C·r², H, W) -> (N, C, H·r, W·r): ONNX's DepthToSpace in CRD order, on x as it is
        return _keep(ex, x, "DepthToSpace", [], name, blocksize=_arg(args, kwargs, 1, "upscale_factor", None), mode="CRD")
    if short == "pixel_unshuffle":  # (N, C, H·r, W·r) -> (N, C·r², H, W); out channel c·r² + i·r + j, row h, column w
        # is in channel c, row h·r + i, column w·r + j
        r, c = _arg(args, kwargs, 1, "downscale_factor", None), ex.shapes[node["args"][0]["node"]].shape[1]
        h, w = (Value(ex.op("Div", [_size(ex, x, axis).name, _i(ex, r)], "n"), "int") for axis in (2, 3))
        blocks = _keep(ex, x, "Reshape", [ex.shape_tensor([0, c, h, r, w, r])], "blocks")
        moved = _keep(ex, blocks, "Transpose", [], "moved", perm=[0, 1, 3, 5, 2, 4])
        return _keep(ex, moved, "Reshape", [ex.shape_tensor([0, c * r * r, h, w])], name)
    if short == "channel_shuffle":  # (N, C, …): channels as (g, C/g), transposed to (C/g, g)
        g, c = _arg(args, kwargs, 1, "groups", None), ex.shapes[node["args"][0]["node"]].shape[1]
        grouped = _keep(ex, x, "Reshape", [ex.const("shape", np.array([0, g, c // g, -1], np.int64))], "groups")
        moved = _keep(ex, grouped, "Transpose", [], "moved", perm=[0, 2, 1, 3])
        return _keep(ex, moved, "Reshape", [ex.op("Shape", [x.name], "shape")], name)
    if short == "unflatten":  # one axis as several: the axes before it copied (0), those after as the example's
        dim = _axis(_arg(args, kwargs, 1, "dim", None), rank)
        tail = list(ex.shapes[node["args"][0]["node"]].shape[dim + 1:])
        return _keep(ex, x, "Reshape", [ex.shape_tensor([0] * dim + list(_arg(args, kwargs, 2, "sizes", None)) + tail)],
                     name)
    if short == "repeat":  # Tile; more repeats than axes add leading axes, as torch's
        reps = _dims(args)
        src = x if len(reps) == rank else _keep(ex, x, "Unsqueeze", [ex.const(
            "axes", np.arange(len(reps) - rank, dtype=np.int64))], "lead")
        return _keep(ex, src, "Tile", [ex.shape_tensor(reps)], name)
    if short == "topk":  # (ops.topk: ONNX's order among equal values) values on x as it is, positions as ints
        dim, largest = _axis(_arg(args, kwargs, 2, "dim", -1), rank), _arg(args, kwargs, 3, "largest", True)
        src, kind = (x.name, (x.kind, x.scale, x.zero_point)) if x.kind in ("quant", "int") else (ex.floats(x), ("float",))
        values, indices = ex.fresh(f"{name}_values"), ex.fresh(f"{name}_indices")
        ex.nodes.append(onnx_helper.make_node("TopK", [src, ex.shape_tensor([_arg(args, kwargs, 1, "k", None)])],
                                              [values, indices], name=values, axis=dim, largest=int(bool(largest))))
        return [Value(values, *kind), Value(indices, "int")]
    if short in ("max", "min") and len(args) > 1 and isinstance(args[1], Value):  # elementwise, of two tensors
        if _integers(x, args[1]):  # (T5's position buckets)
            return Value(ex.op(short.capitalize(), [_i(ex, x), _i(ex, args[1])], name), "int")
        return Value(ex.op(short.capitalize(), [_c(ex, x), _c(ex, args[1])], name), "float")
    if short in ("max", "min", "amax", "amin"):
        return _reduce_max_min(ex, x, short, _arg(args, kwargs, 1, "dim", None), _arg(args, kwargs, 2, "keepdim", False),
                               rank, name)
    if short in ("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"):
        return _adaptive_max_pool(ex, node, x, args, kwargs, rank)
    if short == "flip":  # x.flip(dims), x.flip(*dims), torch.flip(x, dims): a Slice backwards along each
        dims = [d for a in (args[1:] or [kwargs["dims"]]) for d in (a if isinstance(a, list) else [a])]
        ends = ex.const("ends", np.full(len(dims), np.iinfo(np.int64).min, np.int64))
        return same_kind(ex.op("Slice", [x.name, ex.const("starts", np.full(len(dims), -1, np.int64)), ends,
                                         ex.const("ax", np.array(dims, np.int64)),
                                         ex.const("steps", np.full(len(dims), -1, np.int64))], name))
    if short == "unfold" and node.get("method"):  # x.unfold(dim, size, step): windows along dim, a new last axis
        return same_kind(_windows(ex, x, *(_arg(args, kwargs, i, k, None) for i, k in
                                          enumerate(("dimension", "size", "step"), start=1)), rank, name))
    if short == "gather":  # torch.gather(x, dim, index): the values at the indices along dim (codes as they are)
        index = _i(ex, _arg(args, kwargs, 2, "index", None))
        return same_kind(ex.op("GatherElements", [x.name, index], name, axis=_arg(args, kwargs, 1, "dim", None)))
    if short == "roll":
        return _roll(ex, node, x, _arg(args, kwargs, 1, "shifts", None), _arg(args, kwargs, 2, "dims", None), rank)
    if short == "repeat_interleave":
        return _repeat_interleave(ex, x, _arg(args, kwargs, 1, "repeats", None), _arg(args, kwargs, 2, "dim", None),
                                  rank, name)
    return _float_op(ex, node, short, args, kwargs, rank)


def _meshgrid(ex, tensors: list[Value], indexing: str, name: str) -> list[Value]:
    """torch.meshgrid of 1-D tensors: the grid's axes follow the inputs ('ij'), the first two swapped ('xy')."""
    axes = list(range(len(tensors)))
    if indexing == "xy" and len(tensors) > 1:
        axes[0], axes[1] = 1, 0
    rank = len(tensors)
    sizes = [None] * rank
    for t, axis in zip(tensors, axes):
        sizes[axis] = ex.op("Shape", [t.name], "n")
    shape = ex.op("Concat", sizes, "grid", axis=0)
    out = []
    for t, axis in zip(tensors, axes):
        others = ex.const("axes", np.array([a for a in range(rank) if a != axis], np.int64))
        out.append(_keep(ex, Value(ex.op("Unsqueeze", [t.name, others], "line"), t.kind, t.scale, t.zero_point),
                         "Expand", [shape], name))
    return out


_WINDOWED = {f"{kind}_pool{n}d" for kind in ("avg", "max", "lp") for n in (1, 2, 3)}


def _at_example(ex, a):
    """A pooling argument as the example's value: ints as they are; a size computed in the graph, its value there."""
    if isinstance(a, list):
        return [_at_example(ex, v) for v in a]
    if isinstance(a, dict) and "node" in a:
        value = ex.shapes[a["node"]]
        return list(value) if isinstance(value, (tuple, list)) else value
    return a


def _whole_length(ex, node: dict) -> bool:
    """F.max_pool1d(h, h.size(2)) or (h, h.shape[-1]) (a text CNN's max over time): the kernel is h's own length,
    the stride defaults to it, nothing is padded."""
    nodes = {n["name"]: n for n in ex.model.nodes}

    def made_by(ref):
        return nodes.get(ref["node"]) if isinstance(ref, dict) and "node" in ref else None

    source = made_by(_raw_arg(node, 1, "kernel_size"))
    extra = list(node["args"][2:]) + [v for k, v in node["kwargs"].items() if k != "kernel_size"]
    if source is None or not all(v in (None, 0, 1, False) for v in extra) or source["args"][1:] not in ([2], [-1]):
        return False
    if source.get("fn") == "size":  # h.size(2)
        return source["args"][0] == node["args"][0]
    shape = made_by(source["args"][0]) if source.get("fn") == NAME_OF[operator.getitem] else None  # h.shape[2]
    return shape is not None and shape.get("fn") == GETATTR and shape["args"] == [node["args"][0], "shape"]


def _reduce_max_min(ex, x: Value, short: str, dim, keepdim: bool, rank: int, name: str):
    """Max/min over axes on x as it is (codes: the largest code is the code of the largest value); torch.max/min
    with one dim also give the (first) position of it, as ONNX's ArgMax/ArgMin."""
    op = "Max" if short.endswith("max") else "Min"
    axes = list(range(rank)) if dim is None else [_axis(d, rank) for d in _ints(dim, 1)]
    values = _keep(ex, x if x.kind == "quant" else Value(ex.floats(x), "float"), f"Reduce{op}", [], name,
                   axes=axes, keepdims=int(bool(keepdim)))
    if short in ("amax", "amin") or dim is None:
        return values
    src = x.name if x.kind == "quant" else ex.floats(x)
    return [values, Value(ex.op(f"Arg{op}", [src], f"{name}_index", axis=axes[0], keepdims=int(bool(keepdim))), "int")]


def _size(ex, x: Value, axis: int) -> Value:
    """x.size(axis) as an int64 scalar of the graph."""
    return Value(ex.op("Gather", [ex.op("Shape", [x.name], "shape"), ex.const("i", np.array(axis, np.int64))], "dim"),
                 "int")


def _im2col(ex, node, short: str, xf: str, args, kwargs) -> str:
    """F.unfold as a grouped Conv whose one-hot kernels copy each input value (times 1, plus zeros: exact) to output
    channel c·kh·kw + i·kw + j, PyTorch's order, flattened to (N, C·kh·kw, L); F.fold as the ConvTranspose of the same
    kernels, which adds the blocks back where they overlap, to output_size."""
    fold = short == "fold"
    offset = 1 if fold else 0  # F.fold(input, output_size, kernel_size, ...)
    k, dilation, padding, stride = (_ints(_arg(args, kwargs, i + offset, key, default))
                                    for i, (key, default) in enumerate((("kernel_size", None), ("dilation", 1),
                                                                        ("padding", 0), ("stride", 1)), start=1))
    blocks = ex.shapes[node["args"][0]["node"]].shape[1]  # C·kh·kw (fold's input), else C
    channels = blocks // (k[0] * k[1]) if fold else blocks
    eye = np.zeros((channels * k[0] * k[1], 1, *k), np.float32)
    for c in range(channels):
        for i in range(k[0]):
            for j in range(k[1]):
                eye[(c * k[0] + i) * k[1] + j, 0, i, j] = 1.0
    attrs = dict(kernel_shape=k, dilations=dilation, pads=padding * 2, strides=stride, group=channels)
    if not fold:
        cols = ex.op("Conv", [xf, ex.const("eye", eye)], "im2col", **attrs)
        return ex.op("Reshape", [cols, ex.const("shape", np.array([0, channels * k[0] * k[1], -1], np.int64))],
                     node["name"])
    size = list(ex.shapes[node["name"]].shape[2:])  # output_size (on the example: sizes of the graph hold it)
    blocks_hw = [(s + 2 * p - d * (kk - 1) - 1) // st + 1
                 for s, p, d, kk, st in zip(size, padding, dilation, k, stride)]
    shape = ex.const("shape", np.array([0, channels * k[0] * k[1], *blocks_hw], np.int64))
    cols = ex.op("Reshape", [xf, shape], "cols")
    extra = [s - ((b - 1) * st - 2 * p + d * (kk - 1) + 1)
             for s, b, st, p, d, kk in zip(size, blocks_hw, stride, padding, dilation, k)]  # rows no block reaches
    return ex.op("ConvTranspose", [cols, ex.const("eye", eye)], node["name"], output_padding=extra, **attrs)


def _windows(ex, x: Value, dim: int, size: int, step: int, rank: int, name: str) -> str:
    """x.unfold(dim, size, step) on x as it is: a Gather of the windows' positions start + i (start = 0, step, ...,
    (n - size) // step windows after the first, n the size of dim in the graph), their axis moved last."""
    dim = _axis(dim, rank)
    ints = {v: ex.const("i", np.array(v, np.int64)) for v in (0, 1, size, step)}
    n = _size(ex, x, dim).name
    count = ex.op("Add", [ex.op("Div", [ex.op("Sub", [n, ints[size]], "rest"), ints[step]], "more"), ints[1]], "count")
    starts = ex.op("Mul", [ex.op("Range", [ints[0], count, ints[1]], "w"), ints[step]], "starts")
    offsets = ex.op("Range", [ints[0], ints[size], ints[1]], "offsets")
    index = ex.op("Add", [ex.op("Unsqueeze", [starts, ex.const("axes", np.array([1], np.int64))], "s"),
                          ex.op("Unsqueeze", [offsets, ex.const("axes", np.array([0], np.int64))], "o")], "index")
    windows = ex.op("Gather", [x.name, index], "windows", axis=dim)  # (..., count, size, ...)
    perm = [*range(dim + 1), *range(dim + 2, rank + 1), dim + 1]
    return ex.op("Transpose", [windows], name, perm=perm)


def _uneven_average_pool(ex, xf: str, spatial: list[int], size: list[int], name: str) -> str:
    """Adaptive average pooling whose windows differ in size (PSPNet's bins of 3 and 6 on a 64-pixel map): one
    Einsum per spatial axis with its pooling matrix, output i the mean of inputs floor(i·n/o) to ceil((i + 1)·n/o) - 1,
    as PyTorch's windows (the mean of the rows' means: the rectangle's mean, float32 rounding apart)."""
    letters = "abcde"[:len(spatial) + 2]
    out = xf
    for axis, (n, o) in enumerate(zip(spatial, size), start=2):
        if n == o:
            continue
        pool = np.zeros((o, n), np.float32)
        for i in range(o):
            start, end = i * n // o, -(-(i + 1) * n // o)
            pool[i, start:end] = 1.0 / (end - start)
        out = ex.op("Einsum", [out, ex.const("pool", pool)], name,
                    equation=f"{letters},z{letters[axis]}->{letters.replace(letters[axis], 'z')}")
    return out


def _adaptive_max_pool(ex, node, x: Value, args, kwargs, rank: int) -> Value:
    """Adaptive max pooling on x as it is (codes: the max of codes is the code of the max): to size 1 a ReduceMax
    over the spatial axes (any input size); otherwise a MaxPool whose windows tile the example's sizes, or where the
    windows differ in size, each window's max, one axis after the other."""
    name, spatial = node["name"], rank - 2
    size, indices = _arg(args, kwargs, 1, "output_size", None), _arg(args, kwargs, 2, "return_indices", False)
    size = list(size) if isinstance(size, (list, tuple)) else [size] * spatial
    if indices:
        raise QatkitError(f"adaptive max pooling with return_indices=True (node '{name}') has no ONNX form in qatkit. "
                          "Fix: pool without the indices")
    if set(size) == {1}:
        return _reduce_max_min(ex, x, "amax", list(range(2, rank)), True, rank, name)
    src = x.name if x.kind == "quant" else ex.floats(x)
    kind = (x.kind, x.scale, x.zero_point) if x.kind == "quant" else ("float",)
    sizes = list(ex.shapes[node["args"][0]["node"]].shape[2:])
    size = [n if o is None else o for n, o in zip(sizes, size)]
    if any(n % o for n, o in zip(sizes, size)):  # windows of several sizes, overlapping: per axis, each window's max
        out = src
        for axis, (n, o) in enumerate(zip(sizes, size), start=2):
            if n != o:
                bounds = [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)]  # PyTorch's windows
                windows = [ex.op("ReduceMax", [ex.op("Slice", [out, ex.const("s", np.array([start], np.int64)),
                                                               ex.const("e", np.array([end], np.int64)),
                                                               ex.const("a", np.array([axis], np.int64))], "window")],
                                 "max", axes=[axis], keepdims=1) for start, end in bounds]
                out = ex.op("Concat", windows, name, axis=axis)
        return Value(out, *kind)
    kernel = [n // o for n, o in zip(sizes, size)]
    return Value(ex.op("MaxPool", [src], name, kernel_shape=kernel, strides=kernel), *kind)


def _repeat_interleave(ex, x: Value, repeats, dim, rank: int, name: str) -> Value:
    """x.repeat_interleave(r, dim) (grouped-query attention's key/value heads) on x as it is: a new axis after dim,
    expanded r times, merged into dim."""
    if not (type(repeats) is int or isinstance(repeats, Value) and repeats.kind == "int") or dim is None:
        raise QatkitError(f"repeat_interleave with repeats={repeats!r}, dim={dim!r} (node '{name}') has no ONNX form in "
                          "qatkit; allowed: one number of repeats (an int or a size) along a given dim. Fix: pass "
                          "those")
    dim = _axis(dim, rank)
    times = [1] * rank
    times[dim] = repeats
    wide = ex.op("Unsqueeze", [x.name, ex.const("axes", np.array([dim + 1], np.int64))], "wide")
    wide = ex.op("Expand", [wide, ex.shape_tensor([1] * (dim + 1) + [repeats] + [1] * (rank - dim - 1))], "repeated")
    shape = ex.op("Mul", [ex.op("Shape", [x.name], "shape"), ex.shape_tensor(times)], "shape")
    return _keep(ex, Value(wide, x.kind, x.scale, x.zero_point), "Reshape", [shape], name)


def _roll(ex, node: dict, x: Value, shifts, dims, rank: int) -> Value:
    """torch.roll(x, shifts, dims) on x as it is: per dim, the last `shift` entries (mod the dim's size) moved to the
    front with two Slices and a Concat."""
    source = node["args"][0]["node"]
    shifts, dims = (list(v) if isinstance(v, (list, tuple)) else [v] for v in (shifts, dims))
    if dims == [None] or any(ex.varies_with_batch(source, _axis(d, rank)) for d in dims):
        raise QatkitError(f"torch.roll with dims={dims} (node '{node['name']}') has no ONNX form in qatkit; allowed: "
                          "rolls along given axes whose sizes do not follow the batch. Fix: pass dims=")
    out = x.name
    for shift, dim in zip(shifts, dims):
        dim = _axis(dim, rank)
        size = ex.shapes[source].shape[dim]
        cut = size - shift % size  # out = x[cut:] then x[:cut] along dim
        if cut != size:
            out = ex.op("Concat", [_slice_axis(ex, out, cut, size, dim), _slice_axis(ex, out, 0, cut, dim)], "rolled",
                        axis=dim)
    return Value(out, x.kind, x.scale, x.zero_point)


def _lp_pool(ex, xf: str, n: int, args, kwargs, name: str) -> str:
    """F.lp_pool1d/2d/3d as PyTorch computes it: (sign(s)·relu(|s|)·∏k)^(1/p) of s = avg_pool(x^p) (no padding; a
    partial last window of ceil_mode averaged over its cells in the image), max_pool(|x|) for p = inf."""
    p = float(_arg(args, kwargs, 1, "norm_type", None))
    k = _arg(args, kwargs, 2, "kernel_size", None)
    stride = _arg(args, kwargs, 3, "stride", None) or k
    k, stride = ([v] * n if isinstance(v, int) else list(v) for v in (k, stride))
    ceil = int(bool(_arg(args, kwargs, 4, "ceil_mode", False)))
    if math.isinf(p):
        magnitude = ex.op("Abs", [xf], "abs")
        sign = 1.0 if p > 0 else -1.0
        pooled = ex.op("MaxPool", [ex.op("Mul", [magnitude, ex.const("sign", np.float32(sign))], "signed")], "max",
                       kernel_shape=k, strides=stride, ceil_mode=ceil)
        return ex.op("Mul", [pooled, ex.const("sign", np.float32(sign))], name)
    s = ex.op("AveragePool", [ex.op("Pow", [xf, ex.const("p", np.float32(p))], "pow")], "avg", kernel_shape=k,
              strides=stride, ceil_mode=ceil, count_include_pad=0)
    s = ex.op("Mul", [ex.op("Sign", [s], "sign"), ex.op("Relu", [ex.op("Abs", [s], "abs")], "relu")], "signed")
    s = ex.op("Mul", [s, ex.const("cells", np.float32(math.prod(k)))], "sum")
    return ex.op("Pow", [s, ex.const("inv_p", np.float32(1.0 / p))], name)


def _slice_axis(ex, src: str, start: int, end: int, axis: int) -> str:
    """src[start:end] along one axis (ONNX Slice)."""
    return ex.op("Slice", [src, *(ex.const(k, np.array([v], np.int64)) for k, v in (("st", start), ("en", end),
                                                                                     ("ax", axis)))], "piece")


_ONNX_TYPES = {"float": TensorProto.FLOAT, "int": TensorProto.INT64, "bool": TensorProto.BOOL}


def _kind(v: Value) -> str:
    """The type of value v holds once dequantized: "float", "int" or "bool"."""
    return {"int": "int", "shape": "int", "bool": "bool"}.get(v.kind, "float")


def _resolve(ex, a):
    if isinstance(a, list):
        return [_resolve(ex, v) for v in a]
    if isinstance(a, dict) and "slice" in a:  # bounds: ints, or exported sizes
        return slice(*_resolve(ex, a["slice"]))
    if isinstance(a, dict) and "ellipsis" in a:
        return Ellipsis
    if isinstance(a, dict) and "torch_dtype" in a:
        return {"float32": "float", "int64": "int", "bool": "bool"}[a["torch_dtype"]]  # the kind of value it makes
    return ex.resolve(a)


def _keep(ex, x: Value, op: str, extra: list[str], name: str, **attrs) -> Value:
    """Run a grid-keeping op on x as it is: codes (quantized x), floats, integers or a mask."""
    return Value(ex.op(op, [x.name, *extra], name, **attrs), x.kind, x.scale, x.zero_point)


def _getitem(ex, x: Value, index, rank, one_axis_index: bool = False) -> Value:
    """x[i], x[a:b, i, None, ...]: one Slice over the sliced axes, a Gather per int (its axis then drops out), one
    Unsqueeze for the new axes (None). A list of ints or an integer tensor (Swin's relative_position_index) is a
    Gather whose indices take that axis's place (new axes beside a tensor only if it has one axis,
    `one_axis_index`: an MoE's gates g[tok, None]; a 1-D boolean mask is the positions where it is true)."""
    if _is_mask(index) or isinstance(index, list) and len(index) == 1 and _is_mask(index[0]):  # x[mask]: the
        return _keep(ex, x, "GatherND", [_mask_positions(ex, index)], "selected")  # values where it is true, in order
    if isinstance(index, int):
        out = ex.op("Gather", [x.name, ex.const("i", np.array(index, np.int64))], "item", axis=0)
        kind = "int" if x.kind == "shape" else x.kind
        return Value(out, kind, x.scale, x.zero_point)
    items = index if isinstance(index, list) else [index]
    if one_axis_index and len(masks := [k for k, i in enumerate(items) if _is_mask(i)]) == 1:  # x[:, keep]: a 1-D
        true_at = _nonzero(ex, items[masks[0]], 1, True, "true_at")[0]  # mask as the positions where it is true
        items = items[:masks[0]] + [true_at] + items[masks[0] + 1:]
    if len(items) > 1 and all(isinstance(i, Value) and i.kind == "int" for i in items[:2]) \
            and all(i is None or i == slice(None) for i in items[2:]):  # x[rows, cols] (CLIP's x[arange(B), eot];
        pairs = ex.op("Concat", [ex.op("Unsqueeze", [i.name, ex.const("axes", np.array([-1], np.int64))], "i")
                                 for i in items[:2]], "pairs", axis=-1)  # an MoE's gates w[tok, slot, None]): pairs
        picked = _keep(ex, x, "GatherND", [pairs], "picked")  # (their axis first, then x's others, new ones between)
        if new_axes := [1 + k for k, i in enumerate(items[2:]) if i is None]:
            return _keep(ex, picked, "Unsqueeze", [ex.const("axes", np.array(new_axes, np.int64))], "new_axis")
        return picked
    lists = [i for i in items if isinstance(i, (list, Value))]  # x[:, [-1]], table[index]: Gathers
    if not all(i is None or i is Ellipsis or isinstance(i, int)
               or (isinstance(i, slice) and (i.step is None or type(i.step) is int and i.step > 0))
               or (isinstance(i, list) and all(type(j) is int for j in i))
               or (isinstance(i, Value) and i.kind in ("int", "shape")) for i in items) \
            or items.count(Ellipsis) > 1 or len(lists) > 1 or (lists and any(type(i) is int for i in items)) \
            or (any(isinstance(i, Value) for i in items) and None in items and not one_axis_index):
        raise QatkitError(f"indexing with [{', '.join(map(_shown, items))}] has no ONNX form in qatkit. Fix: index "
                          "with ints, slices (steps > 0), None, one ... and at most one list of ints or integer tensor "
                          "(without ints beside it; a tensor index without None beside it), or with one boolean mask "
                          "alone")
    if Ellipsis in items:  # the axes it stands for, as full slices
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (rank - sum(i is not None for i in items) + 1) + items[at + 1:]
    on_axes = [i for i in items if i is not None]  # one per input axis, in order
    sliced = [(axis, s) for axis, s in enumerate(on_axes) if isinstance(s, slice)]
    out = x.name
    if any(s.start is not None or s.stop is not None or s.step not in (None, 1) for _, s in sliced):
        starts = [0 if s.start is None else s.start for _, s in sliced]
        ends = [np.iinfo(np.int64).max if s.stop is None else s.stop for _, s in sliced]
        steps = [ex.const("steps", np.array([s.step or 1 for _, s in sliced], np.int64))] \
            if any(s.step not in (None, 1) for _, s in sliced) else []
        out = ex.op("Slice", [out, ex.shape_tensor(starts), ex.shape_tensor(ends),
                              ex.const("ax", np.array([a for a, _ in sliced], np.int64)), *steps], "slice")
    for dropped, (axis, i) in enumerate((a, i) for a, i in enumerate(on_axes) if isinstance(i, int)):
        out = ex.op("Gather", [out, ex.const("i", np.array(i, np.int64))], "item", axis=axis - dropped)
    for axis, i in ((a, i) for a, i in enumerate(on_axes) if isinstance(i, (list, Value))):
        out = ex.op("Gather", [out, _i(ex, i)], "items", axis=axis)
    kept = [i for i in items if not isinstance(i, int)]  # the output's axes: slices, lists and new ones
    new_axes = [axis for axis, i in enumerate(kept) if i is None]
    if new_axes:
        out = ex.op("Unsqueeze", [out, ex.const("axes", np.array(new_axes, np.int64))], "new_axis")
    return Value(out, x.kind, x.scale, x.zero_point)


def _setitem(ex, x: Value, value, items: list, rank: int, name: str, mask_rank: int | None = None) -> Value:
    """x with x[items] = value (ops.setitem; Hugging Face's Swin mask): Where(mask, value, x), the mask the product of
    one test per indexed axis on its positions (start <= p < stop for a slice, p == i for an int; negative bounds
    count from the end, out-of-range ones clamp, as in Python), or a boolean tensor's (`h[h < 0] = 0`; one of
    x's leading axes only: each of its values stands for the rest of x)."""
    boolean = len(items) == 1 and _is_mask(items[0])
    if boolean and isinstance(value, Value):  # x[mask] = values: one per true position of the mask, in order
        src, values, kind = ((x.name, value.name, x.kind) if _integers(x, value) or x.kind == value.kind == "bool"
                             else (ex.floats(x), _c(ex, value), "float"))
        return Value(ex.op("ScatterND", [src, _mask_positions(ex, items[0]), values], name), kind)
    if type(value) not in (int, float, bool) or items.count(Ellipsis) > 1 or (boolean and mask_rank is None) or (
            not boolean and not all(i is Ellipsis or type(i) is int or (isinstance(i, slice) and i.step in (None, 1))
                                    for i in items)):
        raise QatkitError(f"x[{', '.join(map(_shown, items))}] = {_shown(value)} (node '{name}') has no ONNX form in "
                          "qatkit. Fix: assign a number to items indexed by ints, slices (step 1) and one ..., or "
                          "to those of one boolean mask (a number or its values), or build the tensor with "
                          "torch.where")
    if boolean:
        mask = items[0].name
        if mask_rank < rank:  # a mask over the leading axes: the same test for all values of the others
            mask = ex.op("Unsqueeze", [mask, ex.const("axes", np.arange(mask_rank, rank, dtype=np.int64))], "on_rest")
        items = []
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (rank - len(items) + 1) + items[at + 1:]

    def bound(b, size: Value) -> str:  # a position from the start
        if type(b) is int:
            return ex.op("Add", [size.name, _i(ex, b)], "from_end") if b < 0 else _i(ex, b)
        negative = ex.op("Less", [b.name, _i(ex, 0)], "negative")
        return ex.op("Where", [negative, ex.op("Add", [size.name, b.name], "from_end"), b.name], "bound")

    tests = []
    for axis, i in enumerate(items):
        if i == slice(None):
            continue
        size = _size(ex, x, axis)
        positions = ex.op("Range", [_i(ex, 0), size.name, _i(ex, 1)], "positions")
        if type(i) is int:
            test = ex.op("Equal", [positions, bound(i, size)], "at")
        else:
            test = ex.op("GreaterOrEqual", [positions, bound(i.start or 0, size)], "from")
            if i.stop is not None:
                test = ex.op("And", [test, ex.op("Less", [positions, bound(i.stop, size)], "to")], "within")
        others = [a for a in range(rank) if a != axis]
        tests.append(ex.op("Unsqueeze", [test, ex.const("axes", np.array(others, np.int64))], "on_axis") if others else test)
    if not boolean:
        mask = reduce(lambda a, b: ex.op("And", [a, b], "mask"), tests) if tests else ex.const("all", np.array(True))
    src, kind = (ex.floats(x), "float") if x.kind == "quant" else (x.name, _kind(x))
    fill = ex.const("value", np.array(value, {"float": np.float32, "int": np.int64, "bool": np.bool_}[kind]))
    return Value(ex.op("Where", [mask, fill, src], name), kind)


def _shown(v) -> str:
    """An index or value in a message: an exported tensor by its kind, else as written."""
    return f"<{v.kind} tensor>" if isinstance(v, Value) else repr(v)


def _is_mask(index) -> bool:
    return isinstance(index, Value) and index.kind == "bool"


def _mask_positions(ex, mask) -> str:
    """The (N, k) positions where a boolean mask over x's first k axes is true, in row-major order (GatherND's and
    ScatterND's indices)."""
    return _nonzero(ex, mask[0] if isinstance(mask, list) else mask, None, False, "positions").name


def _i(ex, v) -> str:
    """An int64 input: an exported integer value or a Python int as a constant."""
    return v.name if isinstance(v, Value) else ex.const("c", np.array(v, np.int64))


def _integers(*values) -> bool:
    """Whether every value is an int64 tensor (sizes, ids, positions) or a Python int."""
    return all(isinstance(v, Value) and v.kind in ("shape", "int") or type(v) is int for v in values)


def _c(ex, v) -> str:
    """A float input: an exported value (dequantized if integer) or a Python number as a constant."""
    if isinstance(v, Value):
        return ex.floats(v)
    return ex.const("c", np.array(v, np.float32))


def _nonzero(ex, x: Value, rank: int | None, as_tuple: bool, name: str) -> Value | list[Value]:
    """torch.nonzero(x): ONNX NonZero's (rank, N) positions transposed to (N, rank); as_tuple (torch.where(x)) one
    (N,) row per axis (x's `rank` of them). Codes are compared as values (a code equal to the zero point is a zero)."""
    if as_tuple and rank is None:
        raise QatkitError(f"nonzero (node '{name}') of a tensor of unknown rank has no ONNX form in qatkit. Fix: "
                          "compute its input from the model's inputs by ops of known rank")
    positions = ex.op("NonZero", [ex.floats(x) if x.kind == "quant" else x.name], "positions")
    if not as_tuple:
        return Value(ex.op("Transpose", [positions], name, perm=[1, 0]), "int")
    return [Value(ex.op("Gather", [positions, _i(ex, axis)], f"{name}_{axis}", axis=0), "int") for axis in range(rank)]


def _scatter(ex, short, x, args, kwargs, rank, name) -> Value:
    """x.scatter(dim, index, src or value[, reduce=]), x.scatter_add(dim, index, src), x.scatter_reduce(dim, index, src,
    "sum" / "prod"): ONNX ScatterElements (opset 17: replace, add, multiply), updates in index order as PyTorch adds
    them; src cut to the index's shape (PyTorch reads that corner of it), a number expanded to it."""
    dim, index, src = (_arg(args, kwargs, i, k, None) for i, k in ((1, "dim"), (2, "index"), (3, "src")))
    src = kwargs.get("value") if src is None else src
    reduce = "add" if short == "scatter_add" else _arg(args, kwargs, 4, "reduce", None)
    reduction = {None: "none", "add": "add", "sum": "add", "multiply": "mul", "prod": "mul"}.get(reduce)
    if reduction is None or not kwargs.get("include_self", True):
        raise QatkitError(f"{short} with reduce={reduce!r}, include_self={kwargs.get('include_self', True)!r} (node "
                          f"'{name}') has no ONNX form in opset 17; allowed: no reduce, 'add'/'sum', "
                          "'multiply'/'prod', include_self=True. Fix: use one of those (a mean as a sum over a count's "
                          "sum)")
    index, integers = _i(ex, index), _integers(x, src)
    shape = ex.op("Shape", [index], "index_shape")
    if isinstance(src, Value):
        updates = ex.op("Slice", [_i(ex, src) if integers else ex.floats(src),
                                  ex.const("starts", np.zeros(rank, np.int64)), shape], "updates")
    else:  # a number
        updates = ex.op("Expand", [_i(ex, src) if integers else _c(ex, src), shape], "updates")
    data, kind = (_i(ex, x), "int") if integers else (ex.floats(x), "float")
    return Value(ex.op("ScatterElements", [data, index, updates], name, axis=dim, reduction=reduction), kind)


def _raw_arg(node, i: int, key: str):
    """A call's argument as the integer model holds it (by position or name): a {"node": ...} reference, whose value
    on the example ex.shapes holds, or a constant."""
    return node["args"][i] if len(node["args"]) > i else node["kwargs"].get(key)


def _normalized_axes(ex, node) -> int:
    """How many last axes F.layer_norm / F.rms_norm normalize: the length of normalized_shape (an int, a list, or
    sizes the model read from a tensor: their value on the example)."""
    raw = _raw_arg(node, 1, "normalized_shape")
    return len(ex.shapes[raw["node"]]) if isinstance(raw, dict) else len(_ints(raw, 1))


def _float_op(ex, node, short, args, kwargs, rank) -> Value:
    name = node["name"]
    x = args[0]
    if short == "cat":  # DQ → Concat (→ the Q after it): ONNX Runtime's QLinearConcat where every part is integer
        if not all(isinstance(v, Value) and v.kind == "quant" for v in x):
            ex.float_ops.setdefault(short, []).append(node.get("module", name))
        parts = [ex.floats(v) for v in x]
        return Value(ex.op("Concat", parts, name, axis=_arg(args, kwargs, 1, "dim", 0)), "float")
    if short == "stack":  # Unsqueeze each part at dim, Concat
        dim = _arg(args, kwargs, 1, "dim", 0)
        dim = dim if dim >= 0 else dim + ex.rank(node["args"][0][0]["node"]) + 1
        axes = ex.const("axes", np.array([dim], np.int64))
        return Value(ex.op("Concat", [ex.op("Unsqueeze", [ex.floats(v), axes], "part") for v in x], name, axis=dim), "float")
    if not (isinstance(x, Value) and x.kind in ("shape", "int")):
        ex.float_ops.setdefault(short, []).append(node.get("module", name))
    if short == "einsum":  # torch.einsum(equation, a, b) or (equation, [a, b])
        operands = args[1] if len(args) == 2 and isinstance(args[1], list) else args[1:]
        return Value(ex.op("Einsum", [ex.floats(v) for v in operands], name, equation=x.replace(" ", "")), "float")
    if short == "nonzero" or short == "where" and len(args) == 1:  # positions of the non-zero values (MoE routing:
        return _nonzero(ex, x, rank, short == "where" or bool(kwargs.get("as_tuple")), node["name"])  # torch.where(m))
    if short == "where":  # torch.where(condition, a, b): of integers (positions) an integer, else a float
        cond = x.name if x.kind == "bool" else ex.op("Cast", [x.name], "cond", to=TensorProto.BOOL)
        if _integers(args[1], args[2]):
            return Value(ex.op("Where", [cond, _i(ex, args[1]), _i(ex, args[2])], name), "int")
        return Value(ex.op("Where", [cond, _c(ex, args[1]), _c(ex, args[2])], name), "float")
    if short == "add" and isinstance(x, Value) and x.kind == "shape" and isinstance(args[1], list):  # size + (C,)
        return Value(ex.op("Concat", [x.name, ex.shape_tensor(args[1])], name, axis=0), "shape")
    if short in BINARY or short in ("floordiv", "mod"):
        if _integers(x, args[1]) and short in ("add", "iadd", "sub", "mul", "floordiv", "mod"):  # sizes, ids, positions
            a, b = _i(ex, x), _i(ex, args[1])
            if short == "floordiv":  # Python's a // b = (a - a mod b) / b (Div alone truncates: -1 // 2 would be 0)
                return Value(ex.op("Div", [ex.op("Sub", [a, ex.op("Mod", [a, b], "mod")], "a"), b], name), "int")
            return Value(ex.op({"mod": "Mod"}.get(short) or BINARY[short], [a, b], name), "int")  # Mod: Python's sign
        if short in ("floordiv", "mod"):  # floor(a / b); a - floor(a / b)·b
            a, b = _c(ex, x), _c(ex, args[1])
            floor = ex.op("Floor", [ex.op("Div", [a, b], "div")], name if short == "floordiv" else "floor")
            return Value(floor if short == "floordiv" else ex.op("Sub", [a, ex.op("Mul", [floor, b], "m")], name), "float")
        return Value(ex.op(BINARY[short], [_c(ex, x), _c(ex, args[1])], name), "float")
    if short in ("ceil", "floor") and node["fn"].startswith("math."):  # math.ceil(H / stride) of sizes: an int
        if _integers(x):
            return x
        rounded = ex.op("Ceil" if short == "ceil" else "Floor", [_c(ex, x)], "rounded")
        return Value(ex.op("Cast", [rounded], name, to=TensorProto.INT64), "int")
    if short in ("abs", "neg") and _integers(x):  # of positions
        return Value(ex.op(UNARY[short], [_i(ex, x)], name), "int")
    if short == "round" and (decimals := _arg(args, kwargs, 1, "decimals", 0)):
        raise QatkitError(f"torch.round with decimals={decimals} (node '{name}') has no ONNX form in qatkit; allowed: "
                          "decimals=0. Fix: scale, round and scale back (torch.round(x * 100) / 100)")
    if short in UNARY:
        return Value(ex.op(UNARY[short], [_c(ex, x)], name), "float")
    if short == "pow":  # x ** 2 as x·x (as torch computes it), other exponents as Pow
        base, exponent = _c(ex, x), _c(ex, args[1])
        return Value(ex.op("Mul", [base, base], name) if args[1] == 2 else ex.op("Pow", [base, exponent], name), "float")
    if short == "rsqrt":
        return Value(ex.op("Reciprocal", [ex.op("Sqrt", [_c(ex, x)], "sqrt")], name), "float")
    if short in ("scatter", "scatter_add", "scatter_reduce"):
        return _scatter(ex, short, x, args, kwargs, rank, name)
    xf = ex.floats(x)
    if short == "relu6":
        return Value(ex.op("Clip", [xf, ex.const("lo", np.float32(0)), ex.const("hi", np.float32(6))], name), "float")
    if short == "silu":
        return Value(ex.op("Mul", [xf, ex.op("Sigmoid", [xf], "sig")], name), "float")
    if short in ("elu", "celu"):
        alpha = float(_arg(args, kwargs, 1, "alpha", 1.0))
        return Value(ex.op(short.capitalize(), [xf], name, alpha=alpha), "float")
    if short in ("softplus", "mish", "log_sigmoid"):  # softplus(βx)/β, x where βx > threshold (as PyTorch)
        if short == "log_sigmoid":  # -softplus(-x)
            return Value(ex.op("Neg", [ex.op("Softplus", [ex.op("Neg", [xf], "neg")], "sp")], name), "float")
        beta, threshold = ((_arg(args, kwargs, 1, "beta", 1.0), _arg(args, kwargs, 2, "threshold", 20.0))
                           if short == "softplus" else (1.0, 20.0))
        bx = xf if beta == 1 else ex.op("Mul", [xf, _c(ex, beta)], "bx")
        sp = ex.op("Softplus", [bx], "sp")
        sp = sp if beta == 1 else ex.op("Div", [sp, _c(ex, beta)], "sp")
        sp = ex.op("Where", [ex.op("Greater", [bx, _c(ex, threshold)], "big"), xf, sp],
                   name if short == "softplus" else "softplus")
        return Value(sp if short == "softplus" else ex.op("Mul", [xf, ex.op("Tanh", [sp], "t")], name), "float")
    if short == "prelu":  # one slope per channel (axis 1): shaped (C, 1, …) to broadcast from the right
        slope = _c(ex, args[1])
        if rank > 2:
            slope = ex.op("Reshape", [slope, ex.const("shape", np.array([-1] + [1] * (rank - 2), np.int64))], "slope")
        return Value(ex.op("PRelu", [xf, slope], name), "float")
    if short == "glu":  # a · sigmoid(b), a and b the halves of x along dim
        dim = _axis(_arg(args, kwargs, 1, "dim", -1), rank)
        half = ex.shapes[node["args"][0]["node"]].shape[dim] // 2
        a, b = _slice_axis(ex, xf, 0, half, dim), _slice_axis(ex, xf, half, 2 * half, dim)
        return Value(ex.op("Mul", [a, ex.op("Sigmoid", [b], "gate")], name), "float")
    if short in ("log_softmax", "softmin"):
        dim = _arg(args, kwargs, 1, "dim", None)
        if short == "softmin":
            return Value(ex.op("Softmax", [ex.op("Neg", [xf], "neg")], name, axis=dim), "float")
        return Value(ex.op("LogSoftmax", [xf], name, axis=dim), "float")
    if short == "tanhshrink":
        return Value(ex.op("Sub", [xf, ex.op("Tanh", [xf], "t")], name), "float")
    if short in ("hardshrink", "softshrink"):  # 0 within ±λ; x (hard) or x ∓ λ (soft) outside
        lambd = float(_arg(args, kwargs, 1, "lambd", 0.5))
        return Value(ex.op("Shrink", [xf], name, lambd=lambd, bias=lambd if short == "softshrink" else 0.0), "float")
    if short == "_threshold":  # x where x > threshold, else value
        threshold, value = _arg(args, kwargs, 1, "threshold", None), _arg(args, kwargs, 2, "value", None)
        return Value(ex.op("Where", [ex.op("Greater", [xf, _c(ex, threshold)], "above"), xf, _c(ex, value)], name),
                     "float")
    if short == "local_response_norm":
        size = _arg(args, kwargs, 1, "size", None)
        if size % 2 == 0:  # PyTorch's window is [c - n/2, c + n/2 - 1], ONNX's LRN's [c - n/2 + 1, c + n/2]
            raise QatkitError(f"LocalResponseNorm of an even size {size} (node '{name}') sums other channels than "
                              "ONNX's LRN. Fix: use an odd size (AlexNet's and GoogLeNet's 5)")
        return Value(ex.op("LRN", [xf], name, size=size, alpha=float(_arg(args, kwargs, 2, "alpha", 1e-4)),
                           beta=float(_arg(args, kwargs, 3, "beta", 0.75)), bias=float(_arg(args, kwargs, 4, "k", 1.0))),
                     "float")
    if short == "gelu":  # x/2·(1 + erf(x/√2)); approximate='tanh' (GPT-2's): x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        if kwargs.get("approximate", "none") == "tanh":
            cube = ex.op("Mul", [ex.op("Mul", [xf, xf], "x2"), xf], "x3")
            poly = ex.op("Add", [xf, ex.op("Mul", [cube, _c(ex, 0.044715)], "c")], "poly")
            inner = ex.op("Tanh", [ex.op("Mul", [poly, _c(ex, float(np.sqrt(2 / np.pi)))], "t")], "tanh")
        else:
            inner = ex.op("Erf", [ex.op("Mul", [xf, ex.const("c", np.float32(1 / np.sqrt(2)))], "g")], "erf")
        half = ex.op("Mul", [xf, ex.const("c", np.float32(0.5))], "half")
        return Value(ex.op("Mul", [half, ex.op("Add", [inner, ex.const("one", np.float32(1))], "g")], name), "float")
    if short in ("hardswish", "hardsigmoid"):  # PyTorch's: x·relu6(x + 3)/6 and relu6(x + 3)/6
        op = "HardSwish" if short == "hardswish" else "HardSigmoid"
        return Value(ex.op(op, [xf], name, **({} if op == "HardSwish" else {"alpha": 1 / 6, "beta": 0.5})), "float")
    if short == "leaky_relu":
        return Value(ex.op("LeakyRelu", [xf], name, alpha=float(_arg(args, kwargs, 1, "negative_slope", 0.01))), "float")
    if short in ("hardtanh", "clamp"):
        lo, hi = ((_arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)) if short == "hardtanh"
                  else (_arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)))
        if isinstance(lo, Value) or isinstance(hi, Value):  # torch.clamp(x, min=t): elementwise, Max and Min
            out = xf if lo is None else ex.op("Max", [xf, _c(ex, lo)], "lo")
            return Value(out if hi is None else ex.op("Min", [out, _c(ex, hi)], name), "float")
        bounds = ["" if v is None else ex.const("b", np.float32(v)) for v in (lo, hi)]
        return Value(ex.op("Clip", [xf, *bounds], name), "float")
    if short == "masked_scores":  # SDPA's attn_mask: a boolean one keeps its True positions, a float one is added
        mask = args[1]
        if mask.kind == "bool":
            return Value(ex.op("Where", [mask.name, xf, ex.const("ninf", np.array(-np.inf, np.float32))], name), "float")
        return Value(ex.op("Add", [xf, ex.floats(mask)], name), "float")
    if short == "masked_fill":  # Where(mask, value, x)
        mask = args[1] if args[1].kind == "bool" else ex.op("Cast", [args[1].name], "mask", to=TensorProto.BOOL)
        mask = mask.name if isinstance(mask, Value) else mask
        value = _c(ex, _arg(args, kwargs, 2, "value", 0.0))  # a number, or a 0-d tensor (DistilBERT's)
        return Value(ex.op("Where", [mask, value, xf], name), "float")
    if short == "pad":  # PyTorch's pads run from the last axis backwards: (left, right, top, bottom, ...)
        torch_pads, mode = _arg(args, kwargs, 1, "pad", None), _arg(args, kwargs, 2, "mode", "constant")
        if mode not in ("constant", "reflect", "replicate"):
            raise QatkitError(f"F.pad mode {mode!r} (node '{name}') has no ONNX form in opset 17; allowed: constant, "
                              "reflect, replicate. Fix: use one of those modes")
        begin, end = [0] * rank, [0] * rank
        for i in range(len(torch_pads) // 2):
            begin[rank - 1 - i], end[rank - 1 - i] = torch_pads[2 * i], torch_pads[2 * i + 1]
        value = ex.const("v", np.array(_arg(args, kwargs, 3, "value", None) or 0.0, np.float32))
        return Value(ex.op("Pad", [xf, ex.shape_tensor(begin + end), value], name,  # pads may follow sizes
                           mode={"replicate": "edge"}.get(mode, mode)), "float")
    if short == "interpolate":
        return Value(_resize(ex, node, xf, args, kwargs, rank), "float")
    if short in ("unfold", "fold"):  # F.unfold / F.fold (im2col, col2im), 4-D
        return Value(_im2col(ex, node, short, xf, args, kwargs), "float")
    if short == "affine_grid":
        return Value(_affine_grid(ex, args, kwargs, name), "float")
    if short == "grid_sample":  # (N, C, H, W) sampled at grid (N, Hₒ, Wₒ, 2) of (x, y) in [-1, 1]
        mode, padding = _arg(args, kwargs, 2, "mode", "bilinear"), _arg(args, kwargs, 3, "padding_mode", "zeros")
        if rank != 4:
            raise QatkitError(f"grid_sample of a {rank}-D input (node '{name}'); allowed: 4-D (N, C, H, W), as the "
                              "GridSample of ONNX opset 17 (qatkit's). Fix: sample each 2-D slice of the volume")
        corners = int(bool(_arg(args, kwargs, 4, "align_corners", False)))
        return Value(ex.op("GridSample", [xf, ex.floats(_arg(args, kwargs, 1, "grid", None))], name, mode=mode,
                           padding_mode=padding, align_corners=corners), "float")
    if short == "softmax":
        return Value(ex.op("Softmax", [xf], name, axis=_arg(args, kwargs, 1, "dim", -1)), "float")
    if short == "layer_norm":  # F.layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5)
        axes = _normalized_axes(ex, node)
        weight, bias = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None)
        scale = _c(ex, weight) if weight is not None else ex.op(  # ONNX's Scale is not optional: ones, x's last sizes
            "Expand", [_c(ex, 1.0), ex.op("Shape", [xf], "normalized_shape", start=-axes)], "ones")
        inputs = [xf, scale] + ([] if bias is None else [_c(ex, bias)])
        return Value(ex.op("LayerNormalization", inputs, name, axis=-axes, epsilon=_arg(args, kwargs, 4, "eps", 1e-5)),
                     "float")
    if short == "rms_norm":  # x / sqrt(mean(x², the normalized axes) + eps) · weight; eps None: float32's eps
        weight, eps = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "eps", None)
        eps = float(np.finfo(np.float32).eps) if eps is None else eps
        ms = ex.op("ReduceMean", [ex.op("Mul", [xf, xf], "sq")], "ms", axes=list(range(-_normalized_axes(ex, node), 0)),
                   keepdims=1)
        inv = ex.op("Reciprocal", [ex.op("Sqrt", [ex.op("Add", [ms, _c(ex, eps)], "ms_eps")], "rms")], "inv_rms")
        out = ex.op("Mul", [xf, inv], "normed")
        return Value(out if weight is None else ex.op("Mul", [out, _c(ex, weight)], name), "float")
    if short in ("normalize", "norm"):  # F.normalize: x / max(‖x‖_p, eps) along dim; x.norm(p, dim, keepdim)
        p = _arg(args, kwargs, 1, "p", 2.0 if short == "normalize" else "fro")
        dim = _arg(args, kwargs, 2, "dim", 1 if short == "normalize" else None)
        keep = short == "normalize" or _arg(args, kwargs, 3, "keepdim", False)
        if p not in (1, 2, "fro") or dim is None:
            raise QatkitError(f"{short} with p={p!r}, dim={dim!r} (node '{name}') has no ONNX form in qatkit; allowed: "
                              "p = 1 or 2 along a given dim. Fix: use those")
        reduce = "ReduceL1" if p == 1 else "ReduceL2"
        norm = ex.op(reduce, [xf], "norm", axes=[dim] if isinstance(dim, int) else list(dim), keepdims=int(bool(keep)))
        if short == "norm":
            return Value(norm, "float")
        eps = _c(ex, _arg(args, kwargs, 3, "eps", 1e-12))
        return Value(ex.op("Div", [xf, ex.op("Max", [norm, eps], "norm_eps")], name), "float")
    if short in ("instance_norm", "batch_norm"):  # F.instance_norm(x, running_mean, running_var, weight, bias,
        # use_input_stats, momentum, eps), F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
        # eps): an InstanceNormalization, or in eval with running statistics a BatchNormalization
        channels = ex.shapes[node["args"][0]["node"]].shape[1]
        weight, bias = (_c(ex, v) if (v := _arg(args, kwargs, i, k, None)) is not None
                        else ex.const(k, np.full(channels, fill, np.float32))  # None: ones and zeros, as PyTorch's
                        for i, k, fill in ((3, "weight", 1.0), (4, "bias", 0.0)))
        eps = _arg(args, kwargs, 7, "eps", 1e-5)
        if short == "instance_norm" and _arg(args, kwargs, 5, "use_input_stats", True):
            return Value(ex.op("InstanceNormalization", [xf, weight, bias], name, epsilon=eps), "float")
        stats = [_c(ex, _arg(args, kwargs, i, k, None)) for i, k in ((1, "running_mean"), (2, "running_var"))]
        return Value(ex.op("BatchNormalization", [xf, weight, bias, *stats], name, epsilon=eps), "float")
    if short == "group_norm":  # (N, C, ...) normalised over each group of C/G channels and the spatial axes
        groups, eps = _arg(args, kwargs, 1, "num_groups", None), _arg(args, kwargs, 4, "eps", 1e-5)
        grouped = ex.op("Reshape", [xf, ex.const("shape", np.array([0, groups, -1], np.int64))], "grouped")
        centred = ex.op("Sub", [grouped, ex.op("ReduceMean", [grouped], "mean", axes=[2], keepdims=1)], "centred")
        var = ex.op("ReduceMean", [ex.op("Mul", [centred, centred], "sq")], "var", axes=[2], keepdims=1)
        normed = ex.op("Div", [centred, ex.op("Sqrt", [ex.op("Add", [var, _c(ex, eps)], "var_eps")], "std")], "normed")
        out = ex.op("Reshape", [normed, ex.op("Shape", [xf], "shape")], "ungrouped")
        per_channel = np.array([-1] + [1] * (rank - 2), np.int64)  # (C, 1, ...): broadcast over the spatial axes
        for key, op in (("weight", "Mul"), ("bias", "Add")):
            if kwargs.get(key) is not None:
                out = ex.op(op, [out, ex.op("Reshape", [_c(ex, kwargs[key]), ex.const("shape", per_channel)], key)], key)
        return Value(out, "float")
    if short == "embedding":
        return Value(ex.op("Gather", [_c(ex, _arg(args, kwargs, 1, "weight", None)), x.name], name, axis=0), "float")
    if short in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
        n = int(short[-2])
        size = _arg(args, kwargs, 1, "output_size", None)
        size = [size] * n if isinstance(size, int) else list(size)
        if set(size) == {1}:
            return Value(ex.op("GlobalAveragePool", [xf], name), "float")
        spatial = list(ex.shapes[node["args"][0]["node"]].shape[2:])  # fixed by the model; only the batch varies
        size = [s_in if s is None else s for s, s_in in zip(size, spatial)]
        if any(s_in % s for s, s_in in zip(size, spatial)):  # windows of several sizes, overlapping
            return Value(_uneven_average_pool(ex, xf, spatial, size, name), "float")
        k = [s_in // s for s, s_in in zip(size, spatial)]  # equal windows: an average pool with kernel = stride
        return Value(ex.op("AveragePool", [xf], name, kernel_shape=k, strides=k), "float")
    if short in ("lp_pool1d", "lp_pool2d", "lp_pool3d"):  # PyTorch's formula, op for op
        return Value(_lp_pool(ex, xf, int(short[-2]), args, kwargs, name), "float")
    if short in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        n = int(short[-2])
        k = _arg(args, kwargs, 1, "kernel_size", None)
        stride = _arg(args, kwargs, 2, "stride", None) or k
        pad = _arg(args, kwargs, 3, "padding", 0)
        k, stride, pad = ([v] * n if isinstance(v, int) else list(v) for v in (k, stride, pad))
        ceil = bool(_arg(args, kwargs, 4, "ceil_mode", False))
        count_pad = bool(_arg(args, kwargs, 5, "count_include_pad", True)) and any(pad)
        # divisor_override: each window's sum over the divisor, its mean over the kernel (padding counted as zeros)
        # times |kernel| / divisor (a ceil_mode window may end beyond both)
        if divisor := _arg(args, kwargs, 6, "divisor_override", None):
            if ceil:
                raise QatkitError(f"{short} with divisor_override={divisor} and ceil_mode=True (node '{name}') has no "
                                  "ONNX form in qatkit. Fix: ceil_mode=False, or pad the input to whole windows first")
            mean = ex.op("AveragePool", [xf], "window_mean", kernel_shape=k, strides=stride, pads=pad * 2,
                         count_include_pad=1)
            return Value(ex.op("Mul", [mean, _c(ex, math.prod(k) / divisor)], name), "float")
        if ceil and count_pad:  # ORT's QLinearAveragePool divides a partial last window by the kernel's size, PyTorch
            # by its cells in the padded image: the padding as zeros first, then only image cells count
            xf = ex.op("Pad", [xf, ex.const("pads", np.array([0, 0, *pad] * 2, np.int64))], "padded")
            pad, count_pad = [0] * n, False
        return Value(ex.op("AveragePool", [xf], name, kernel_shape=k, strides=stride, pads=pad * 2,
                           ceil_mode=int(ceil), count_include_pad=int(count_pad)), "float")
    if short in ("mean", "sum", "prod"):
        dim = _arg(args, kwargs, 1, "dim", None)
        keep = int(bool(_arg(args, kwargs, 2, "keepdim", False)))
        axes = None if dim is None else _ints(dim) if not isinstance(dim, int) else [dim]
        if short in ("mean", "prod"):  # (their axes an attribute in opset 17)
            op = "ReduceMean" if short == "mean" else "ReduceProd"
            return Value(ex.op(op, [xf], name, keepdims=keep, **({"axes": axes} if axes else {})), "float")
        extra = [ex.const("axes", np.array(axes, np.int64))] if axes else []
        return Value(ex.op("ReduceSum", [xf, *extra], name, keepdims=keep), "float")
    if short in ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        # float layers qatkit left float
        weight, bias = _arg(args, kwargs, 1, "weight", None), _arg(args, kwargs, 2, "bias", None)
        inputs = [xf, _c(ex, weight)] + ([_c(ex, bias)] if bias is not None else [])
        # F.conv*d(x, w, b, stride, padding, dilation, groups), F.conv_transpose*d(x, w, b, stride, padding,
        # output_padding, groups, dilation), by position or name
        stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
        if short.startswith("conv_transpose"):
            n = int(short[-2])
            attrs = {k: _ints(v, n) for k, v in (("strides", stride), ("pads", padding), ("output_padding", _arg(
                args, kwargs, 5, "output_padding", 0)), ("dilations", _arg(args, kwargs, 7, "dilation", 1)))}
            attrs["pads"] = attrs["pads"] * 2
            return Value(ex.op("ConvTranspose", inputs, name, group=_arg(args, kwargs, 6, "groups", 1), **attrs),
                         "float")
        if short == "linear" and rank == 2:
            return Value(ex.op("Gemm", inputs, name, transB=1), "float")
        if short == "linear":  # x · Wᵀ (+ b) over the last axis of a (B, T, in) input
            y = ex.op("MatMul", [xf, ex.op("Transpose", [inputs[1]], "wT", perm=[1, 0])], name)
            return Value(ex.op("Add", [y, inputs[2]], f"{name}_bias") if bias is not None else y, "float")
        n, dilation = int(short[-2]), _ints(_arg(args, kwargs, 5, "dilation", 1), int(short[-2]))
        weight = _raw_arg(node, 1, "weight")  # computed, or stored (a conv a LayerRule leaves float)
        kernel = (ex.shapes[weight["node"]] if "node" in weight else ex.model.tensor(weight["tensor"])).shape[2:]
        pads = onnx_pads(padding if isinstance(padding, str) else _ints(padding, n), kernel, dilation)
        return Value(ex.op("Conv", inputs, name, strides=_ints(stride, n), pads=pads, dilations=dilation,
                           group=_arg(args, kwargs, 6, "groups", 1)), "float")
    raise QatkitError(f"op {node['fn']!r} (node '{name}') has no ONNX form in qatkit. "
                      "Fix: express it with supported ops (see qatkit/export/onnx_ops.py)")


_RESIZE_MODES = {  # PyTorch's mode: ONNX's mode, coordinate_transformation_mode, nearest_mode
    "nearest": ("nearest", "asymmetric", "floor"),
    "nearest-exact": ("nearest", "half_pixel", "round_prefer_ceil"),  # floor((dst + ½)/scale) = round_up(x_orig)
    "linear": ("linear", "half_pixel", "floor"), "bilinear": ("linear", "half_pixel", "floor"),
    "trilinear": ("linear", "half_pixel", "floor"), "bicubic": ("cubic", "half_pixel", "floor")}


def _resize(ex, node, xf: str, args, kwargs, rank: int) -> str:
    """F.interpolate / nn.Upsample as Resize: PyTorch's 'nearest' takes the floor of dst/scale (asymmetric),
    'nearest-exact' the floor of (dst + ½)/scale (half_pixel's (dst + ½)/scale - ½, ties rounded up),
    its (bi/tri)linear and bicubic modes (Keys' kernel, a = -0.75, the edge pixel repeated outside: ONNX's defaults)
    sample at pixel centres (half_pixel) or corners (align_corners). The output size is floor(size · scale_factor); with
    recompute_scale_factor the sampling follows output / input size, which a Resize given those sizes does (the sizes
    in float64, as PyTorch's: 10 · 1.3 is 13, not float32's 12.99…)."""
    mode = _arg(args, kwargs, 3, "mode", "nearest")
    if mode not in _RESIZE_MODES:
        raise QatkitError(f"interpolation mode {mode!r} (node '{node['name']}') has no ONNX form in qatkit; allowed: "
                          f"{', '.join(_RESIZE_MODES)}. Fix: use one of those modes")
    onnx_mode, coords, nearest_mode = _RESIZE_MODES[mode]
    if kwargs.get("align_corners"):
        coords = "align_corners"
    size, scale = _arg(args, kwargs, 1, "size", None), _arg(args, kwargs, 2, "scale_factor", None)
    spatial = rank - 2
    recompute = size is None and _arg(args, kwargs, 5, "recompute_scale_factor", None)
    if size is not None or recompute:
        shape = ex.op("Shape", [xf], "shp")
        lead = ex.op("Slice", [shape, ex.const("s", np.array([0], np.int64)),
                               ex.const("e", np.array([2], np.int64))], "lead")  # (batch, channels)
        if recompute:  # floor(size · scale) in float64
            sizes = ex.op("Cast", [ex.op("Slice", [shape, ex.const("s", np.array([2], np.int64)),
                                                   ex.const("e", np.array([rank], np.int64))], "in_sizes")],
                          "in_sizes_f64", to=TensorProto.DOUBLE)
            factors = np.array(scale if isinstance(scale, list) else [scale] * spatial, np.float64)
            scaled = ex.op("Floor", [ex.op("Mul", [sizes, ex.const("scales", factors)], "scaled")], "floor")
            spatial_sizes = ex.op("Cast", [scaled], "out_sizes", to=TensorProto.INT64)
        elif isinstance(size, Value):  # another tensor's sizes (x.shape[-2:]): an int64 vector already
            spatial_sizes = size.name
        else:  # ints, or sizes of the graph (FPN's lateral.shape[-2:] given as a list)
            spatial_sizes = ex.shape_tensor(size if isinstance(size, list) else [size] * spatial)
        inputs = [xf, "", "", ex.op("Concat", [lead, spatial_sizes], "sizes", axis=0)]
    else:
        scales = [1.0, 1.0] + (scale if isinstance(scale, list) else [scale] * spatial)
        inputs = [xf, "", ex.const("scales", np.array(scales, np.float32))]
    return ex.op("Resize", inputs, node["name"], mode=onnx_mode, coordinate_transformation_mode=coords,
                 nearest_mode=nearest_mode, **({"cubic_coeff_a": -0.75} if onnx_mode == "cubic" else {}))


def _affine_grid(ex, args: list, kwargs: dict, name: str) -> str:
    """F.affine_grid(theta (N, 2, 3), size (N, C, H, W)) as PyTorch computes it: the base grid of (x, y, 1), x from
    torch.linspace(-1, 1, W) (times (W - 1)/W without align_corners: pixel centres), y the same over H, times thetaᵀ:
    (N, H, W, 2); H and W ints or sizes of the input."""
    size = _arg(args, kwargs, 1, "size", None)
    if isinstance(size, list) and len(size) != 4:  # (a size of the input: x.size() of the 4-D map it samples)
        raise QatkitError(f"F.affine_grid of size {size} (node '{name}'); allowed: a 4-D size (N, C, H, W). Fix: "
                          "sample each 2-D slice of the volume")
    dims = size.name if isinstance(size, Value) else ex.shape_tensor(size)
    h, w = (Value(ex.op("Gather", [dims, ex.const("axis", np.array(i, np.int64))], "dim"), "int") for i in (2, 3))
    coords = []
    for steps in (w, h):
        line = _linspace(ex, [-1.0, 1.0, steps], {}, "line").name
        if not _arg(args, kwargs, 2, "align_corners", False):  # linspace · (steps - 1) / steps
            n = ex.op("Cast", [steps.name], "n", to=TensorProto.FLOAT)
            line = ex.op("Div", [ex.op("Mul", [line, ex.op("Sub", [n, _c(ex, 1.0)], "n1")], "scaled"), n], "centres")
        coords.append(line)
    hw = ex.op("Concat", [ex.op("Unsqueeze", [v.name, ex.const("axes", np.array([0], np.int64))], "d") for v in (h, w)],
               "hw", axis=0)
    xs = ex.op("Expand", [coords[0], hw], "xs")  # (H, W): x along each row
    ys = ex.op("Expand", [ex.op("Unsqueeze", [coords[1], ex.const("axes", np.array([1], np.int64))], "y"), hw], "ys")
    ones = ex.op("ConstantOfShape", [hw], "ones", value=onnx_helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    last = ex.const("axes", np.array([-1], np.int64))
    base = ex.op("Concat", [ex.op("Unsqueeze", [v, last], "c") for v in (xs, ys, ones)], "base", axis=-1)  # (H, W, 3)
    flat = ex.op("Reshape", [base, ex.const("shape", np.array([1, -1, 3], np.int64))], "flat")
    theta_t = ex.op("Transpose", [ex.floats(_arg(args, kwargs, 0, "theta", None))], "theta_t", perm=[0, 2, 1])
    grid = ex.op("MatMul", [flat, theta_t], "grid")  # (N, H·W, 2)
    shape = ex.op("Concat", [ex.op("Slice", [dims, ex.const("s", np.array([0], np.int64)),
                                             ex.const("e", np.array([1], np.int64))], "n"),
                             hw, ex.const("two", np.array([2], np.int64))], "grid_shape", axis=0)
    return ex.op("Reshape", [grid, shape], name)


def _linspace(ex, args: list, kwargs: dict, name: str) -> Value:
    """torch.linspace(start, end, steps) in float32 by PyTorch's formula: step = (end - start) / (steps - 1), value i =
    start + step·i in the first half (i < steps // 2), end - step·(steps - 1 - i) in the second, start alone at
    steps = 1 (its CPU kernel's vectorised loop adds the step to a vector's first value instead: some values an ulp
    apart); steps an int or a size of the input."""
    start, end, steps = (_arg(args, kwargs, i, key, None) for i, key in enumerate(("start", "end", "steps")))
    if kwargs.get("dtype") not in (None, "float"):
        raise QatkitError(f"torch.linspace with dtype {kwargs['dtype']!r} in node '{name}'; allowed: float32 (the "
                          "default). Fix: build it in float32 and convert the result (torch.linspace(...).long())")
    n = ex.op("Cast", [steps.name], "steps", to=TensorProto.INT64) if isinstance(steps, Value) \
        else ex.const("steps", np.array(steps, np.int64))
    i = ex.op("Range", [ex.const("zero", np.array(0, np.int64)), n, ex.const("one", np.array(1, np.int64))], "i")
    fi, fn = (ex.op("Cast", [v], "f", to=TensorProto.FLOAT) for v in (i, n))
    intervals = ex.op("Sub", [fn, ex.const("one", np.array(1.0, np.float32))], "intervals")  # steps - 1
    first, last = (ex.floats(v) if isinstance(v, Value) else ex.const("bound", np.array(v, np.float32))
                   for v in (start, end))
    step = ex.op("Div", [ex.op("Sub", [last, first], "span"), intervals], "step")
    low = ex.op("Add", [first, ex.op("Mul", [step, fi], "offset")], "low")
    high = ex.op("Sub", [last, ex.op("Mul", [step, ex.op("Sub", [intervals, fi], "back")], "offset")], "high")
    half = ex.op("Div", [n, ex.const("two", np.array(2, np.int64))], "half")
    values = ex.op("Where", [ex.op("Less", [i, half], "first_half"), low, high], "values")
    single = ex.op("Equal", [n, ex.const("one", np.array(1, np.int64))], "single")
    return Value(ex.op("Where", [single, first, values], name), "float")


def _factory(ex, short: str, args: list, kwargs: dict, name: str) -> Value:
    """torch.zeros/ones/full(sizes) as ConstantOfShape (float32), x.new_zeros/new_ones/new_full(sizes) the same in
    x's type, torch.zeros_like/ones_like/full_like(x) of x's shape and type, torch.arange as Range (int64),
    torch.linspace from Range (_linspace); sizes from ints or the input's dims; dtype= float32, int64 or bool (the
    model file refuses others)."""
    if short == "linspace":
        return _linspace(ex, args, kwargs, name)
    if short == "arange":
        bounds = [0, args[0], 1] if len(args) == 1 else [*args, 1][:3]
        ints = [ex.op("Cast", [b.name], "b", to=TensorProto.INT64) if isinstance(b, Value)
                else ex.const("b", np.array(b, np.int64)) for b in bounds]
        positions = Value(ex.op("Range", ints, name), "int")
        return positions if kwargs.get("dtype") in (None, "int") else Value(ex.floats(positions), "float")
    kind, base = "float", short
    if short.startswith("new_") or short.endswith("_like"):  # the type of x, the first argument
        kind = _kind(args[0])
        base = short.removeprefix("new_").removesuffix("_like")
    kind = kwargs.get("dtype") or kind
    positional_fill = base == "full" and "fill_value" not in kwargs  # torch.full(sizes, v) or (…, fill_value=v)
    if base == "full":
        fill = args[-1] if positional_fill else kwargs["fill_value"]
    else:
        fill = {"zeros": 0, "ones": 1}[base]
    if short.endswith("_like"):
        shape = ex.op("Shape", [args[0].name], "shape")
    else:
        sizes = args[1 if short.startswith("new_") else 0:len(args) - positional_fill]
        if len(sizes) == 1 and isinstance(sizes[0], Value) and sizes[0].kind == "shape":  # torch.ones(x.size())
            shape = sizes[0].name
        else:
            shape = ex.shape_tensor(list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], list) else list(sizes))
    if isinstance(fill, Value):  # a fill from sizes (GPT-2's torch.full([], v.size(-1) ** 0.5)): expanded to shape
        src = ex.floats(fill) if kind == "float" else ex.op("Cast", [fill.name], "fill", to=_ONNX_TYPES[kind])
        return Value(ex.op("Expand", [src, shape], name), kind)
    cast = {"int": int, "bool": bool}.get(kind, float)
    value = onnx_helper.make_tensor("value", _ONNX_TYPES[kind], [1], [cast(fill)])
    return Value(ex.op("ConstantOfShape", [shape], name, value=value), kind)
