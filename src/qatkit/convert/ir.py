"""From a prepared (fx) QAT model to the integer model's graph: a list of JSON-able nodes + tensors.

Node kinds:
  input     - a graph input ("argument": forward's argument name, where it differs from the node's; "sizes": per
              axis, null where the graph takes any size, else the one it takes: prepare's input_sizes)
  output    - the model's output: a tensor, or a list of them (a tuple's; a dict's values, its keys under "names")
  quantize  - float → integer codes at (scale, zero_point), clamped to [qmin, qmax]
  qlayer    - integer conv/transposed conv/linear: packed weight codes, per-channel scales, int32 bias, requantization
  qembed    - embedding lookup of packed codes times their row's scale (float rows out)
  qadd      - integer residual add (ONNX Runtime's QLinearAdd arithmetic), optionally with ReLU
  qpool     - integer global average pooling (QLinearGlobalAveragePool arithmetic)
  qmatmul   - integer matmul of two activations (QLinearMatMul arithmetic)
  call      - a function from the closed table in ops.py, on integer codes where it keeps the grid,
              else on dequantized values
  output
Arguments are literals, {"node": name}, {"tensor": key}, {"slice": [a, b, c]}, {"ellipsis": true} (x[..., 0]),
{"torch_dtype": "float32" | "int64" | "bool"} or lists of these.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from qatkit import kernels
from qatkit.convert import ops
from qatkit.convert.pack import pack
from qatkit.errors import QatkitError
from qatkit.nn import QAdd, QConv, QConvTranspose, QEmbedding, QGlobalAvgPool, QLayer, QMatMul
from qatkit.quantizer import FakeQuantizer


def _quant_fields(q: FakeQuantizer, tensors: dict, key: str) -> dict:
    scale, zp = q.qparams()
    tensors[f"{key}.scale"] = scale.float().contiguous()
    qmin, qmax = q.qrange
    return {"scale": {"tensor": f"{key}.scale"}, "zero_point": int(zp), "qmin": qmin, "qmax": qmax}


class _Writer:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.nodes: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def arg(self, a):
        if isinstance(a, fx.Node):
            return {"node": a.name}
        if isinstance(a, (list, tuple)):
            return [self.arg(x) for x in a]
        if isinstance(a, slice):
            return {"slice": [self.arg(a.start), self.arg(a.stop), self.arg(a.step)]}  # bounds may be sizes
        if a is Ellipsis:
            return {"ellipsis": True}
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, torch.dtype):
            name = next((k for k, v in ops.DTYPES.items() if v == a), None)
            if name is None:
                raise QatkitError(f"a dtype argument ({a}) cannot be stored in an integer model file; allowed: "
                                  f"{', '.join(f'torch.{k}' for k in ops.DTYPES)}. Fix: make the tensor in one of "
                                  "those types and cast the result")
            return {"torch_dtype": name}
        raise QatkitError(f"argument {a!r} of type {type(a).__name__} cannot be stored in an integer model file. "
                          "Fix: compute it inside the model from tensors and ints")

    def tensor(self, key: str, t: torch.Tensor) -> dict:
        self.tensors[key] = t.detach().contiguous()
        return {"tensor": key}

    def shared_tensor(self, first: str, key: str, field: str, t: torch.Tensor) -> dict:
        """A later call's tensor that equals the first call's is stored once (shared weights stay shared)."""
        stored = self.tensors.get(f"{first}.{field}")
        if stored is not None and stored.dtype == t.dtype and torch.equal(stored, t):
            return {"tensor": f"{first}.{field}"}
        return self.tensor(f"{key}.{field}", t)

    def write(self) -> tuple[list[dict], dict[str, torch.Tensor]]:
        for node in self.gm.graph.nodes:
            if why := node.meta.get(ops.UNSEEN_CHANGE):
                raise QatkitError(f"{why}: the integer model computes out of place, and would not show the change "
                                  "there. Fix: write it out of place (y = y.relu(), y = torch.cat([y[:, :4].relu(), "
                                  "y[:, 4:]], 1)) so that later code reads the new tensor")
            entry = getattr(self, f"_{node.op}")(node)
            if entry is not None:
                self.nodes.append({"name": node.name, **entry})
        return self.nodes, self.tensors

    def _placeholder(self, node):  # forward's argument, where fx renamed the node (input → input_1)
        entry = {"op": "input"} if node.target == node.name else {"op": "input", "argument": node.target}
        info = getattr(self.gm, "qat_info", None)
        sizes = getattr(info, "input_sizes", {}).get(node.target)
        kind = getattr(info, "input_kinds", {}).get(node.target)
        return {**entry, **({} if sizes is None else {"sizes": sizes}), **({} if kind is None else {"kind": kind})}

    def _output(self, node):
        out = node.args[0]
        names = list(out) if isinstance(out, dict) else None
        values = list(out.values()) if names is not None else out
        if (not all(isinstance(o, fx.Node) for o in (values if isinstance(values, (list, tuple)) else [values]))
                or not all(isinstance(k, str) for k in names or [])):
            raise QatkitError(f"the model returns {type(out).__name__} {out}; an integer model returns a tensor, a "
                              "tuple of tensors or a dict of tensors by name. Fix: return tensors only (leave None "
                              "values out of a returned dict)")
        return {"op": "output", "args": [self.arg(values)], **({"names": names} if names is not None else {})}

    def _get_attr(self, node):
        value = self._resolve(node.target)
        if isinstance(value, FakeQuantizer):
            return None  # a quantizer handed to a layer: its parameters are written with the layer
        # its own key space: a layer's int32 bias is stored as "<layer>.bias", where a float read of that bias lives
        return {"op": "constant", "value": self.tensor(f"constant/{node.target}", value)}

    def _resolve(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _call_function(self, node):
        name = ops.NAME_OF.get(node.target)
        if name is None or (name == ops.GETATTR and node.args[1] not in ops.ATTRIBUTES):
            raise QatkitError(f"function {getattr(node.target, '__name__', node.target)!r} (node '{node.name}') has no "
                              f"integer-model form; allowed: {', '.join(sorted(ops.FUNCTIONS))}. Fix: express it "
                              "with those, or replace it by a supported module")
        args, kwargs = list(node.args), dict(node.kwargs)
        if not args and "input" in kwargs:  # F.linear(input=x, ...): the input first, as every op reads it
            args.append(kwargs.pop("input"))
        return {"op": "call", "fn": name, "args": self.arg(args), "kwargs": {k: self.arg(v) for k, v in kwargs.items()}}

    def _call_method(self, node):
        if node.target not in ops.METHODS:
            raise QatkitError(f"tensor method {node.target!r} (node '{node.name}') has no integer-model form. "
                              f"Fix: use one of {', '.join(sorted(ops.METHODS))}")
        return {"op": "call", "fn": node.target, "method": True, "args": self.arg(node.args), "kwargs": {k: self.arg(v) for k, v in node.kwargs.items()}}

    def _call_module(self, node):
        m = self.modules[node.target]
        if isinstance(m, FakeQuantizer):
            return {"op": "quantize", "args": [self.arg(node.args[0])], **_quant_fields(m, self.tensors, node.target)}
        if isinstance(m, QEmbedding):
            return self._qembed(node, m)
        if isinstance(m, QLayer):
            return self._qlayer(node, m)
        if isinstance(m, (QAdd, QGlobalAvgPool, QMatMul)):
            n_in = 1 if isinstance(m, QGlobalAvgPool) else 2
            in_qs = [self._resolve(a.target) for a in node.args[n_in:]]
            op = {QAdd: "qadd", QGlobalAvgPool: "qpool", QMatMul: "qmatmul"}[type(m)]
            entry = {"op": op, "args": [self.arg(a) for a in node.args[:n_in]],
                     "inputs": [_quant_fields(q, self.tensors, f"{node.target}.input{i}") for i, q in enumerate(in_qs)],
                     "output": _quant_fields(m.out_quant, self.tensors, f"{node.target}.output")}
            return {**entry, "act": m.act} if op == "qadd" else entry
        if ops.identity_in_eval(m):
            return {"op": "call", "fn": "identity", "args": [self.arg(node.args[0])], "kwargs": {}}
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise QatkitError(f"float conv '{node.target}' (not quantized) has padding={m.padding!r}, padding_mode="
                              f"{m.padding_mode!r}; a float conv in an integer model pads with zeros by numbers only. "
                              "Fix: let qatkit quantize it (drop its skip rule), or give it numeric zero padding")
        spec = ops.MODULES.get(type(m))
        if getattr(m, "return_indices", False):  # (F.max_pool2d(..., return_indices=True) traces as another function)
            raise QatkitError(f"module '{node.target}' ({type(m).__name__}) returns its indices (return_indices=True: "
                              "MaxUnpool's input), which have no integer-model form. Fix: build it with "
                              "return_indices=False where the indices go unused")
        if spec is None:
            raise QatkitError(f"module '{node.target}' ({type(m).__name__}) has no integer-model form; allowed: "
                              f"{ops.supported_modules()}, the layers qatkit quantizes, and parameter-free modules "
                              "that return their input in eval mode (drop path). Fix: replace it by one of those or "
                              "leave it out of the model")
        fn, params, kwargs = spec
        kw = {p: (None if getattr(m, p) is None else self.tensor(f"{node.target}.{p}", getattr(m, p))) for p in params}
        kw.update({k: self.arg(v) for k, v in kwargs(m).items()})
        return {"op": "call", "fn": ops.NAME_OF[fn], "args": self.arg(node.args), "kwargs": kw, "module": node.target}

    def _qembed(self, node, m: QEmbedding):
        if not bool(m.weight_quant.initialized):
            raise QatkitError(f"embedding '{node.target}' has no weight range. Fix: build the QAT model with qatkit.prepare")
        key, bits = node.target, int(m.weight_quant.bits)
        scale = m.weight_quant.qparams()[0].expand(m.weight.shape[0])  # (V,): per row, or one for all
        return {"op": "qembed", "module": key, "args": [self.arg(node.args[0])], "bits": bits, "shape": list(m.weight.shape),
                "weight": self.tensor(f"{key}.weight", pack(m.weight_quant.codes(m.weight), bits)),
                "weight_scale": self.tensor(f"{key}.weight_scale", scale.float())}

    def _qlayer(self, node, m: QLayer):
        in_q = m.input_quant or (self._resolve(node.args[1].target) if len(node.args) > 1 else None)
        if in_q is None or not in_q.active or not m.weight_quant.spec.symmetric or not bool(m.weight_quant.enabled):
            raise QatkitError(f"layer '{node.target}' has no quantized input, or its weights are asymmetric or not "
                              "quantized (weight_quant disabled: the QAT model computes float weights there); allowed: "
                              "an enabled, calibrated input quantizer and enabled symmetric weights (integer kernels "
                              "take no weight zero point). Fix: keep its input and weights quantized and its weights "
                              "symmetric, or leave the layer float with LayerRule(pattern=..., skip=True)")
        # A layer called twice (shared weights) has each call's input scale, bias and output: per-call keys
        key = node.target if f"{node.target}.input.scale" not in self.tensors else f"{node.target}@{node.name}"
        w, b = m.folded()
        s_in, _ = in_q.qparams()
        s_w = m.weight_qscale(in_q, b)
        codes = m.weight_quant.codes(w, s_w)
        bits = int(m.weight_quant.bits)
        kind = "conv" if isinstance(m, QConv) else "conv_transpose" if isinstance(m, QConvTranspose) else "linear"
        entry = {"op": "qlayer", "kind": kind, "module": node.target,
                 "args": [self.arg(node.args[0])], "act": m.act, "bits": bits, "shape": list(w.shape),
                 "weight": self.shared_tensor(node.target, key, "weight", pack(codes, bits)),
                 "weight_scale": self.shared_tensor(node.target, key, "weight_scale", s_w.float()),
                 "input": _quant_fields(in_q, self.tensors, f"{key}.input"),
                 "bias": None if b is None else self.tensor(f"{key}.bias", kernels.bias_codes(b, s_in * s_w).to(torch.int32)),
                 "output": None if m.out_quant is None else _quant_fields(m.out_quant, self.tensors, f"{key}.output")}
        if isinstance(m, QConv):
            entry.update(dim=m.dim, stride=list(m.stride), pads=list(m.pads), padding_mode=m.padding_mode,
                         dilation=list(m.dilation), groups=m.groups)
        if isinstance(m, QConvTranspose):
            entry.update(dim=m.dim, stride=list(m.stride), padding=list(m.padding),
                         output_padding=list(m.output_padding), dilation=list(m.dilation), groups=m.groups)
        return entry


def conv_pads(node: dict) -> tuple[list[int], str]:
    """A conv node's ONNX-order pads and padding mode (files written before padding modes hold `padding`)."""
    return node.get("pads", node.get("padding", [0] * node.get("dim", 2)) * 2), node.get("padding_mode", "zeros")


def to_ir(gm: fx.GraphModule) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Graph nodes and tensors of the integer model of a prepared QAT GraphModule (eval mode)."""
    return _Writer(gm).write()

