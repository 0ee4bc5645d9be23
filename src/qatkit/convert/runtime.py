"""IntegerModel: runs an integer model graph (see ir.py) in PyTorch.

Quantized values flow as integer codes with their (scale, zero point); conv/linear accumulate
exactly and requantize through `qatkit.kernels`, the code the QAT model's eval forward runs, so the
two compute the same integers. Float ops (softmax, LayerNorm, ...) see dequantized values.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qatkit import kernels
from qatkit.convert import ops
from qatkit.convert.ir import conv_pads
from qatkit.convert.pack import unpack
from qatkit.errors import DataError
from qatkit.inputs import as_args, check_sizes
from qatkit.primitives import quantize_codes



@dataclass
class QValue:
    """Integer codes (float tensor holding integers) with their quantization parameters."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: int

    def dequantize(self) -> torch.Tensor:
        return (self.codes - self.zero_point) * self.scale


def _dequantize(v):
    if isinstance(v, QValue):
        return v.dequantize()
    if isinstance(v, (list, tuple)):
        return type(v)(_dequantize(x) for x in v)
    return v


def output_list(output) -> list:
    """A model's outputs in order: its one output, a tuple's or a dict's values."""
    return list(output.values()) if isinstance(output, dict) else list(output) if isinstance(output, tuple) else [output]


class IntegerModel(nn.Module):
    """The deployable integer model: graph nodes (plain data) + tensors (int8/packed weights, scales)."""

    def __init__(self, nodes: list[dict], tensors: dict[str, torch.Tensor], meta: dict | None = None):
        super().__init__()
        self.nodes, self.meta = nodes, dict(meta or {})
        self._keys = {key: f"t{i}" for i, key in enumerate(tensors)}  # buffer names may not contain dots
        for key, t in tensors.items():
            self.register_buffer(self._keys[key], t)
        self._weights = {}  # unpacked weight codes per layer, built on first use

    def tensor(self, key: str) -> torch.Tensor:
        return getattr(self, self._keys[key])

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {key: self.tensor(key) for key in self._keys}

    def _arg(self, a, env):
        if isinstance(a, dict):
            if "node" in a:
                return env[a["node"]]
            if "tensor" in a:
                return self.tensor(a["tensor"])
            if "slice" in a:  # bounds: ints, or sizes computed in the graph
                return slice(*(None if v is None else int(v) for v in self._arg(a["slice"], env)))
            if "ellipsis" in a:
                return Ellipsis
            if "torch_dtype" in a:
                return ops.DTYPES[a["torch_dtype"]]
            return {k: self._arg(v, env) for k, v in a.items()}
        if isinstance(a, list):
            return [self._arg(x, env) for x in a]
        return a

    @property
    def input_names(self) -> list[str]:
        """The inputs' names: the traced forward's arguments, in order."""
        return [node.get("argument", node["name"]) for node in self.nodes if node["op"] == "input"]

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor):
        return self.values(*inputs, **named)["output"]

    @torch.no_grad()
    def values(self, *inputs: torch.Tensor, **named: torch.Tensor) -> dict:
        """Every node's value (QValue, tensor, shape or number) by node name; the model's output under "output".
        The inputs as the model's forward takes them: in order, or by name (input_names)."""
        names = self.input_names
        inputs = (*inputs, *as_args(named, names[len(inputs):])) if named else inputs
        if len(inputs) != len(names):
            raise DataError(f"the integer model takes {len(names)} inputs {names}; it was given {len(inputs)}. "
                            "Fix: pass every input, in order or by name")
        env, feed = {}, iter(inputs)
        for node in self.nodes:
            op = node["op"]
            if op == "input":
                env[node["name"]] = next(feed)
                check_sizes(node.get("argument", node["name"]), node.get("sizes"), env[node["name"]], node.get("kind"))
            elif op == "output":
                out = _dequantize(self._arg(node["args"][0], env))
                if "names" in node:  # several outputs: a dict by name, or a tuple, as trained
                    out = dict(zip(node["names"], out))
                env["output"] = tuple(out) if isinstance(out, list) else out
                return env
            elif op == "constant":
                env[node["name"]] = self._arg(node["value"], env)
            elif op == "quantize":
                env[node["name"]] = self._quantize(node, _dequantize(self._arg(node["args"][0], env)))
            elif op == "qlayer":
                env[node["name"]] = self._qlayer(node, self._arg(node["args"][0], env))
            elif op == "qembed":
                ids, scale = self._arg(node["args"][0], env), self.tensor(node["weight_scale"]["tensor"])
                env[node["name"]] = F.embedding(ids, self._weight_codes(node).float()) * F.embedding(ids, scale[:, None])
            elif op in ("qadd", "qpool", "qmatmul"):
                env[node["name"]] = self._requant_op(node, self._arg(node["args"], env))
            else:
                env[node["name"]] = self._call(node, self._arg(node["args"], env), self._arg(node["kwargs"], env))
        raise AssertionError("graph has no output node")

    def _quantize(self, node, x: torch.Tensor) -> QValue:
        scale, zp = self.tensor(node["scale"]["tensor"]), node["zero_point"]
        return QValue(quantize_codes(x, scale, torch.tensor(float(zp)), node["qmin"], node["qmax"]), scale, zp)

    def _weight_codes(self, node) -> torch.Tensor:
        name = node["name"]
        if name not in self._weights:
            self._weights[name] = unpack(self.tensor(node["weight"]["tensor"]), node["bits"], tuple(node["shape"])).double()
        return self._weights[name]

    def _qlayer(self, node, x) -> QValue | torch.Tensor:
        if not isinstance(x, QValue):
            x = self._quantize(node["input"], x)
        s_in, s_w = self.tensor(node["input"]["scale"]["tensor"]), self.tensor(node["weight_scale"]["tensor"])
        q_b = None if node["bias"] is None else self.tensor(node["bias"]["tensor"]).double()
        centered = (x.codes - x.zero_point).double()
        if node["kind"] == "conv":
            acc = kernels.conv(centered, self._weight_codes(node), q_b, node["stride"], *conv_pads(node),
                               node["dilation"], node["groups"])
            axis = 1
        elif node["kind"] == "conv_transpose":
            acc = kernels.conv_transpose(centered, self._weight_codes(node), q_b, node["stride"], node["padding"],
                                         node["output_padding"], node["dilation"], node["groups"])
            axis = 1
        else:
            acc, axis = F.linear(centered, self._weight_codes(node), q_b), -1
        acc, out = kernels.wrap_int32(acc), node["output"]
        if out is None:
            return kernels.dequantize_acc(acc, s_in * s_w, node["act"], axis)
        s_out, z_out = self.tensor(out["scale"]["tensor"]), torch.tensor(float(out["zero_point"]))
        lo, hi = kernels.activation_bounds(node["act"], s_out, z_out, out["qmin"], out["qmax"])
        codes = kernels.requantize(acc, kernels.multiplier(s_in, s_w, s_out), z_out, lo, hi, axis)
        return QValue(codes, s_out, out["zero_point"])

    def _requant_op(self, node, args: list) -> QValue:
        xs = [x if isinstance(x, QValue) else self._quantize(f, x) for x, f in zip(args, node["inputs"])]
        out = node["output"]
        s_out, z_out = self.tensor(out["scale"]["tensor"]), torch.tensor(float(out["zero_point"]))
        lo, hi = kernels.activation_bounds(node.get("act"), s_out, z_out, out["qmin"], out["qmax"])
        if node["op"] == "qadd":
            (a, b), signed = xs, tuple(f["qmin"] < 0 for f in (*node["inputs"], out))
            codes = kernels.add_requant(a.codes, a.zero_point, a.scale, b.codes, b.zero_point, b.scale, s_out, z_out,
                                        lo, hi, signed)
        elif node["op"] == "qmatmul":
            a, b = xs
            codes = kernels.matmul_requant(a.codes, a.zero_point, a.scale, b.codes, b.zero_point, b.scale, s_out,
                                           z_out, lo, hi)
        else:
            codes = kernels.global_avgpool_requant(xs[0].codes, xs[0].zero_point, xs[0].scale, s_out, z_out, lo, hi)
        return QValue(codes, s_out, out["zero_point"])

    def _call(self, node, args: list, kwargs: dict):
        name, x = node["fn"], args[0] if args else None
        if name == "identity":
            return x
        if isinstance(x, QValue) and name in ops.RELU:
            return QValue(torch.clamp(x.codes, min=x.zero_point), x.scale, x.zero_point)
        if isinstance(x, QValue) and name in ops.REDUCE and ops.reduces(args):  # codes; max(x, dim)'s indices as ints
            out = self._invoke(node, [x.codes, *args[1:]], kwargs)
            if isinstance(out, tuple):
                return QValue(out[0], x.scale, x.zero_point), out[1]
            return QValue(out, x.scale, x.zero_point)
        if isinstance(x, tuple) and name == ops.GETATTR:  # torch.max(x, dim).values / .indices
            return x[("values", "indices").index(args[1])]
        if isinstance(x, QValue) and name in ops.CODE_PRESERVING:
            out = self._invoke(node, [x.codes, *args[1:]], kwargs)
            if isinstance(out, tuple):  # chunk, split: pieces on the same grid
                return tuple(QValue(codes, x.scale, x.zero_point) for codes in out)
            return QValue(out, x.scale, x.zero_point)
        if isinstance(x, tuple) and name == ops.NAME_OF[operator.getitem]:  # a piece of chunk/split, as it is
            return x[args[1]]
        if isinstance(x, QValue) and name == ops.GETATTR:
            return getattr(x.codes, args[1])
        return self._invoke(node, _dequantize(args), _dequantize(kwargs))

    @staticmethod
    def _invoke(node, args, kwargs):
        if node.get("method"):
            return getattr(args[0], node["fn"])(*args[1:], **kwargs)
        if node["fn"] == ops.NAME_OF[torch.nn.functional.dropout]:
            return args[0]
        if node["fn"] == ops.NAME_OF[operator.getitem] and isinstance(args[1], list):  # x[:, 0]: a tuple index
            args = [args[0], tuple(args[1])]
        if node["fn"] == ops.NAME_OF[operator.add] and isinstance(args[0], tuple):  # x.size()[:-2] + (C,): the file
            args = [args[0], tuple(args[1])]  # holds tuples as lists
        return ops.FUNCTIONS[node["fn"]](*args, **kwargs)
