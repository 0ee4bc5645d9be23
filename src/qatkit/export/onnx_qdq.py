"""ONNX export in QDQ form: the integer model's graph written with QuantizeLinear/DequantizeLinear
around standard ops, which ONNX Runtime fuses into its integer kernels (QLinearConv, QGemm, ...).

Integer values travel as uint8/int8 tensors: ops that keep the integer grid (max pool, reshapes,
transposes, ReLU as Max with the zero point) run on them directly; a consumer that needs floats gets
a DequantizeLinear. A quantized conv/linear is DQ(x) → Conv/Gemm(DQ(w int8 or uint8 - 128), DQ(b int32, s_x·s_w))
→ [Relu] → Q, exactly the pattern the runtime turns into one integer kernel.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qatkit import kernels
from qatkit.kernels import SIGNED_SHIFT
from qatkit.errors import QatkitError
from qatkit.fileio import atomic_file
from qatkit.convert.ir import conv_pads
from qatkit.convert.pack import unpack
from qatkit.convert.runtime import IntegerModel, QValue, output_list
from qatkit.export.onnx_ops import Value, export_call
from qatkit.export.ort_numerics import stored_weights, weight_zero_point
from qatkit.inputs import as_args

OPSET = 17
CHANNEL_ALIGN = 4  # conv input channels padded to a multiple of this (see _Exporter.align_channels)


def _uint8_activations(node: dict) -> dict:
    """The node with each signed activation's zero point and code range moved up by 128 into uint8 (act_symmetric's
    int8 codes): ONNX Runtime on x86 fuses DQ → Conv / MatMul → Q into integer kernels only with uint8 activations
    (ORT_NUMERICS.md; int8 ones ran as float ops, up to 4 output steps off), and q + 128 at zero point z + 128 holds
    the same values."""
    def moved(fields):
        if isinstance(fields, list):
            return [moved(f) for f in fields]
        if isinstance(fields, dict) and "qmin" in fields and "zero_point" in fields and fields["qmin"] < 0:
            return {**fields, **{k: fields[k] + SIGNED_SHIFT for k in ("zero_point", "qmin", "qmax")}, "shifted": True}
        return fields
    return moved(node) if node["op"] == "quantize" else {k: moved(v) for k, v in node.items()}


def _codes(v):
    """A QValue's codes (of each piece of a chunk or split)."""
    if isinstance(v, tuple):
        return tuple(_codes(p) for p in v)
    return v.codes if isinstance(v, QValue) else v


class _Exporter:
    def __init__(self, model: IntegerModel, example, free_sizes: bool = True):
        self.model, self.examples = model, as_args(example, model.input_names)
        inputs = [node for node in model.nodes if node["op"] == "input"]
        # the input sizes the graph follows besides the batch (prepare's input_sizes), per input, and by size (the axes
        # of one size change together, as prepare probed them): named after the first input and axis of that size
        self.free_axes = [[axis for axis, n in enumerate(node.get("sizes") or []) if axis and n is None and free_sizes]
                          for node in inputs]
        self.free: dict[int, str] = {}
        for node, e, free in zip(inputs, self.examples, self.free_axes):
            for axis in free:
                self.free.setdefault(e.shape[axis], f"{node.get('argument', node['name'])}_{axis}")
        self.shapes = {k: _codes(v) for k, v in model.values(*self.examples).items()}  # the example's values
        self._doubled: dict | None = None  # the values at twice the example's batch, once asked for
        self._resized: dict[int, list] = {}  # resized(n), once asked for
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.env: dict[str, Value] = {}
        self.notes: list[str] = []
        self.float_ops: dict[str, list[str]] = {}  # op → module paths / nodes it runs in float at
        self.uint8_weights: list[str] = []  # layers whose 8-bit weights are stored as uint8 + 128
        self.shifted: set[str] = set()  # zero points of signed activations stored as uint8 (_uint8_activations)
        self.counter = 0

    # ---- graph building helpers ----------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.inits[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def resized(self, n: int) -> list[tuple[int, list[torch.Tensor], object]]:
        """The examples at other values of a free size n (half and twice it) and the integer model's outputs there,
        where it runs them (a model with a longest length runs no longer input); computed once."""
        if n in self._resized:
            return self._resized[n]
        probes = self._resized[n] = []
        noise = torch.Generator().manual_seed(0)
        for new in (n // 2, 2 * n) if n > 1 else (2,):
            inputs = []
            for e, free in zip(self.examples, self.free_axes):
                for axis in (a for a in free if e.shape[a] == n):
                    e = torch.cat([e, e], axis) if new > n else e.narrow(axis, 0, new)
                if e.is_floating_point():  # varied: a constant example (a zero image) gives one output at any size,
                    spread = float(e.std()) if e.numel() > 1 else 0.0  # whatever the graph does with the size
                    e = e + torch.randn(e.shape, generator=noise, dtype=e.dtype) * (spread if spread > 0 else 1.0)
                inputs.append(e)
            try:
                probes.append((new, inputs, self.model(*inputs)))
            except Exception:  # noqa: BLE001 - a size the model takes not: nothing to learn from it
                continue
        return probes

    def output_dims(self) -> list[list]:
        """Each output's ONNX dimensions: the batch, the free input sizes it follows (by their names; a size that follows
        several, its own), and the example's sizes."""
        outputs = output_list(self.shapes["output"])
        dims = [["batch", *v.shape[1:]] for v in outputs]
        follows: dict[tuple[int, int], list[str]] = {}
        for n, name in self.free.items():
            for _, _, out in self.resized(n)[:1]:
                for i, (v, w) in enumerate(zip(outputs, output_list(out))):
                    for axis in range(1, v.dim()):
                        if v.shape[axis] != w.shape[axis]:
                            follows.setdefault((i, axis), []).append(name)
        for (i, axis), names in follows.items():
            dims[i][axis] = names[0] if len(names) == 1 else f"output_{i}_{axis}"
        return dims

    def first_dim(self, argument: str, example: torch.Tensor) -> str:
        """An input's first ONNX dimension: "batch", the outputs' first, where the example's size there is theirs; an
        input whose first size differs is another size (an EmbeddingBag's ids beside its bags' offsets), named after
        it (one name for two sizes would tell a runtime they are equal)."""
        first = output_list(self.shapes["output"])[0]
        return "batch" if first.dim() == 0 or example.shape[0] == first.shape[0] else f"{argument}_0"

    def varies_with_batch(self, ir_name: str, axis: int) -> bool:
        """Whether the size of a node's value along `axis` follows the batch (it differs at twice the example's)."""
        if self._doubled is None:
            doubled = (torch.cat([e, e]) for e in self.examples)
            self._doubled = {k: _codes(v) for k, v in self.model.values(*doubled).items()}
        return self.shapes[ir_name].shape[axis] != self._doubled[ir_name].shape[axis]

    def rank(self, ir_name: str) -> int | None:
        value = self.shapes[ir_name]
        return value.dim() if isinstance(value, torch.Tensor) else None

    def qparams(self, fields: dict, hint: str) -> tuple[str, str]:
        scale = self.model.tensor(fields["scale"]["tensor"]).numpy().astype(np.float32)
        zp_type = np.uint8 if fields["qmin"] >= 0 else np.int8
        zp = self.const(f"{hint}_zp", np.array(fields["zero_point"], zp_type))
        if fields.get("shifted"):
            self.shifted.add(zp)
        return self.const(f"{hint}_scale", scale), zp

    def floats(self, v: Value) -> str:
        """v as float32: dequantized codes, cast integers and masks (as PyTorch promotes them), or v itself."""
        if v.kind == "float":
            return v.name
        if v.dq is None:
            v.dq = (self.op("DequantizeLinear", [v.name, v.scale, v.zero_point], "dq") if v.kind == "quant"
                    else self.op("Cast", [v.name], "f", to=TensorProto.FLOAT))
        return v.dq

    def quantize(self, x: str, fields: dict, hint: str, act: str | None = None) -> Value:
        """Q(x); codes narrower than the 8-bit container (4-bit codes) are clamped to their range by a Clip
        on the integer tensor after the Q, so that the Q stays fused into the producing integer kernel. `act`:
        a ReLU/ReLU6 fused into an output whose zero point is above qmin, clamped the same way (on the codes)."""
        scale, zp = self.qparams(fields, hint)
        codes = self.op("QuantizeLinear", [x, scale, zp], f"{hint}_q")
        lo, hi = fields["qmin"], fields["qmax"]
        dtype = np.uint8 if lo >= 0 else np.int8
        if (lo, hi) not in ((0, 255), (-128, 127)):
            self.note(f"{hi - lo + 1}-level activations are held in 8-bit tensors, clamped to [{lo}, {hi}] by an "
                      "integer Clip (ONNX Runtime has no kernels for narrower activations)")
        if act is not None:  # the bounds the QAT and integer models clamp to
            bounds = kernels.activation_bounds(act, self.model.tensor(fields["scale"]["tensor"]).float(),
                                               torch.tensor(float(fields["zero_point"])), lo, hi)
            lo, hi = (int(b) for b in bounds)
        if (lo, hi) not in ((0, 255), (-128, 127)):
            codes = self.op("Clip", [codes, self.const("lo", np.array(lo, dtype)), self.const("hi", np.array(hi, dtype))],
                            f"{hint}_clip")
        return Value(codes, "quant", scale, zp)

    def fused_act(self, y: str, act: str | None, out: dict | None, name: str) -> Value:
        """The output of a layer or add with a fused activation: float Relu/Clip before the Q where the Q's zero
        point is qmin (ORT fuses them away) or the output stays float; otherwise the Q, then the activation as an
        integer Clip on the codes: a float Relu between the op and its Q would keep ORT from fusing them."""
        if out is not None and act in ("relu", "relu6") and out["zero_point"] > out["qmin"]:
            return self.quantize(y, out, f"{name}_out", act)
        if act == "relu" or (act == "relu6" and out is not None and self._within_six(out)):
            y = self.op("Relu", [y], f"{name}_relu")  # relu6 whose range ends below 6: the Q saturates first
        elif act == "relu6":
            y = self.op("Clip", [y, self.const("lo", np.float32(0)), self.const("hi", np.float32(6))], f"{name}_relu6")
        return Value(y, "float") if out is None else self.quantize(y, out, f"{name}_out")

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def shape_tensor(self, dims: list) -> str:
        """An int64 shape from ints and exported int values (dynamic sizes such as the batch)."""
        if all(isinstance(d, int) for d in dims):
            return self.const("shape", np.array(dims, np.int64))
        parts = [self.const("dim", np.array([d], np.int64)) if isinstance(d, int)
                 else self.op("Unsqueeze", [d.name, self.const("axes", np.array([0], np.int64))], "dim") for d in dims]
        return self.op("Concat", parts, "shape", axis=0)

    # ---- IR nodes ---------------------------------------------------------------------------------
    def run(self, debug_outputs: bool = False) -> onnx.ModelProto:
        graph_inputs, outputs, examples = [], [], iter(zip(self.examples, self.free_axes))
        output_dims = self.output_dims()
        for node in map(_uint8_activations, self.model.nodes):
            name, op = node["name"], node["op"]
            if op == "input":
                example, free = next(examples)
                ids = not example.is_floating_point()  # token ids
                elem = TensorProto.INT64 if ids else TensorProto.FLOAT
                argument = node.get("argument", name)  # forward's argument name: a dict input's key
                dims = [self.first_dim(argument, example), *(f"{argument}_{axis}" if axis in free else n
                                                             for axis, n in enumerate(example.shape) if axis)]
                graph_inputs.append(helper.make_tensor_value_info(argument, elem, dims))
                self.env[name] = Value(argument, "int" if ids else "float")
            elif op == "output":  # one output "output", a tuple's as "output_0", "output_1", ..., a dict's by its keys
                several = isinstance(node["args"][0], list)
                results = node["args"][0] if several else [node["args"][0]]
                values = output_list(self.shapes["output"])
                for i, (result, value) in enumerate(zip(results, values)):
                    out_name = node["names"][i] if "names" in node else f"output_{i}" if several else "output"
                    self.nodes.append(helper.make_node("Identity", [self.floats(self.resolve(result))], [out_name],
                                                       name=out_name))
                    outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, output_dims[i]))
            elif op == "constant":
                self.env[name] = self.tensor_value(name, node["value"]["tensor"])
            elif op == "quantize":
                self.env[name] = self.quantize(self.floats(self.resolve(node["args"][0])), node, name)
            elif op == "qlayer":
                self.env[name] = self.qlayer(node)
            elif op == "qembed":
                self.env[name] = self.qembed(node)
            elif op in ("qadd", "qpool", "qmatmul"):
                self.env[name] = self.requant_op(node)
            else:
                self.env[name] = self.call(node)
        if debug_outputs:  # every integer value, named after its node, for per-layer comparisons
            for ir_name, v in self.env.items():  # (chunk/split/unbind pieces: as the getitem nodes that take them)
                if not (isinstance(v, Value) and v.kind == "quant" and ir_name in self.shapes):
                    continue
                if v.zero_point in self.shifted:  # stored + SIGNED_SHIFT: the model's signed codes back
                    wide = self.op("Cast", [v.name], f"debug_{ir_name}", to=TensorProto.INT32)
                    shift = self.const("shift", np.array(SIGNED_SHIFT, np.int32))
                    self.nodes.append(helper.make_node("Sub", [wide, shift], [f"debug/{ir_name}"]))
                    elem = TensorProto.INT32
                else:
                    self.nodes.append(helper.make_node("Identity", [v.name], [f"debug/{ir_name}"]))
                    elem = self.inits[v.zero_point].data_type  # (UINT8 or INT8)
                rank = self.shapes[ir_name].dim()
                outputs.append(helper.make_tensor_value_info(f"debug/{ir_name}", elem, [None] * rank))
        for op_name, where in self.float_ops.items():
            self.note(f"{op_name} runs on dequantized (float) values at: {', '.join(where)}")
        if self.uint8_weights:
            self.note(f"8-bit weights stored as uint8 with zero point 128 at: {', '.join(self.uint8_weights)} "
                      "(ONNX Runtime's u8·s8 kernel can saturate on x86 CPUs without VNNI; its u8·u8 kernel is "
                      "exact, but there about as slow as float). For int8 weights and the fast kernel, train with "
                      "reduce_range=True (--reduce-range: 7-bit weights)")
        graph = helper.make_graph(self.nodes, "qatkit", graph_inputs, outputs, list(self.inits.values()))
        opset = [helper.make_opsetid("", OPSET)]
        # the oldest IR version with this opset, not the installed onnx's newest: older runtimes load the file
        model = helper.make_model(graph, opset_imports=opset, producer_name="qatkit",
                                  ir_version=helper.find_min_ir_version_for(opset))
        onnx.checker.check_model(model)
        return model

    def resolve(self, a):
        if isinstance(a, dict) and "node" in a:
            return self.env[a["node"]]
        if isinstance(a, dict) and "tensor" in a:
            return self.tensor_value("t", a["tensor"])
        return a

    def tensor_value(self, hint: str, key: str) -> Value:
        """A stored tensor as a constant, of the kind its dtype holds (an int64 index buffer is "int")."""
        array = self.model.tensor(key).numpy()
        kind = "bool" if array.dtype == np.bool_ else "int" if np.issubdtype(array.dtype, np.integer) else "float"
        return Value(self.const(hint, array), kind)

    def align_channels(self, x: Value, codes: np.ndarray, name: str) -> tuple[Value, np.ndarray]:
        """A conv whose input channels are not a multiple of CHANNEL_ALIGN (an RGB stem: 3) gets zero-point
        channels on its integer input and zero weights for them: the same sums, but ORT's u8·s8 kernels run
        aligned rows (ResNet-20's stem, batch 32: 1.38 → ~0.7 ms on an AVX2 CPU). Exact: a padded input code
        equals the zero point, so it adds nothing whatever its weight."""
        extra = -codes.shape[1] % CHANNEL_ALIGN
        rank = codes.ndim
        pads = np.zeros(2 * rank, np.int64)
        pads[rank + 1] = extra  # end of the channel axis
        padded = self.op("Pad", [x.name, self.const(f"{name}_pads", pads), x.zero_point], f"{name}_chpad")
        codes = np.pad(codes, [(0, 0), (0, extra)] + [(0, 0)] * (rank - 2))
        return Value(padded, "quant", x.scale, x.zero_point), codes

    def pad_codes(self, x: Value, pads: list[int], mode: str, name: str) -> Value:
        """Pad the spatial axes of integer codes in a PyTorch padding mode (copies of codes: exact)."""
        nd = len(pads) // 2
        if mode == "circular":  # no such Pad in opset 17: each axis's far ends joined to it, axis by axis
            out = x.name
            for j in range(nd):
                before, after, axis = pads[j], pads[nd + j], self.const(f"{name}_axis", np.array([2 + j], np.int64))

                def piece(start: int, stop: int) -> str:
                    bounds = [self.const(f"{name}_{k}", np.array([v], np.int64)) for k, v in (("from", start),
                                                                                             ("to", stop))]
                    return self.op("Slice", [out, *bounds, axis], f"{name}_wrap")
                parts = ([piece(-before, np.iinfo(np.int64).max)] if before else []) + [out] + (
                    [piece(0, after)] if after else [])
                out = self.op("Concat", parts, f"{name}_circular", axis=2 + j) if len(parts) > 1 else out
            return Value(out, "quant", x.scale, x.zero_point)
        onnx_mode = {"reflect": "reflect", "replicate": "edge"}.get(mode)
        if onnx_mode is None:
            raise QatkitError(f"conv '{name}' pads in mode {mode!r}; ONNX opset {OPSET} pads in zeros, reflect, "
                              "replicate or circular only. Fix: train with one of those padding modes")
        all_pads = np.array([0, 0, *pads[:nd], 0, 0, *pads[nd:]], np.int64)  # batch and channel axes unpadded
        padded = self.op("Pad", [x.name, self.const(f"{name}_pads", all_pads)], f"{name}_pad", mode=onnx_mode)
        return Value(padded, "quant", x.scale, x.zero_point)

    def qlayer(self, node: dict) -> Value:
        name, x = node["name"], self.resolve(node["args"][0])
        if x.kind != "quant":
            x = self.quantize(self.floats(x), node["input"], f"{name}_in")
        codes = unpack(self.model.tensor(node["weight"]["tensor"]), node["bits"], tuple(node["shape"])).numpy().astype(np.int8)
        if node["kind"] == "conv" and node["groups"] == 1 and codes.shape[1] % CHANNEL_ALIGN:
            x, codes = self.align_channels(x, codes, name)
        s_in = self.model.tensor(node["input"]["scale"]["tensor"])
        s_w = self.model.tensor(node["weight_scale"]["tensor"])
        if node["bits"] < 8:
            self.note(f"{node['bits']}-bit weights are stored as int8 (ONNX Runtime has no {node['bits']}-bit "
                      "conv/gemm kernels)")
        per_channel = s_w.dim() == 1
        # int8, or uint8 with zero point 128 where ORT's u8·s8 kernel could saturate on a CPU without VNNI
        codes = stored_weights(codes, node["input"]["qmax"] if node["input"]["qmin"] >= 0 else None)
        if codes.dtype == np.uint8:
            self.uint8_weights.append(node.get("module", name))
        w = self.op("DequantizeLinear", [self.const(f"{name}_w", codes), self.const(f"{name}_ws", s_w.numpy()),
                                         self.const(f"{name}_wz", weight_zero_point(codes, s_w.shape))], f"{name}_wdq",
                    **({"axis": 1 if node["kind"] == "conv_transpose" else 0} if per_channel else {}))
        inputs = [None, w]
        if node["bias"] is not None:
            bias_scale = (s_in.float() * s_w.float()).numpy()  # the product kernels.py uses
            inputs.append(self.op("DequantizeLinear", [
                self.const(f"{name}_b", self.model.tensor(node["bias"]["tensor"]).numpy()),
                self.const(f"{name}_bs", bias_scale), self.const(f"{name}_bz", np.zeros(bias_scale.shape, np.int32))],
                f"{name}_bdq", **({"axis": 0} if per_channel else {})))
        rank = self.rank(node["args"][0]["node"])
        if node["kind"] == "conv":
            pads, mode = conv_pads(node)
            if mode != "zeros":  # reflect / edge padding of the integer codes, then the conv pads nothing
                x, pads = self.pad_codes(x, pads, mode, name), [0] * len(pads)
            inputs[0] = self.floats(x)
            y = self.op("Conv", inputs, name, kernel_shape=node["shape"][2:], strides=node["stride"], pads=pads,
                        dilations=node["dilation"], group=node["groups"])
        elif node["kind"] == "conv_transpose":  # ONNX Runtime has no integer kernel for it: float on DQ'd codes
            inputs[0] = self.floats(x)
            y = self.op("ConvTranspose", inputs, name, kernel_shape=node["shape"][2:], strides=node["stride"],
                        pads=node["padding"] * 2, output_padding=node["output_padding"], dilations=node["dilation"],
                        group=node["groups"])
            self.note(f"ConvTranspose '{node.get('module', name)}' stores int8 weights, but ONNX Runtime runs it in "
                      "float on their dequantized values (it has no integer kernel for it)")
        elif rank == 2:
            inputs[0] = self.floats(x)
            y = self.op("Gemm", inputs, name, transB=1)
        else:  # (..., in) → (N, in) on the integer codes, Gemm, then back to (..., out)
            lead = self.op("Slice", [self.op("Shape", [x.name], "shp"), self.const("s", np.array([0], np.int64)),
                                     self.const("e", np.array([-1], np.int64))], "lead")
            flat = Value(self.op("Reshape", [x.name, self.const("s", np.array([-1, node["shape"][1]], np.int64))], "flat"),
                         "quant", x.scale, x.zero_point)
            inputs[0] = self.floats(flat)
            y = self.op("Gemm", inputs, name, transB=1)
            back = self.op("Concat", [lead, self.const("o", np.array([node["shape"][0]], np.int64))], "shape", axis=0)
        value = self.fused_act(y, node["act"], node["output"], name)
        if node["kind"] == "linear" and rank != 2:
            value = Value(self.op("Reshape", [value.name, back], "unflat"), value.kind, value.scale, value.zero_point)
        return value

    def qembed(self, node: dict) -> Value:
        """Gather the rows' int8 codes and their scales, multiply in float32: the runtime's product, exactly."""
        name, ids = node["name"], self.resolve(node["args"][0])
        codes = unpack(self.model.tensor(node["weight"]["tensor"]), node["bits"], tuple(node["shape"])).numpy().astype(np.int8)
        if node["bits"] < 8:
            self.note(f"{node['bits']}-bit embedding codes are stored as int8 (ONNX has no {node['bits']}-bit Gather)")
        scale = self.model.tensor(node["weight_scale"]["tensor"]).numpy().astype(np.float32)[:, None]  # (V, 1)
        rows = self.op("Cast", [self.op("Gather", [self.const(f"{name}_w", codes), ids.name], f"{name}_codes")],
                       f"{name}_float", to=TensorProto.FLOAT)
        row_scales = self.op("Gather", [self.const(f"{name}_ws", scale), ids.name], f"{name}_scales")
        return Value(self.op("Mul", [rows, row_scales], name), "float")

    def requant_op(self, node: dict) -> Value:
        """DQ → Add [→ Relu] / GlobalAveragePool / MatMul → Q: fused into QLinearAdd / QLinearGlobalAveragePool /
        QLinearMatMul."""
        name = node["name"]
        xs = [self.resolve(a) for a in node["args"]]
        xs = [x if x.kind == "quant" else self.quantize(self.floats(x), f, f"{name}_in") for x, f in zip(xs, node["inputs"])]
        if node["op"] == "qadd":
            return self.fused_act(self.op("Add", [self.floats(x) for x in xs], name), node.get("act"), node["output"], name)
        if node["op"] == "qmatmul":
            return self.quantize(self.op("MatMul", [self.floats(x) for x in xs], name), node["output"], f"{name}_out")
        return self.quantize(self.op("GlobalAveragePool", [self.floats(xs[0])], name), node["output"], f"{name}_out")

    def _within_six(self, fields: dict) -> bool:
        s = float(self.model.tensor(fields["scale"]["tensor"]))
        return (fields["qmax"] - fields["zero_point"]) * s <= 6.0

    def call(self, node: dict) -> Value:
        return export_call(self, node)


def export_onnx(model, path, example_input, *, debug_outputs: bool = False) -> list[str]:
    """Write `model` (an IntegerModel, or a QAT model to convert first) as a QDQ ONNX file; returns notes
    on what could not be expressed with integer kernels. `example_input`: a tensor, a tuple of the model's inputs or a
    dict of them by name (their types and sizes become the graph's inputs', named as forward's arguments).
    The batch size is free; so are the other sizes prepare found the model's graph to follow (a text's length, an
    image's height and width: the integer model's input "sizes"), where ONNX Runtime computes the integer model at
    other values of them too (checked at half and twice the example's; else they stay the example's, with a note).
    `debug_outputs` adds every integer tensor as an output "debug/<node>" (for per-layer comparisons; such a graph
    fuses less)."""
    from qatkit.convert import convert

    integer = model if isinstance(model, IntegerModel) else convert(model)
    exporter = _Exporter(integer, example_input, free_sizes=not debug_outputs)  # (a debug graph: at the example's)
    proto = exporter.run(debug_outputs)
    with atomic_file(path) as tmp:  # (checked at other sizes before it takes the file's place: a failed write or an
        _save(proto, exporter.notes, tmp)  # interrupt leaves the file that was there)
        if exporter.free and (problem := _other_sizes_differ(tmp, integer, exporter)):
            exporter = _Exporter(integer, example_input, free_sizes=False)
            proto = exporter.run(debug_outputs)
            exporter.note(f"the ONNX inputs keep the example's sizes besides the batch: {problem}")
            _save(proto, exporter.notes, tmp)
    return exporter.notes


def _save(proto: onnx.ModelProto, notes: list[str], path) -> None:
    del proto.metadata_props[:]
    proto.metadata_props.append(onnx.StringStringEntryProto(key="qatkit_notes", value="\n".join(notes)))
    onnx.save(proto, str(path))


def _other_sizes_differ(path, integer: IntegerModel, exporter: _Exporter) -> str | None:
    """None where the ONNX file at `path` computes the integer model at the free sizes' other values (within one
    output step, or as closely as at the example's); else what differs."""
    from qatkit.export.ort import session, verify

    sess = session(path, quiet=True)  # (a failure at another size is expected, and reported as a note)
    at_example = verify(sess, integer, [(tuple(exporter.examples),)], layers=False)["max_step_diff"]
    for n, name in exporter.free.items():
        for size, inputs, _ in exporter.resized(n):
            try:
                steps = verify(sess, integer, [(tuple(inputs),)], layers=False)["max_step_diff"]
            except Exception as e:  # noqa: BLE001 - ONNX Runtime's refusal: the graph holds the example's size
                return f"ONNX Runtime fails at {name} = {size} ({str(e).splitlines()[0][:160]})"
            if steps > max(1.0, at_example):
                return f"at {name} = {size} ONNX Runtime differs from the integer model by {steps:.0f} output steps"
    return None


__all__ = ["export_onnx"]
