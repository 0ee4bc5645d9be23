"""`qatkit.prepare`: a float model in, its QAT model out."""
from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import fx, nn

from qatkit.config import QATConfig
from qatkit.convert import ops
from qatkit.devices import check_dtype, module_device
from qatkit.errors import DataError, QatkitError, bad_value, listed
from qatkit.inputs import check_sizes, input_kind
from qatkit.modes import evaluating
from qatkit.prepare.concrete import concrete_trace, input_sizes
from qatkit.prepare.decompose import decompose
from qatkit.prepare.graph import WRAPPERS, PrepareInfo, prepare_graph, record_ranks
from qatkit.prepare.modes import example_arguments, trace, train_only_ops
from qatkit.prepare.rules import layer_type, plan_layers
from qatkit.prepare.swap import swap_layers
from qatkit.quantizer import FakeQuantizer

__all__ = ["PrepareInfo", "check_rules", "prepare"]


def check_rules(model: nn.Module, config: QATConfig) -> None:
    """A ConfigError now, not after training the float model, where one of config's layer rules matches no layer
    of `model` as prepare plans it (nn.MultiheadAttention & co. as their Linear layers)."""
    plan_layers(decompose(copy.deepcopy(model).cpu()).eval(), config, tuple(WRAPPERS))


def prepare(model: nn.Module, config: QATConfig | None = None,
            example_inputs: tuple | dict | torch.Tensor | None = None) -> nn.Module:
    """Return the QAT form of `model` (the float model is left untouched).

    The model is traced with torch.fx in eval mode, the graph that is deployed (parameter-free submodules that
    behave differently in training, such as drop path, stay modules that follow train()/eval(): prepare/modes.py);
    one whose forward branches on its input is traced along `example_inputs` (see prepare/concrete.py); a
    submodule that still cannot be traced keeps its own code in float and its Conv/Linear children are quantized
    by module swap (a warning names it). The QAT model is in the float model's mode. Weight ranges are
    initialised here; activation ranges by `qatkit.calibrate` (or from the first batch). When
    `example_inputs` are given, one forward checks that they fit the model.

    `example_inputs`: a tensor, a tuple of forward's first arguments, or a dict of its arguments by name
    (`{"input_ids": ids, "attention_mask": mask, "use_cache": False}`). Its tensors are the graph's inputs; the other
    arguments keep the dict's values that are not tensors, else their defaults, as fixed values (no inputs).
    Without example inputs every argument of forward is an input of the graph.
    """
    config = QATConfig() if config is None else config
    if not isinstance(config, QATConfig):
        raise bad_value("config", type(config).__name__, "a qatkit.QATConfig (or None for the defaults)",
                        "build it with QATConfig(...) or qat_config_from_dict(...)")
    if not isinstance(model, nn.Module):
        raise bad_value("model", type(model).__name__, "a torch.nn.Module", "pass the float model itself")
    check_dtype(model, "prepare")
    if hasattr(model, "qat_info"):
        raise bad_value("model", "a QAT model (qatkit.prepare's already)", "the float model",
                        "pass the float model the QAT model was prepared from")
    device = module_device(model)  # built on the CPU (new quantizers start there), then moved to the model's device
    training = model.training
    if hooked := [name for name, m in model.named_modules()
                  if any(type(hook).__name__ in ("WeightNorm", "SpectralNorm") for hook in m._forward_pre_hooks.values())]:
        raise bad_value("layers with torch.nn.utils.weight_norm/spectral_norm hooks", hooked, "layers without them "
                        "(the deprecated hooks compute the weight in a forward hook, which cannot be copied or "
                        "quantized), or the same norms as parametrizations", "call torch.nn.utils.remove_weight_norm "
                        "(remove_spectral_norm) on them, then, to keep training the norm, apply torch.nn.utils."
                        "parametrizations.weight_norm (spectral_norm): the weights keep their values")
    if hooked := _hooked(model):
        raise bad_value("modules with hooks", hooked, "modules without forward or backward hooks: prepare builds the "
                        "QAT model from the model's ops, which calls no hook, so what a hook changes would be missing "
                        "from the QAT and integer models", "remove them (handle.remove()) and write what they change "
                        "into forward; a hook that only looks may go on the prepared model")
    model = decompose(copy.deepcopy(model).cpu()).eval()  # nn.MultiheadAttention & co. as Linear layers and tensor ops
    arguments = None
    if example_inputs is not None:
        given, fixed = example_arguments(model, example_inputs)
        arguments = {k: a.cpu() if isinstance(a, torch.Tensor) else a for k, a in given.items()}, fixed
        if empty := [k for k, a in arguments[0].items() if isinstance(a, torch.Tensor) and a.dim() and not len(a)]:
            raise bad_value(f"example input {empty[0]!r}", f"a batch of 0 ({tuple(arguments[0][empty[0]].shape)})",
                            "at least one sample (prepare traces and checks the graph on it)",
                            "pass one or two real samples, e.g. x[:2]", DataError)
        check_inputs(model, *arguments)  # a shape the float model refuses: the input's fault
    plans = plan_layers(model, config, tuple(WRAPPERS))
    # A planned Linear/conv subclass is quantized only if its forward computes its layer; one that does not (its
    # own arithmetic on the weight) stays float, and first/last then moves to the layers quantized around it.
    pristine = copy.deepcopy(model) if any(layer_type(model.get_submodule(n)) not in WRAPPERS for n in plans) else None
    qat = _prepare_module(model, "", config, plans, info := PrepareInfo(), arguments)
    planned_edge = (next(iter(plans)), next(reversed(plans))) if plans else None
    if pristine is not None and (edge := _quantized_edge(plans, info)) not in (None, planned_edge):
        plans = plan_layers(pristine, config, tuple(WRAPPERS), edge)
        qat = _prepare_module(pristine, "", config, plans, info := PrepareInfo(), arguments)
    if (any(p.dtype == torch.float64 for p in qat.parameters())
            and any(isinstance(m, FakeQuantizer) for m in qat.modules())):
        raise bad_value("the model's parameter dtype", "float64", "float32 where prepare quantizes (float64 only for a "
                        "model it leaves float: every layer skipped and matmul_bits=None, to check float ops)",
                        "prepare model.float()")
    _drop_string_annotations(qat)
    qat = qat.to(device).train(training)
    info.error_penalty = config.error_penalty
    qat.qat_info = info
    if info.input_sizes or info.input_kinds:
        names = [n.target for n in qat.graph.nodes if n.op == "placeholder"]
        qat.register_forward_pre_hook(functools.partial(_check_input_sizes, names), with_kwargs=True)
    if info.untraced:
        warnings.warn(
            "qatkit: could not trace " + "; ".join(info.untraced)
            + ". Their own code runs in float; their Conv/Linear layers are quantized at their inputs (module swap). "
            "QAT trains; convert and ONNX export need the whole model traced: branch on shapes, not tensor values "
            "(torch.where computes both ways), and pass example_inputs to qatkit.prepare." + _size_hint(info.untraced),
            stacklevel=2,
        )
    if info.traced_along_example:
        warnings.warn(info.traced_along_example, stacklevel=2)
    if info.train_only:
        warnings.warn("qatkit: " + "; ".join(info.train_only) + " in train() but not in eval(); the QAT graph is "
                      "traced in eval mode (the deployed one), so QAT leaves them out. Fix: move training-only code "
                      "(drop path, noise) into a parameter-free submodule, as timm's DropPath: qatkit keeps such "
                      "modules, following train()/eval()", stacklevel=2)
    if info.unconvertible:
        verb = "has" if len(info.unconvertible) == 1 else "have"
        warnings.warn(f"qatkit: QAT trains, but convert and ONNX export will refuse this model: "
                      f"{', '.join(info.unconvertible)} {verb} no integer-model form (allowed modules: "
                      f"{ops.supported_modules()}). Fix: replace them before training", stacklevel=2)
    if info.float_ops:
        warnings.warn(f"qatkit: {len(info.float_ops)} ops have no integer kernel and stay float: "
                      f"{listed(info.float_ops, 8)} "
                      "(qatkit.describe lists them all)", stacklevel=2)
    if arguments is not None and (error := _fails(qat, arguments[0])):
        parts = "; ".join(info.untraced) or info.traced_along_example or "the traced graph"
        raise QatkitError(f"the QAT model fails on the example input, which the float model runs ({error}): "
                          f"prepare's graph of {parts} does not compute what the model does. Fix: make the model "
                          "traceable as a whole (branch on shapes, not on values or None arguments of submodules), "
                          "or leave the failing module out of QAT with LayerRule(pattern=..., skip=True)"
                          + _size_hint(info.untraced))
    return qat


def _drop_string_annotations(qat: nn.Module) -> None:
    """Drop type annotations fx kept as strings (forward's, in a file with `from __future__ import annotations`):
    torch.save of the QAT model pickles its graph and fails on them ('str' object has no attribute '__name__')."""
    for gm in (m for m in qat.modules() if isinstance(m, fx.GraphModule)):
        if stringly := [n for n in gm.graph.nodes if isinstance(n.type, str)]:
            for node in stringly:
                node.type = None
            gm.recompile()


def _hooked(model: nn.Module) -> list[str]:
    """'name (kind hook)' of each module with a forward, forward-pre or backward hook (its own, not torch's global
    ones); the root is 'model'."""
    kinds = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
             "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}
    return [f"{name or 'model'} ({kind})" for name, m in model.named_modules()
            for attr, kind in kinds.items() if getattr(m, attr, None)]


def _quantized_edge(plans: dict, info: PrepareInfo) -> tuple[str, str] | None:
    """The first and last planned layers (definition order) that prepare quantized or a rule skipped; None if none."""
    done = {row["name"] for row in info.layers}
    kept = [name for name, plan in plans.items() if plan.skip or name in done]
    return (kept[0], kept[-1]) if kept else None


def _check_input_sizes(names: list[str], qat: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a prepared model: its inputs (placeholders `names`) shaped as its graph takes them, in
    training too (qat_info.input_sizes; the integer model checks the same)."""
    for name, x in [*zip(names, args), *kwargs.items()]:
        check_sizes(name, qat.qat_info.input_sizes.get(name), x, qat.qat_info.input_kinds.get(name))


def _size_hint(untraced: list[str]) -> str:
    """The fix for the commonest untraceable line: a size passed through int()/float(), which must return a real
    number, so fx cannot trace it and a trace along the example freezes the example's batch into it."""
    if not any("argument must be a string" in why and "'Proxy'" in why for why in untraced):
        return ""
    return (". The model converts a size with int() or float() (as old timm's window_reverse, "
            "int(windows.shape[0] / (H * W / ws / ws))): write the size with // or let view/reshape infer it with -1 "
            "(timm >= 0.9: windows.view(-1, H // ws, W // ws, ws, ws, C))")


def _prepare_module(module: nn.Module, prefix: str, config: QATConfig, plans, info: PrepareInfo,
                    arguments: tuple[dict, dict] | None = None) -> nn.Module:
    """Trace and rewrite `module` (the root, given the example's arguments (modes.example_arguments), along them if
    it branches on its input); where tracing fails, recurse into its children."""
    try:
        gm = trace(module, arguments)
        if extra := train_only_ops(module, gm.graph, arguments):
            info.train_only.append(f"'{prefix or type(module).__name__}' runs {', '.join(dict.fromkeys(extra))}")
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        why = f"'{prefix or type(module).__name__}' ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if prefix:  # a submodule: no example input of its own
            info.untraced.append(why)
            return swap_layers(module, prefix, config, plans, info, _prepare_module)
        try:
            if arguments is None:
                raise ValueError("no example_inputs were given to prepare to trace it along")
            gm, decisions, checked = concrete_trace(module, arguments)
        except Exception as concrete_error:  # the model's own code may raise anything on proxies
            info.untraced.append(f"{why}, nor along the example input ({str(concrete_error).splitlines()[0][:300]})")
            return swap_layers(module, prefix, config, plans, info, _prepare_module)
        shapes = ", ".join(str(tuple(a.shape)) for a in arguments[0].values() if isinstance(a, torch.Tensor))
        info.traced_along_example = (f"qatkit: torch.fx could not trace {why}; traced along the example input "
                                     f"instead: {decisions} Python branches, asserts or loop counts follow the "
                                     f"example's shapes ({shapes}); the graph equals the model on batches of "
                                     f"{', '.join(map(str, checked))}")
    if not prefix and arguments is not None:
        info.input_sizes = input_sizes(module, gm, arguments)
        info.input_kinds = {k: kind for k, a in arguments[0].items()
                            if isinstance(a, torch.Tensor) and (kind := input_kind(a)) is not None}
        if info.traced_along_example:
            free = [f"{k} axis {axis}" for k, dims in info.input_sizes.items() for axis, n in enumerate(dims)
                    if axis and n is None]
            info.traced_along_example += (f" and at other sizes along {', '.join(free)}" if free else "") + (
                ". Keep inputs shaped as the example (the batch size" + (" and those sizes" if free else "")
                + " may change)")
    if not prefix and arguments is not None:
        record_ranks(gm, arguments[0])  # (x.mean((2, 3)) respelled as a global average pool, x.movedim, x.T)
    sub_plans = {k[len(prefix) + 1:] if prefix else k: v for k, v in plans.items() if not prefix or k.startswith(prefix + ".")}
    sub_info = prepare_graph(gm, config, sub_plans, module)
    for row in sub_info.layers:
        row["name"] = f"{prefix}.{row['name']}" if prefix else row["name"]
        info.layers.append(row)
    info.act_quantizers += [f"{prefix}.{q}" if prefix else q for q in sub_info.act_quantizers]
    info.float_ops += sub_info.float_ops
    info.unconvertible += sub_info.unconvertible
    info.shared_quantizers += [[f"{prefix}.{q}" if prefix else q for q in group] for group in sub_info.shared_quantizers]
    return gm


def _fails(model: nn.Module, example: dict[str, object], fixed: dict[str, object] | None = None) -> str | None:
    """One eval forward on the example (forward's arguments by name, and those `fixed` at a value): None, or the
    first line of the error it raises."""
    device = module_device(model)
    example = {k: a.to(device) if isinstance(a, torch.Tensor) else a for k, a in example.items()}
    try:
        with torch.no_grad(), evaluating(model):
            model(**example, **(fixed or {}))
    except QatkitError:  # raised on purpose (by prepare's rewrites of torch.nn blocks), with its own fix
        raise
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def check_inputs(model: nn.Module, example: dict[str, object], fixed: dict[str, object]) -> None:
    """Run one eval forward; a shape that does not fit becomes a DataError naming it."""
    if error := _fails(model, example, fixed):
        shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__
                           for a in example.values())
        raise DataError(f"input of shape {shapes} does not fit the model ({error}). "
                        "Fix: pass inputs shaped as the model expects (check --dataset/--model)")
