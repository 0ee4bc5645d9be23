"""Plain-text tables: what prepare quantized, and the results of a run."""
from __future__ import annotations

from torch import nn

from qatkit.inputs import shape_text


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (readable as plain text too)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _folded(row: dict) -> str:
    """What the layer's weights absorb: its BatchNorm, a layer scale (its parameter's name), or nothing."""
    return "BN" if row["bn_folded"] else f"scale {row['scale_folded']}" if row.get("scale_folded") else "-"


def describe(qat_model: nn.Module) -> str:
    """What was quantized and how: one row per layer, then the activation quantizers and float ops."""
    info = getattr(qat_model, "qat_info", None)
    if info is None:
        return "not a qatkit QAT model (no qat_info): call qatkit.prepare first"
    rows = [[r["name"], r["type"], f"W{r['weight_bits']}", "per-channel" if r["per_channel"] else "per-tensor",
             f"A{r['act_bits']}" if r["act_bits"] else "-", _folded(r), r["act"] or "-", r["output"]] for r in info.layers]
    text = _table(["layer", "type", "weight", "granularity", "input", "folded", "fused act", "output"], rows)
    added = [f"{path} (A{int(qat_model.get_submodule(path).bits)})" for path in info.act_quantizers]
    text += f"\n\nactivation quantizers added: {', '.join(added) or 'none'}"
    text += f"\nfloat ops (no integer kernel, run on dequantized values): {', '.join(info.float_ops) or 'none'}"
    if info.input_sizes:
        shapes = ", ".join(f"{name} {shape_text(sizes)}" for name, sizes in info.input_sizes.items())
        text += f"\ninputs (any: a size the graph follows; others hold the example's): {shapes}"
    if info.shared_quantizers:
        groups = "; ".join(" = ".join(group) for group in info.shared_quantizers)
        text += f"\nshared quantizers (exact_adds; each group is one quantizer): {groups}"
    if info.untraced:
        text += f"\nnot traced (own code in float, layers quantized by module swap): {'; '.join(info.untraced)}"
    return text


def results_table(rows: list[dict]) -> str:
    """The run's summary: method, bits, accuracy, bytes and size relative to float."""
    float_bytes = next((r["model_bytes"] for r in rows if r["method"] == "float"), None)
    body = [[r["method"], f"W{r['weight_bits']}A{r['act_bits']}" if r["method"] != "float" else "fp32",
             f"{r['accuracy']:.4f}", f"{r['model_bytes']:,}",
             f"{r['model_bytes'] / float_bytes:.3f}" if float_bytes else "-"] for r in rows]
    return _table(["method", "bits", "accuracy", "bytes", "ratio to float"], body)
