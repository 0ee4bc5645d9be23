"""The closed set of operations an integer model file may name, shared by the writer and the runtime.

A file can only call what is listed here: loading never imports or runs anything named by the file.
"""
from __future__ import annotations

import copy
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

def masked_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention scores under F.scaled_dot_product_attention's attn_mask: a boolean mask keeps its True positions
    (the rest become -inf), a float mask is added."""
    return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask


def topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):  # noqa: A002
    """torch.topk with ONNX's order among equal values (the lower index first; torch's is arbitrary): a stable sort,
    cut to k. Quantized values tie often, and the positions pick neighbours (DGCNN's k nearest points)."""
    values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


# node.meta key of an in-place op that prepare could not make functional (why: an input, a buffer or a view of its
# tensor read later shows the change), which convert refuses
UNSEEN_CHANGE = "qatkit_in_place"


def setitem(x: torch.Tensor, value, *index) -> torch.Tensor:
    """x with x[index] = value, as a new tensor: `x[index] = value` on a tensor made in forward, made functional
    (Hugging Face's Swin: `img_mask[:, h, w, :] = count` for its shifted-window mask). The index is the items of a
    tuple index, so that the integer model's file (which holds tuples as lists) cannot confuse it with a list of ints."""
    y = x.clone()
    y[index] = value
    return y


_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, operator.getitem, operator.neg,
    operator.iadd, operator.ne, operator.eq, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.invert, operator.floordiv, operator.mod, math.sqrt, math.ceil, math.floor, getattr,
    torch.add, torch.sub, torch.mul, torch.matmul, torch.cat, torch.flatten, torch.reshape, torch.transpose,
    torch.permute, torch.squeeze, torch.unsqueeze, torch.relu, torch.sigmoid, torch.tanh, torch.softmax,
    torch.mean, torch.sum, torch.sqrt, torch.exp,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.softmax, F.layer_norm, F.embedding, F.batch_norm, F.linear,
    F.conv1d, F.conv2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.dropout, F.hardswish, F.hardsigmoid, F.leaky_relu, F.hardtanh, torch.clamp, F.interpolate,
    F.conv_transpose1d, F.conv_transpose2d, F.pad, torch.stack, torch.zeros, torch.ones, torch.full, torch.arange,
    torch.linspace, torch.zeros_like, torch.ones_like, torch.full_like, torch.chunk, torch.split, masked_scores,
    torch.where,
    torch.tril, torch.triu, torch.einsum, operator.pow, torch.pow, torch.rsqrt, torch.sin, torch.cos,
    torch.repeat_interleave, torch.unbind, F.group_norm, F.normalize, F.pixel_shuffle, F.instance_norm, torch.roll,
    *([F.rms_norm] if hasattr(F, "rms_norm") else []),  # F.rms_norm, nn.RMSNorm: torch >= 2.4
    F.elu, F.selu, F.celu, F.softplus, F.mish, F.prelu, F.glu, F.log_softmax, F.softmin, F.logsigmoid, F.softsign,
    F.tanhshrink, F.hardshrink, F.softshrink, F.threshold, F.local_response_norm, F.pixel_unshuffle,
    F.channel_shuffle, torch.unflatten, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.meshgrid,
    F.conv3d, F.conv_transpose3d, F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d,
    torch.max, torch.min, torch.amax, torch.amin, torch.cumsum, torch.argmax, torch.argmin, topk, torch.abs, torch.log,
    setitem, F.lp_pool1d, F.lp_pool2d, *([F.lp_pool3d] if hasattr(F, "lp_pool3d") else []), torch.clone, torch.detach,
    torch.flip, torch.erf, torch.sign, torch.reciprocal, F.grid_sample, F.affine_grid, torch.floor, torch.ceil,
    torch.round, torch.gather, F.unfold, F.fold, torch.tan, torch.atan, torch.asin, torch.acos, torch.sinh, torch.cosh,
    torch.prod, torch.scatter, torch.scatter_add, torch.scatter_reduce, torch.nonzero,
]
FUNCTIONS = {f"{getattr(fn, '__module__', None) or 'builtins'}.{fn.__name__}": fn for fn in _FUNCTIONS}
NAME_OF = {fn: name for name, fn in FUNCTIONS.items()}
DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}  # dtype= arguments a file may name
GETATTR = NAME_OF[getattr]  # allowed for these attributes only:
ATTRIBUTES = ("shape", "device", "dtype", "values", "indices")  # (the last two: of torch.max(x, dim)'s pair)
METHODS = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "softmax", "mean", "sum", "size",
           "relu", "sigmoid", "unsqueeze", "squeeze", "expand", "mul", "add", "matmul", "dim", "float", "clamp",
           "masked_fill", "new_zeros", "new_ones", "new_full", "chunk", "split", "tril", "triu", "to", "type_as",
           "pow", "rsqrt", "sqrt", "exp", "neg", "sin", "cos", "repeat_interleave", "unbind", "norm", "roll", "unflatten",
           "long", "int", "bool", "max", "min", "amax", "amin", "cumsum", "argmax", "argmin", "repeat", "abs", "log",
           "tanh", "log_softmax", "sub", "clone", "detach", "flip", "erf", "sign", "reciprocal", "floor", "ceil",
           "round", "gather", "unfold", "tan", "atan", "asin", "acos", "sinh", "cosh", "prod", "scatter",
           "scatter_add", "scatter_reduce", "nonzero"}
# Ops applied to integer codes directly: they keep values on the grid (ReLU handled with the zero point);
# chunk, split and unbind give a tuple of pieces on the same grid. prepare lets quantization pass through them.
CODE_PRESERVING_FUNCTIONS = (torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                             torch.unsqueeze, F.max_pool1d, F.max_pool2d, F.max_pool3d, operator.getitem, torch.chunk,
                             torch.split, torch.repeat_interleave, torch.unbind, F.pixel_shuffle, torch.roll,
                             F.pixel_unshuffle, F.channel_shuffle, torch.unflatten, F.adaptive_max_pool1d,
                             F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.clone, torch.detach, torch.flip,
                             torch.gather)
CODE_PRESERVING_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "squeeze", "unsqueeze",
                           "expand", "chunk", "split", "repeat_interleave", "unbind", "roll", "unflatten", "repeat",
                           "clone", "detach", "flip", "gather", "unfold"}
CODE_PRESERVING = {NAME_OF[f] for f in CODE_PRESERVING_FUNCTIONS} | CODE_PRESERVING_METHODS | {"identity"}
RELU = {NAME_OF[torch.relu], NAME_OF[F.relu], "relu"}
# Max/min over an axis (PointNet's global max pool: torch.max(x, 2)[0], x.max(-1).values, x.amax(2)) and topk keep
# codes (the largest code is the code of the largest value); torch.max(a, b) of two tensors computes in float.
REDUCE_FUNCTIONS = (torch.max, torch.min, torch.amax, torch.amin, topk)
REDUCE_METHODS = {"max", "min", "amax", "amin"}
REDUCE = {NAME_OF[f] for f in REDUCE_FUNCTIONS} | REDUCE_METHODS


def reduces(args: list, target=None) -> bool:
    """torch.max(x, dim) and torch.max(x) reduce; torch.max(a, b) (b a tensor) is elementwise; topk (`target`)
    selects, its k an int or a size of the graph."""
    return target is topk or len(args) < 2 or isinstance(args[1], (int, list, tuple))


def _pool_kwargs(m):
    return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding)


def _transpose_kwargs(m):
    return dict(stride=m.stride, padding=m.padding, output_padding=m.output_padding, groups=m.groups, dilation=m.dilation)


# Module type -> (function, parameter/buffer names passed as keywords of the same name, other keywords).
MODULES = {
    **{cls: (fn, (), lambda m: dict(_pool_kwargs(m), dilation=m.dilation, ceil_mode=m.ceil_mode))
       for cls, fn in ((nn.MaxPool1d, F.max_pool1d), (nn.MaxPool2d, F.max_pool2d), (nn.MaxPool3d, F.max_pool3d))},
    **{cls: (fn, (), lambda m: dict(_pool_kwargs(m), ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                                    **({"divisor_override": m.divisor_override} if getattr(m, "divisor_override", None)
                                       else {})))  # (AvgPool2d/3d's)
       for cls, fn in ((nn.AvgPool1d, F.avg_pool1d), (nn.AvgPool2d, F.avg_pool2d), (nn.AvgPool3d, F.avg_pool3d))},
    **{cls: (fn, (), lambda m: dict(output_size=m.output_size))
       for cls, fn in ((nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d), (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),
                       (nn.AdaptiveAvgPool3d, F.adaptive_avg_pool3d))},
    **{cls: (fn, (), lambda m: dict(norm_type=m.norm_type, kernel_size=m.kernel_size, stride=m.stride,
                                    ceil_mode=m.ceil_mode))
       for cls, fn in ((nn.LPPool1d, F.lp_pool1d), (nn.LPPool2d, F.lp_pool2d),
                       *([(nn.LPPool3d, F.lp_pool3d)] if hasattr(nn, "LPPool3d") else []))},
    nn.Flatten: (torch.flatten, (), lambda m: dict(start_dim=m.start_dim, end_dim=m.end_dim)),
    nn.ReLU: (F.relu, (), lambda m: {}),
    nn.ReLU6: (F.relu6, (), lambda m: {}),
    nn.Sigmoid: (torch.sigmoid, (), lambda m: {}),
    nn.Tanh: (torch.tanh, (), lambda m: {}),
    nn.SiLU: (F.silu, (), lambda m: {}),
    nn.GELU: (F.gelu, (), lambda m: dict(approximate=m.approximate)),
    nn.Hardswish: (F.hardswish, (), lambda m: {}),
    nn.Hardsigmoid: (F.hardsigmoid, (), lambda m: {}),
    nn.LeakyReLU: (F.leaky_relu, (), lambda m: dict(negative_slope=m.negative_slope)),
    # eval: a leaky ReLU of the mean slope, as torch computes it (random slopes in training only)
    nn.RReLU: (F.leaky_relu, (), lambda m: dict(negative_slope=(m.lower + m.upper) / 2)),
    nn.Hardtanh: (F.hardtanh, (), lambda m: dict(min_val=m.min_val, max_val=m.max_val)),
    nn.Upsample: (F.interpolate, (), lambda m: dict(size=m.size, scale_factor=m.scale_factor, mode=m.mode,
                                                    align_corners=m.align_corners,
                                                    recompute_scale_factor=m.recompute_scale_factor)),
    nn.Softmax: (F.softmax, (), lambda m: dict(dim=m.dim)),
    nn.PixelShuffle: (F.pixel_shuffle, (), lambda m: dict(upscale_factor=m.upscale_factor)),
    nn.LayerNorm: (F.layer_norm, ("weight", "bias"), lambda m: dict(normalized_shape=m.normalized_shape, eps=m.eps)),
    **({nn.RMSNorm: (F.rms_norm, ("weight",), lambda m: dict(normalized_shape=m.normalized_shape, eps=m.eps))}
       if hasattr(nn, "RMSNorm") else {}),
    nn.GroupNorm: (F.group_norm, ("weight", "bias"), lambda m: dict(num_groups=m.num_groups, eps=m.eps)),
    **{cls: (F.instance_norm, ("running_mean", "running_var", "weight", "bias"),  # eval: running statistics if tracked
             lambda m: dict(use_input_stats=not m.track_running_stats, eps=m.eps))
       for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    nn.Embedding: (F.embedding, ("weight",), lambda m: dict(padding_idx=m.padding_idx)),
    **{cls: (F.batch_norm, ("running_mean", "running_var", "weight", "bias"), lambda m: dict(eps=m.eps))
       for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)},
    nn.Linear: (F.linear, ("weight", "bias"), lambda m: {}),
    nn.Conv1d: (F.conv1d, ("weight", "bias"), lambda m: dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)),
    nn.Conv2d: (F.conv2d, ("weight", "bias"), lambda m: dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)),
    nn.Conv3d: (F.conv3d, ("weight", "bias"), lambda m: dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)),
    nn.ConvTranspose1d: (F.conv_transpose1d, ("weight", "bias"), lambda m: _transpose_kwargs(m)),
    nn.ConvTranspose2d: (F.conv_transpose2d, ("weight", "bias"), lambda m: _transpose_kwargs(m)),
    nn.ConvTranspose3d: (F.conv_transpose3d, ("weight", "bias"), lambda m: _transpose_kwargs(m)),
}
IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                    nn.Identity)
# torch.nn modules whose forward is one call of a function above: traced through (fx records the call), not kept
# as modules, so that the integer model and the ONNX export know them by their function.
TRACED_THROUGH = (nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.PReLU, nn.GLU, nn.LogSoftmax, nn.Softmax2d,
                  nn.Softmin, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold,
                  nn.LocalResponseNorm, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Unflatten, nn.AdaptiveMaxPool1d,
                  nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                  nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                  nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ConstantPad3d, nn.ReflectionPad3d, nn.ReplicationPad3d,
                  *([nn.ZeroPad3d] if hasattr(nn, "ZeroPad3d") else []), nn.Unfold, nn.Fold,
                  *([nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d] if hasattr(nn, "CircularPad2d") else []))


def own_parameter_free(module: nn.Module) -> bool:
    """A module of the model's own code (outside torch.nn) without parameters: drop path, noise, a helper."""
    return not type(module).__module__.startswith("torch.nn") and next(module.parameters(), None) is None


def graph_in_mode(module: nn.Module, training: bool, tracer: type[fx.Tracer] = fx.Tracer) -> fx.Graph | None:
    """module's fx graph in train (True) or eval mode (a copy is traced); None where fx cannot trace it."""
    try:
        return tracer().trace(copy.deepcopy(module).train(training))
    except Exception:  # noqa: BLE001 - fx raises many types on code it cannot trace
        return None


def identity_in_eval(module: nn.Module) -> bool:
    """nn.Dropout and nn.Identity, and a parameter-free module of the model's own code whose eval-mode forward
    returns its input (drop path, stochastic depth, noise layers: training-only code); the integer model skips them."""
    if isinstance(module, IDENTITY_MODULES):
        return True
    graph = graph_in_mode(module, False) if own_parameter_free(module) else None
    if graph is None:
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    return bool(inputs) and next(n for n in graph.nodes if n.op == "output").args[0] is inputs[0]


def convertible(node, modules: dict) -> bool:
    """Whether a float op of a traced graph (an fx.Node) has an integer-model form; the writer refuses the rest."""
    if node.op == "call_module":
        return type(modules[node.target]) in MODULES or identity_in_eval(modules[node.target])
    if node.op == "call_function":
        return node.target in NAME_OF
    return node.op != "call_method" or node.target in METHODS


def supported_modules() -> str:
    return ", ".join(sorted({t.__name__ for t in (*MODULES, *IDENTITY_MODULES, *TRACED_THROUGH)}))
