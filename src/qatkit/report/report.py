"""report.md of a `qatkit run`."""
from __future__ import annotations

from pathlib import Path

from qatkit.report.tables import results_table


def write_report(path: Path, *, results: dict, quant_tables: dict[str, str], plot: str | None) -> Path:
    lines = [f"# qatkit run: {results['model']} on {results['dataset']}", "",
             results_table(results["rows"]), "",
             f"Accuracy is top-1 on the test split ({results['test_samples']} samples). Bytes are the saved model files "
             "(float: the float state_dict as safetensors; ptq/qat: the integer model file).",
             f"Total time {results['seconds']:.1f} s on {results['threads']} threads.", ""]
    checked = [r for r in results["rows"] if "verify" in r]
    if checked:
        lines += ["## ONNX Runtime vs qatkit (int8 QDQ export, whole test split)", "",
                  "| model | ONNX bytes | top-1 agreement | within one step | max step diff | notes |", "|---|---|---|---|---|---|"]
        for r in checked:
            v = r["verify"]
            lines.append(f"| {r['method']} W{r['weight_bits']}A{r['act_bits']} | {r['onnx_bytes']:,} | {v['top1_agreement']:.4f} "
                         f"| {v['within_one_step']:.4f} | {v['max_step_diff']} | {'; '.join(r['onnx_notes']) or '-'} |")
        lines.append("")
    if plot:
        lines += [f"![accuracy vs bits]({plot})", ""]
    for name, table in quant_tables.items():
        lines += [f"## {name}: what was quantized", "", table, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
