"""BENCHMARKS.md from the benchmark suite's results: per-task tables, the acceptance checklist against the
project's targets, published anchors, step times, plots and the commands that reproduce it all.

    python bench/report.py [RESULTS.json ...] [--out BENCHMARKS.md] [--plots bench/results/plots]
                           [--agreement bench/results/deploy_agreement*.json] [--gpu bench/results/gpu_step_times.json]
                           [--latency bench/results/latency_resnet20*.json]

Several results files may be given (e.g. one per task); their rows are merged by task, a later file's row
replacing an earlier one with the same task, method, schedule and bits.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qatkit.fileio import atomic_file  # noqa: E402

BENCH = Path(__file__).resolve().parent
DEFAULT_RESULTS = [BENCH / "results" / f"suite{s}.json" for s in ("", "_sst2")]  # sst2: the text task, another machine
DEFAULT_OUT = BENCH.parent / "BENCHMARKS.md"
DEFAULT_PLOTS = BENCH / "results" / "plots"
DEFAULT_AGREEMENT = [BENCH / "results" / f"deploy_agreement{s}.json" for s in ("", "_po2", "_exact", "_deploy_exact")]
DEFAULT_GPU = BENCH / "results" / "gpu_step_times.json"
DEFAULT_CPU_STEPS = [BENCH / "results" / "step_times_avx512.json"]  # bench/step_times.py on other CPUs
DEFAULT_LATENCY = sorted((BENCH / "results").glob("latency_resnet20*.json"))
# bench/experiment.py --qat-seed runs: the suite's QAT rows fine-tuned again from the same float model
DEFAULT_QAT_SEEDS = sorted((BENCH / "results" / "experiments").glob("*-qatseed*-s*.json"))
LATENCY_OPTIONS = ("reduce_range", "exact_multipliers", "exact_adds")  # bench/latency.py's QATConfig switches
DEFAULT_COMMANDS = ["python bench/pretrain.py cifar10-resnet20", "python bench/pretrain.py mnist-small-cnn",
                    "python bench/pretrain.py sst2-transformer",
                    "python bench/suite.py --tasks mnist-small-cnn,cifar10-resnet20",
                    "python bench/suite.py --tasks sst2-transformer --out bench/results/suite_sst2.json",
                    "python bench/deploy_agreement.py  # the power-of-two rows: bench/README.md",
                    "python bench/experiment.py cifar10-resnet20 --bits 4 4 --qat-seed 1 --name cifar-w4a4-qatseed1-s0"
                    "  # and W8A8, W3A3, W2A2",
                    "python bench/report.py"]

METHOD_ORDER = ["float", "ptq-minmax", "ptq-mse", "qat", "torch.ao-qat"]
EPS = 1e-12  # float-representation slack only (0.992 - 0.001 != 0.991 exactly); far below one test sample


@dataclass(frozen=True)
class Targets:
    float_min: float
    drops: dict[tuple[int, int], float]  # (weight bits, act bits) -> allowed drop of QAT (direct) below float
    qat_beats_ptq: tuple[tuple[int, int], float] | None = None  # bits, margin of QAT over the best PTQ row
    step_ratio_max: float | None = None  # largest QAT step / float step
    verify_min: float = 0.999  # W8A8 rows: top-1 agreement and within-one-step fractions


TARGETS = {
    "mnist-small-cnn": Targets(0.992, {(8, 8): 0.001, (4, 4): 0.002, (2, 2): 0.006}),
    "cifar10-resnet20": Targets(0.91, {(8, 8): 0.002, (4, 4): 0.008, (3, 3): 0.015, (2, 2): 0.04},
                                qat_beats_ptq=((4, 4), 0.05), step_ratio_max=1.3),
}

TASK_NOTES = {
    "sst2-transformer": (
        "The text task has no acceptance targets yet: it shows the pipeline end to end (SST-2 text → token ids → the "
        "tiny transformer, 2 blocks of width 64 trained from scratch → int8 model and ONNX). The embedding table (0.95 M of "
        "the model's 1.02 M weights) is quantized per row and stays at 8 bits as the first layer, so W4A4 is "
        "barely smaller than W8A8. The Linear layers and attention's two matmuls (Q·Kᵀ and weights·V, at "
        "matmul_bits 8: QLinearMatMul) run on integer kernels; softmax, LayerNorm, GELU and the masked pool stay float. "
        "At width 64 the int8 ONNX model is slower than the float one on this AVX2 CPU: "
        "its Linear layers are tiny GEMMs, and the QuantizeLinear/DequantizeLinear around them and the float "
        "softmax, LayerNorm and GELU cost more than the integer kernels save (ORT profile of the earlier export with "
        "float attention, batch 32: the QGemm kernels take 3.1 ms where the float model's MatMul kernels take 2.9 ms, "
        "and Q/DQ 1.3 ms more; quantizing the attention matmuls left the int8 latency where it was, 9.5–9.8 ms). "
        "The QAT step's extra cost is the fake quantization of activation tensors as large as the GEMMs' work; the "
        "attention logits (batch × heads × 56²) are the largest (`matmul_bits=None` keeps them float); with the "
        "fake-quant backward in AVX2 the step is 1.5× the float step (it was 1.9×). Pretrained "
        "transformers (the anchors below) are not reached by a model trained from scratch."),
}

# Copied from ../shared/REFERENCES.md (top-1 %, float -> quantized).
ANCHORS = [
    ("ResNet-18 / ImageNet", "4/4, 3/3, 2/2", "70.5", "71.1, 70.2, 67.6", "LSQ, Esser et al. 2019"),
    ("ResNet-18 / ImageNet", "8/8, 4/8, 4/4 (per-channel)", "69.68", "70.43, 70.01, 68.83",
     "QAT, Nagel et al. 2021 white paper"),
    ("VGG-Small / CIFAR-10", "4/4, 3/3, 2/2", "93.34", "94.26, 93.89, 93.42", "LSQ re-implementation"),
    ("ResNet-20 / CIFAR-10", "4/32, 2/32", "92.13", "91.46, 91.05", "DoReFa re-implementation (weights only)"),
    ("SFC MLP / MNIST", "2/2", "—", "98.66", "Brevitas examples"),
    ("2-bit CNN / MNIST", "2/—", "—", "99.53", "BitNetMCU"),
    ("BERT-base / SST-2 (pretrained)", "8/8", "92.36", "92.24", "Q8BERT"),
    ("MiniLM-L6-H384 / SST-2 (pretrained)", "8/8 PTQ", "90.14", "89.91", "ONNX Runtime int8 (Intel Neural Compressor)"),
]


# ---------------------------------------------------------------- merging


def _schedule(row: dict) -> str | None:
    if row.get("method") == "qat":
        return row.get("schedule") or "direct"
    return row.get("schedule")


def _key(row: dict) -> tuple:
    return (row["method"], _schedule(row), int(row["weight_bits"]), int(row["act_bits"]))


def merge(results: dict | list[dict]) -> dict:
    """One view of several results dicts: task order of first appearance; per task, rows keyed by
    (method, schedule, bits) with later files winning; step_times and task info per task, later winning."""
    results = [results] if isinstance(results, dict) else list(results)
    tasks: dict[str, dict] = {}
    rows: dict[str, dict[tuple, dict]] = {}
    steps: dict[str, dict] = {}
    machines: list[tuple[dict, list[str]]] = []  # distinct machines and the tasks measured on them
    quick = False
    for res in results:
        quick = quick or bool(res.get("quick"))
        file_tasks: list[str] = []
        for name, info in (res.get("tasks") or {}).items():
            tasks[name] = info
            file_tasks.append(name)
        for row in res.get("rows") or []:
            tasks.setdefault(row["task"], {})
            rows.setdefault(row["task"], {})[_key(row)] = row
            if row["task"] not in file_tasks:
                file_tasks.append(row["task"])
        for name, st in (res.get("step_times") or {}).items():
            tasks.setdefault(name, {})
            steps[name] = st
        machine = res.get("machine")
        if machine:
            for m, names in machines:
                if m == machine:
                    names.extend(t for t in file_tasks if t not in names)
                    break
            else:
                machines.append((machine, list(file_tasks)))
    return {"tasks": tasks, "rows": {t: sorted(r.values(), key=_row_order) for t, r in rows.items()},
            "step_times": steps, "machines": machines, "quick": quick}


def _row_order(row: dict) -> tuple:
    method = row["method"]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    progressive = _schedule(row) not in (None, "direct")
    return (rank, method, -int(row["weight_bits"]), -int(row["act_bits"]), progressive, _schedule(row) or "")


# ---------------------------------------------------------------- formatting


def _pct(x: float, nd: int = 2) -> str:
    return f"{x * 100:.{nd}f}"


def _signed(x: float, nd: int = 2) -> str:
    return f"{x:+.{nd}f}"


def _pair(value: float, limit: float, scale: float = 100.0, nd: int = 2, signed: bool = False) -> tuple[str, str]:
    """value and limit printed with enough decimals that they read differently whenever they differ."""
    fmt = (lambda v, d: f"{v * scale:+.{d}f}") if signed else (lambda v, d: f"{v * scale:.{d}f}")
    while nd < 6 and fmt(value, nd) == fmt(limit, nd) and abs(value - limit) > EPS:
        nd += 1
    return fmt(value, nd), fmt(limit, nd)


def _bits(row: dict) -> str:
    return f"{row['weight_bits']}/{row['act_bits']}"


def _accuracy(row: dict) -> str:
    seeds = row.get("seeds") or []
    text = _pct(row["accuracy"])
    if len(seeds) > 1:
        text += f" ± {_pct(row.get('accuracy_std') or 0.0)}"
    return text


def _seeds(row: dict) -> str:
    seeds = row.get("seeds") or []
    if len(seeds) == 1:
        return "(1 seed)"
    return f"{len(seeds)} ({', '.join(map(str, seeds))})" if seeds else "—"


def _verify(v: dict | None) -> str:
    if not v:
        return "—"
    return f"{_pct(v['top1_agreement'], 3)}% / {_pct(v['within_one_step'], 3)}% (n={v['n']:,})"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _family(row: dict) -> str:
    """Short name of a row in prose: method, schedule for progressive QAT, bits."""
    sched = _schedule(row)
    extra = f" ({sched})" if row["method"] == "qat" and sched else ""
    return f"{row['method']}{extra} W{row['weight_bits']}A{row['act_bits']}"


def results_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "float"), None)
    body = []
    for r in rows:
        delta = "—" if base is None or r is base else _signed((r["accuracy"] - base["accuracy"]) * 100)
        lat, ratio = r.get("latency_ms"), r.get("step_time_ratio")
        body.append([r["method"], _schedule(r) or "—", _bits(r), _accuracy(r), _seeds(r), delta,
                     f"{r['model_bytes']:,}" if r.get("model_bytes") is not None else "—",
                     f"{lat:.2f}" if lat is not None else "—", f"{ratio:.2f}" if ratio is not None else "—",
                     _verify(r.get("verify"))])
    return _table(["method", "schedule", "W/A bits", "accuracy %", "seeds", "Δ vs float (pp)", "model bytes",
                   "int8 ORT latency ms (batch 32)", "QAT step / float step", "verify (top-1 / within one step)"],
                  body)


# ---------------------------------------------------------------- acceptance


@dataclass
class Check:
    name: str
    status: str  # "pass", "fail" or "not measured"
    detail: str

    def line(self) -> str:
        if self.status == "not measured":
            return f"- ○ {self.name}: not measured ({self.detail})"
        return f"- {'✔' if self.status == 'pass' else '✘'} {self.name}: {self.detail}"


def _ok(value: float, limit: float, strict: bool = False) -> str:
    if strict:
        return "pass" if value < limit else "fail"
    return "pass" if value >= limit - EPS else "fail"


def _find(rows: list[dict], method: str, bits: tuple[int, int], schedule: str | None = None) -> dict | None:
    for r in rows:
        if r["method"] == method and (r["weight_bits"], r["act_bits"]) == bits and \
                (schedule is None or _schedule(r) == schedule):
            return r
    return None


def _qat_step_ratios(step_times: dict | None) -> tuple[tuple[str, float] | None, tuple[str, float] | None]:
    """(largest qatkit QAT ratio, torch.ao's ratio) from a task's step_times, each as (key, ratio); None where one
    of them is missing or NaN (not measured: the largest of the others would pass a target it may miss)."""
    ratios = (step_times or {}).get("ratio_to_float") or {}
    ours = [(k, v) for k, v in ratios.items() if k.startswith("qat")]
    theirs = [(k, v) for k, v in ratios.items() if k.startswith("torch.ao")]

    def measured(pairs):
        return pairs and all(isinstance(v, (int, float)) and math.isfinite(v) for _, v in pairs)
    return (max(ours, key=lambda kv: kv[1]) if measured(ours) else None,
            min(theirs, key=lambda kv: kv[1]) if measured(theirs) else None)


def acceptance(task: str, rows: list[dict], step_times: dict | None) -> list[Check]:
    """The task's targets checked against its rows (unrounded numbers); [] for a task without targets."""
    t = TARGETS.get(task)
    if t is None:
        return []
    checks: list[Check] = []
    base = _find(rows, "float", (32, 32)) or next((r for r in rows if r["method"] == "float"), None)

    name = f"float ≥ {_pct(t.float_min)}%"
    if base is None:
        checks.append(Check(name, "not measured", "no float row"))
    else:
        v, lim = _pair(base["accuracy"], t.float_min)
        checks.append(Check(name, _ok(base["accuracy"], t.float_min), f"{v}% (target ≥ {lim}%)"))

    for bits, drop in t.drops.items():
        name = f"QAT W{bits[0]}A{bits[1]} (direct) ≥ float − {drop * 100:.2f} pp"
        row = _find(rows, "qat", bits, "direct")
        if row is None or base is None:
            checks.append(Check(name, "not measured", "no float row" if base is None else
                                f"no qat direct W{bits[0]}A{bits[1]} row"))
            continue
        delta = row["accuracy"] - base["accuracy"]
        d, lim = _pair(delta, -drop, signed=True, nd=3)
        checks.append(Check(name, _ok(delta, -drop), f"{_pct(row['accuracy'])}% vs float {_pct(base['accuracy'])}% "
                                                     f"(Δ {d} pp, limit {lim} pp)"))

    if t.qat_beats_ptq is not None:
        bits, margin = t.qat_beats_ptq
        name = f"QAT W{bits[0]}A{bits[1]} beats the best PTQ W{bits[0]}A{bits[1]} by ≥ {margin * 100:.2f} pp"
        qat = _find(rows, "qat", bits, "direct")
        ptq = [r for r in (_find(rows, "ptq-minmax", bits), _find(rows, "ptq-mse", bits)) if r is not None]
        if qat is None or not ptq:
            missing = "qat direct" if qat is None else "ptq-minmax or ptq-mse"
            checks.append(Check(name, "not measured", f"no {missing} W{bits[0]}A{bits[1]} row"))
        else:
            best = max(ptq, key=lambda r: r["accuracy"])
            gap = qat["accuracy"] - best["accuracy"]
            g, lim = _pair(gap, margin, signed=True, nd=3)
            checks.append(Check(name, _ok(gap, margin), f"{_pct(qat['accuracy'])}% vs {best['method']} "
                                                        f"{_pct(best['accuracy'])}% (gap {g} pp, needs ≥ {lim} pp)"))

    ours, theirs = _qat_step_ratios(step_times)
    if t.step_ratio_max is not None:
        name = f"QAT step / float step ≤ {t.step_ratio_max:g}"
        if ours is None:
            checks.append(Check(name, "not measured", "no qat step time"))
        else:
            v, lim = _pair(ours[1], t.step_ratio_max, scale=1.0)
            status = "pass" if ours[1] <= t.step_ratio_max + EPS else "fail"
            checks.append(Check(name, status, f"{v} ({ours[0]}, the largest QAT ratio; limit {lim})"))
    name = "QAT step / float step below torch.ao's"
    if ours is None or theirs is None:
        checks.append(Check(name, "not measured", "no qat step time" if ours is None else "no torch.ao step time"))
    else:
        v, lim = _pair(ours[1], theirs[1], scale=1.0)
        checks.append(Check(name, _ok(ours[1], theirs[1], strict=True), f"{v} ({ours[0]}) vs {lim} ({theirs[0]})"))

    w8a8 = [r for r in rows if (r["weight_bits"], r["act_bits"]) == (8, 8) and r["method"] != "torch.ao-qat"]
    if _find(w8a8, "qat", (8, 8), "direct") is None:
        checks.append(Check("qat direct W8A8 deployment verify", "not measured", "no qat direct W8A8 row"))
    pct_min = _pct(t.verify_min, 1)
    for r in w8a8:
        name = f"{_family(r)} deployment verify (top-1 agreement and within one step ≥ {pct_min}%)"
        v = r.get("verify")
        if not v:
            checks.append(Check(name, "not measured", "no verify result"))
            continue
        top1, lim = _pair(v["top1_agreement"], t.verify_min, nd=3)
        within, lim2 = _pair(v["within_one_step"], t.verify_min, nd=3)
        ok = v["top1_agreement"] >= t.verify_min - EPS and v["within_one_step"] >= t.verify_min - EPS
        checks.append(Check(name, "pass" if ok else "fail",
                            f"top-1 {top1}% (≥ {lim}%), within one step {within}% (≥ {lim2}%), "
                            f"max step diff {v.get('max_step_diff', '—')}, n={v['n']:,}"))
    return checks


# ---------------------------------------------------------------- plots


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_accuracy_vs_bits(task: str, rows: list[dict], path: Path) -> Path:
    """Accuracy per W/A bit-width (high to low precision) per method family, float as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    base = next((r for r in rows if r["method"] == "float"), None)
    quant = [r for r in rows if r["method"] != "float"]
    labels = [f"{w}/{a}" for w, a in sorted({(r["weight_bits"], r["act_bits"]) for r in quant},
                                             key=lambda b: (-b[0], -b[1]))]
    xpos = {lab: i for i, lab in enumerate(labels)}
    accs = [r["accuracy"] * 100 for r in rows]
    floor = None  # keep the plot readable when low-bit PTQ collapses to chance: clip far-below points
    if base is not None and accs and min(accs) < base["accuracy"] * 100 - 15:
        floor = base["accuracy"] * 100 - 15
    families: list[tuple[str, list[dict], dict]] = [
        ("PTQ min/max", [r for r in quant if r["method"] == "ptq-minmax"], {"marker": "s", "linestyle": "-"}),
        ("PTQ MSE", [r for r in quant if r["method"] == "ptq-mse"], {"marker": "D", "linestyle": "-"}),
        ("QAT direct", [r for r in quant if r["method"] == "qat" and _schedule(r) == "direct"],
         {"marker": "o", "linestyle": "-"}),
    ]
    for sched in sorted({_schedule(r) for r in quant if r["method"] == "qat" and _schedule(r) != "direct"}):
        families.append((f"QAT progressive {sched}", [r for r in quant if r["method"] == "qat" and
                                                      _schedule(r) == sched], {"marker": "^", "linestyle": ":"}))
    families.append(("torch.ao QAT", [r for r in quant if r["method"] == "torch.ao-qat"],
                     {"marker": "*", "linestyle": "none", "markersize": 12}))
    clipped_at = collections.Counter()  # labels of clipped points already placed at each x, to stack the next one
    for label, fam, style in families:
        fam = sorted(fam, key=lambda r: xpos[_bits(r)])
        if not fam:
            continue
        xs = [xpos[_bits(r)] for r in fam]
        ys = [r["accuracy"] * 100 for r in fam]
        clipped = [floor is not None and y < floor - 1 for y in ys]  # drawn at floor - 1, labelled with the value
        shown = [floor - 1 if c else y for c, y in zip(clipped, ys)]
        errs = [0.0 if c else (r.get("accuracy_std") or 0.0) * 100 for c, r in zip(clipped, fam)]
        line = ax.errorbar(xs, shown, yerr=errs, capsize=3, label=label, **style)
        for x, y, c in zip(xs, ys, clipped):
            if c:
                ax.annotate(f"↓ {y:.1f}", (x, floor - 1), textcoords="offset points",
                            xytext=(4, 4 + 9 * clipped_at[x]), fontsize=7, color=line[0].get_color())
                clipped_at[x] += 1
    if base is not None:
        ax.axhline(base["accuracy"] * 100, color="k", linestyle="--", label=f"float {_pct(base['accuracy'])}%")
    if floor is not None:
        ax.set_ylim(bottom=floor - 2)
    if labels:
        ax.set_xticks(range(len(labels)), labels)
    else:
        ax.text(0.5, 0.5, "no quantized rows", transform=ax.transAxes, ha="center")
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("test accuracy %")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_size_vs_latency(rows_by_task: dict[str, list[dict]], path: Path) -> Path:
    """One marker per row with an ORT latency: model bytes (log) against latency, labelled task/method/bits."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"float": "x", "ptq-minmax": "s", "ptq-mse": "D", "qat": "o", "torch.ao-qat": "*"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = 0
    for i, (task, rows) in enumerate(rows_by_task.items()):
        for r in rows:
            if r.get("latency_ms") is None or not r.get("model_bytes"):
                continue
            n += 1
            ax.scatter(r["model_bytes"], r["latency_ms"], marker=markers.get(r["method"], "o"),
                       color=colors[i % len(colors)])
            sched = _schedule(r)
            label = f"{task}/{r['method']}{'/' + sched if sched not in (None, 'direct') else ''}/{_bits(r)}"
            ax.annotate(label, (r["model_bytes"], r["latency_ms"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=6)
    if n:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no latency measured", transform=ax.transAxes, ha="center")
    ax.set_xlabel("model bytes (log)")
    ax.set_ylabel("ONNX Runtime latency ms (batch 32, 2 threads)")
    ax.set_title("size vs latency")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- the document


def _machine_line(m: dict) -> str:
    return (f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}, "
            f"ONNX Runtime {m.get('onnxruntime', '?')}, Python {m.get('python', '?')}")


def _task_line(info: dict, rows: list[dict]) -> str:
    parts = []
    if info.get("dataset") or info.get("model"):
        parts.append(f"{info.get('model', '?')} on {info.get('dataset', '?')}")
    if info.get("train_samples") is not None:
        parts.append(f"{info['train_samples']:,} training / {info.get('test_samples', 0):,} test samples")
    qat = info.get("qat_recipe") or {}
    recipe = ", ".join(f"{k} {qat[k]}" for k in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "distill",
                                                  "bn_freeze_epoch") if k in qat)
    if recipe:
        parts.append(f"QAT fine-tune: {recipe}")
    for bits, changes in (info.get("qat_recipe_at") or {}).items():
        parts.append(f"at {bits.upper()}: " + ", ".join(f"{k} {v}" for k, v in changes.items()))
    cfg = info.get("qat_config") or {}
    scheme = ", ".join(f"{k} {cfg[k]}" for k in ("weight_init", "act_init", "first_last_bits", "residual_bits", "matmul_bits") if k in cfg)
    if scheme:
        parts.append(f"quantization: {scheme}")
    return "; ".join(parts) + "." if parts else ""


def _step_table(st: dict) -> str:
    med, ratio = st.get("median_ms") or {}, st.get("ratio_to_float") or {}
    keys = sorted(dict.fromkeys([*med, *ratio]), key=lambda k: k != "float")
    body = [[k, f"{med[k]:.2f}" if med.get(k) is not None else "—",
             f"{ratio[k]:.2f}" if ratio.get(k) is not None else "—"] for k in keys]
    where = f" Measured on {st['machine']['cpu']} (torch {st['machine']['torch']})." if st.get("machine") else ""
    head = (f"Batch {st.get('batch', '?')}, {st.get('threads', '?')} threads, {st.get('rounds', '?')} interleaved "
            f"rounds; the ratio is the median of the per-round ratios.{where}\n\n")
    return head + _table(["variant", "median step ms", "ratio to float"], body)


def cpu_steps_section(files: list[dict]) -> list[str]:
    """bench/step_times.py's results on other CPUs than the suite's: each task's step table, and where the task has a
    step-ratio target, whether that CPU meets it (the acceptance above is the suite's machine's)."""
    md = []
    for f in files:
        m = f["machine"]
        md += [f"### {m['cpu']}, {m.get('cpu_capability', '?')} (torch {m['torch']})", ""]
        for task, st in f["step_times"].items():
            md += [f"{task}:", "", _step_table({k: v for k, v in st.items() if k != "machine"}), ""]
            ours, theirs = _qat_step_ratios(st)
            limit = TARGETS[task].step_ratio_max if task in TARGETS else None
            if ours is not None and limit is not None:
                met = "met" if ours[1] <= limit + EPS else "**missed**"
                md += [f"Largest QAT ratio {ours[1]:.2f} ({ours[0]}; limit {limit:.2f}: {met})"
                       + (f", torch.ao {theirs[1]:.2f}" if theirs else "") + ".", ""]
    return md


def gpu_table(gpu: dict) -> str:
    """bench/gpu_steps.py's results: per task and batch, each variant's median step and median ratio to float."""
    body = []
    for task, by_batch in gpu["step_times"].items():
        for batch, st in by_batch.items():
            med, ratio = st["median_ms"], st["ratio_to_float"]
            body += [[task, batch, k, f"{med[k]:.2f}", f"{ratio[k]:.2f}" if k in ratio else "—"]
                     for k in sorted(med, key=lambda k: k != "float")]
    return _table(["task", "batch", "variant", "median step ms", "ratio to float"], body)


def latency_table(files: list[dict]) -> str:
    """bench/latency.py's files: per QATConfig variant and batch, the medians and the medians of per-round ratios."""
    body = []
    for f in files:
        variant = " + ".join(o.replace("_", " ") for o in LATENCY_OPTIONS if f.get(o)) or "defaults"
        med = {(r["runtime"], r["batch"]): r["median_ms"] for r in f["rows"]}
        for r in f["ratios"]:
            b = r["batch"]
            body.append([variant, str(b), f"{med['ort-int8-qatkit', b]:.2f}", f"{med['ort-fp32', b]:.2f}",
                         f"{med['ort-int8-quantize_static', b]:.2f}", f"{r['qatkit_int8_vs_ort_fp32']:.3f}",
                         f"{r['qatkit_int8_vs_quantize_static']:.3f}", str(f["rounds"])])
    return _table(["qatkit QATConfig", "batch", "qatkit int8 ms", "float ORT ms", "quantize_static ms",
                   "int8 / float ORT", "int8 / quantize_static", "rounds"], body)


def _scales(model: dict) -> str:
    """The scale options of a bench/experiment.py model, from its overrides: "power of two", "exact multipliers" or
    "free", joined by "+ exact adds" and "+ reduce range" where those were set."""
    overrides = model["recipe"] if isinstance(model["recipe"], list) else []
    label = ("power of two" if "qat.power_of_two_scales=true" in overrides else
             "exact multipliers" if "qat.exact_multipliers=true" in overrides else "free")
    extras = [name for key, name in (("qat.exact_adds=true", "exact adds"), ("qat.reduce_range=true", "reduce range"))
              if key in overrides]
    return " + ".join([label, *extras])


def _equal(entry: dict) -> str:
    return f"{entry['equal']:.6g} ({entry['max_steps']:g})"


def _of_seed(row: dict, seed: int) -> float:
    """A row's accuracy for one of its seeds (a one-seed row may hold only `accuracy`)."""
    return (row.get("accuracies") or [row["accuracy"]])[row["seeds"].index(seed)]


def qat_seeds_table(runs: list[dict], rows_by_task: dict[str, list[dict]]) -> str:
    """Per (task, bits): the suite's QAT row (its fine-tune seed: the float model's) beside the same fine-tune from
    other seeds (bench/experiment.py --qat-seed), each against the float row and its target."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["seed"], r["weight_bits"], r["act_bits"]), []).append(r)
    body = []
    for (task, seed, w, a), extra in sorted(groups.items()):
        rows = rows_by_task.get(task, [])
        suite_row, float_row = _find(rows, "qat", (w, a), "direct"), _find(rows, "float", (32, 32))
        if suite_row is None or float_row is None or seed not in suite_row["seeds"]:
            continue
        accs = {seed: _of_seed(suite_row, seed)} | {r["qat_seed"]: r["accuracy"] for r in extra}
        base = _of_seed(float_row, seed)
        limit = TARGETS[task].drops.get((w, a)) if task in TARGETS else None
        values = list(accs.values())
        spread = _pct(statistics.stdev(values)) if len(values) > 1 else "0"
        body.append([task, f"{w}/{a}", str(seed), ", ".join(f"{q}: {_pct(v)}" for q, v in sorted(accs.items())),
                     f"{_pct(statistics.fmean(values))} ± {spread}", _signed(100 * (min(values) - base)),
                     "—" if limit is None else _signed(-100 * limit)])
    return _table(["task", "W/A bits", "float seed", "accuracy % by fine-tune seed", "mean ± std",
                   "worst Δ vs float (pp)", "target Δ (pp)"], body)


def agreement_table(files: list[dict]) -> str:
    """The integer reference against ONNX Runtime on trained models (bench/deploy_agreement.py's files)."""
    body = []
    for f in files:
        for m in f["models"]:
            fixed = m["fixed-point_vs_float32"]
            worst = min(fixed["per_kernel"].items(), key=lambda kv: kv[1]["equal"])
            body.append([m["task"], f"W{m['weight_bits']}A{m['act_bits']}", _scales(m), _pct(m["qat_accuracy"]),
                         f"{m['images']:,}", _equal(m["ort_vs_float32"]), _equal(fixed["end_to_end"]),
                         f"{worst[1]['equal']:.8g} ({worst[0] if worst[1]['equal'] < 1 else 'every kernel'})",
                         _equal(m["fixed-point-gemmlowp_vs_float32"]["end_to_end"])])
    return _table(["task", "bits", "scales", "QAT acc. %", "images", "ORT = float32 mode", "fixed point, end to end",
                   "fixed point, lowest kernel", "gemmlowp, end to end"], body)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def write_benchmarks(results: dict | list[dict], out_md: Path, plots_dir: Path,
                     commands: list[str] | None = None, sources: list[str] | None = None,
                     agreement: list[dict] | None = None, gpu: dict | None = None,
                     latency: list[dict] | None = None, cpu_steps: list[dict] | None = None,
                     qat_seeds: list[dict] | None = None) -> Path:
    """Write BENCHMARKS.md at out_md and its plots under plots_dir; return out_md. `agreement`: the contents of
    bench/deploy_agreement.py's results files, for the deploy section; `gpu`: bench/gpu_steps.py's results;
    `latency`: bench/latency.py's results files; `cpu_steps`: bench/step_times.py's on other CPUs; `qat_seeds`:
    bench/experiment.py --qat-seed rows."""
    out_md, plots_dir = Path(out_md), Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    data = merge(results)
    tasks = list(data["tasks"]) + [t for t in TARGETS if t not in data["tasks"]]  # a task not run yet: "not measured"
    rows_by_task = {t: data["rows"].get(t, []) for t in tasks}
    md: list[str] = ["# Benchmarks", ""]
    md.append("qatkit's quantization-aware training against the float model, post-training quantization (min/max "
              "and MSE ranges) and torch.ao QAT: accuracy, size, ONNX Runtime int8 latency and training step cost"
              + (f", generated by `bench/report.py` from {', '.join(f'`{s}`' for s in sources)}." if sources else
                 ", generated by `bench/report.py`."))
    md.append("")
    for m, names in data["machines"]:
        which = f" ({', '.join(names)})" if len(data["machines"]) > 1 and names else ""
        md.append(f"**Machine**{which}: {_machine_line(m)}")
        md.append("")
    if data["quick"]:
        md += ["> ⚠ Quick smoke run (tiny subsets, few steps): these numbers check the pipeline, not the benchmark.",
               ""]
    md += [("Accuracy is top-1 on the test set in %, mean ± std over seeds; Δ is in percentage points (pp) against "
            "the float row. Latency: ONNX Runtime, batch 32, 2 threads, median (the int8 QDQ model for quantized "
            "rows, the float ONNX model for the float row), measured on an AMD EPYC with AVX-512 VNNI (Zen 4) when "
            "the export stored every weight as int8; it now stores 8-bit weights as uint8 + 128 where ORT's u8·s8 "
            "kernel could saturate on CPUs without VNNI (src/qatkit/export/ORT_NUMERICS.md), which these rows do "
            "not reflect: `bench/results/latency_resnet20*.json` hold ResNet-20 on an AVX2-only EPYC (Zen 3). "
            "Verify: qatkit's model against its ONNX export (fraction of equal top-1, fraction of logits within "
            "one quantization step). W/A bits: W of every weight, A of every quantized layer's input; the first "
            "and last layer stay at `first_last_bits` and the skip path (residual adds, the global pool's input) at "
            "`residual_bits`, as LSQ and PACT keep the skip path in float."), ""]

    for task in tasks:
        rows = rows_by_task[task]
        md += [f"## {task}", ""]
        line = _task_line(data["tasks"].get(task) or {}, rows)
        if line:
            md += [line, ""]
        if task in TASK_NOTES:
            md += [TASK_NOTES[task], ""]
        md += [results_table(rows) if rows else "_no result rows_", ""]
        checks = acceptance(task, rows, data["step_times"].get(task))
        if checks:
            counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "not measured")}
            md += [(f"### Acceptance ({counts['pass']} met, {counts['fail']} missed, "
                    f"{counts['not measured']} not measured)"), ""]
            md += [c.line() for c in checks]
            md += ["", "QAT targets use the direct schedule; progressive rows are reported, not targeted.", ""]
        osc = [r for r in rows if r.get("oscillating") is not None]
        if osc:
            md += ["Weights oscillating in the last QAT epoch (share of sub-8-bit weights whose integer code moved "
                   "back against its previous move, Nagel et al. 2022): "
                   + ", ".join(f"{_family(r)} {100 * r['oscillating']:.2f}%" for r in osc) + ".", ""]
        st = data["step_times"].get(task)
        if st:
            md += [f"### Step time ({task})", "", _step_table(st), ""]
        if rows:
            png = plot_accuracy_vs_bits(task, rows, plots_dir / f"accuracy_vs_bits_{task}.png")
            md += [f"![accuracy vs bits, {task}]({_rel(png, out_md.parent)})", ""]

    if qat_seeds:
        md += ["## QAT fine-tune seeds", "",
               ("The suite trains CIFAR-10 ResNet-20 from one float model (seed 0), its QAT fine-tune drawing its "
                "shuffling and calibration batches from that seed. The closest targets, fine-tuned again from the same "
                "float model with other seeds (`bench/experiment.py --qat-seed N`, the suite's recipe unchanged): the "
                "spread a seed adds, and the worst run against the target."), "",
               qat_seeds_table(qat_seeds, rows_by_task), ""]

    png = plot_size_vs_latency(rows_by_task, plots_dir / "size_vs_latency.png")
    md += ["## Size vs latency", "", f"![size vs latency]({_rel(png, out_md.parent)})", ""]

    if agreement:
        md += ["## Deploy: the integer-only reference against ONNX Runtime", "",
               ("`qatkit.export.integer_reference` on the trained QAT models' ONNX files "
                "(`bench/deploy_agreement.py`): its float32-multiplier mode against ONNX Runtime, and its fixed-point "
                "modes (M = M0·2^-n; one rounding of the exact product, or gemmlowp's double rounding) against "
                "float32 mode: the fraction of equal output values (largest difference in steps), end to end and, "
                "for the kernel kind with the fewest equal outputs, per kernel on equal inputs. Scales: free "
                "(learned), powers of two (`power_of_two_scales`), where every multiplier is a shift, or free with "
                "exact multipliers (`exact_multipliers`: each weight scale nudged so that every conv/linear "
                "multiplier is a multiple of 2^-16, 2^-20 at 4-bit outputs, and ORT's float32 product is exact); "
                "+ exact adds (`exact_adds`: each residual add and global pool shares one quantizer with its inputs, "
                "so their rescale factors are 1); + reduce range (`reduce_range`: 8-bit weights at 7 bits)."), "",
               agreement_table(agreement), ""]

    if latency:
        md += ["## Deploy: ResNet-20 latency in ONNX Runtime", "",
               (f"`bench/latency.py` on {latency[0]['machine']}, ONNX Runtime {latency[0]['ort_version']}, "
                f"{latency[0]['threads']} threads: qatkit's int8 export (random-initialised ResNet-20, calibrated on "
                "8 CIFAR-10 batches), the float ONNX model, and ONNX Runtime's quantize_static model (QDQ, "
                "per-channel) from the same float weights, interleaved in one process. Ratios are medians of the "
                "per-round ratios. With the defaults, 8-bit weights beside 8-bit inputs are stored as uint8 + 128 "
                "so that a CPU without VNNI computes them exactly (its u8·u8 kernel, about as slow as float); "
                "reduce range trains them at 7 bits and keeps the fast u8·s8 kernel, exactly."), "",
               latency_table(latency), ""]

    if cpu_steps:
        md += ["## Training step on other CPUs", "",
               ("`bench/step_times.py` (the suite's step-time phase alone: batch 64, 2 threads, interleaved rounds; "
                "the ratio is the median of the per-round ratios) on CPUs other than the suite's. The QAT step's extra "
                "cost (fused fake quantization, the requantized skip path below 8 bits) is about the same number of "
                "milliseconds where the float step is several times faster, so its ratio is higher there. Run to run "
                "the ratios move by a few hundredths, with the machine's load: on the AVX-512 CPU below, the same code "
                "measured ResNet-20's QAT ratios at 1.20-1.23 (torch.ao 1.79) with a 73 ms float step, and at "
                "1.16-1.20 (torch.ao 1.71) with a 79 ms one, about the same milliseconds of QAT overhead; an older "
                "kernel's 15-round run measured 1.34 at most."), "",
               *cpu_steps_section(cpu_steps)]

    if gpu:
        m = gpu["machine"]
        md += ["## Training step on a GPU", "",
               (f"`bench/gpu_steps.py` on an {m.get('gpu')} (torch {m.get('torch')}): forward, backward and optimizer "
                f"step on random inputs, synchronised, {gpu.get('rounds')} interleaved rounds; the ratio is the median "
                "of the per-round ratios. The GPU runs qatkit's eager fake-quant formulas (the fused kernel is the "
                "CPU's), so the QAT step is bound by kernel launches: its time hardly changes with the batch."), "",
               gpu_table(gpu), ""]

    md += ["## Published anchors", "",
           ("Other models and data sets (mostly ImageNet, other architectures and recipes): context for the "
            "size of quantization losses, **not directly comparable** with the numbers above. "
            "Source: the project's REFERENCES.md."), ""]
    md += [_table(["model / data", "bits W/A", "float", "quantized", "method, source"], [list(a) for a in ANCHORS]),
           ""]

    md += ["## How to reproduce", "", "From the repository root, nothing else heavy running:", "", "```bash",
           *(commands if commands is not None else DEFAULT_COMMANDS), "```", ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_md) as tmp:
        tmp.write_text("\n".join(md), encoding="utf-8")
    return out_md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", type=Path, default=[f for f in DEFAULT_RESULTS if f.is_file()] or DEFAULT_RESULTS[:1],
                   help="results JSON file(s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plots", type=Path, default=DEFAULT_PLOTS)
    p.add_argument("--agreement", type=Path, nargs="*", default=[f for f in DEFAULT_AGREEMENT if f.is_file()],
                   help="bench/deploy_agreement.py results files (default: those of bench/results/ that exist)")
    p.add_argument("--gpu", type=Path, default=DEFAULT_GPU if DEFAULT_GPU.is_file() else None,
                   help="bench/gpu_steps.py results file (default: bench/results/gpu_step_times.json if it exists)")
    p.add_argument("--cpu-steps", type=Path, nargs="*", default=[f for f in DEFAULT_CPU_STEPS if f.is_file()],
                   help="bench/step_times.py results files from other CPUs (default: bench/results/step_times_avx512.json"
                        " if it exists)")
    p.add_argument("--latency", type=Path, nargs="*", default=DEFAULT_LATENCY,
                   help="bench/latency.py results files (default: bench/results/latency_resnet20*.json)")
    p.add_argument("--qat-seeds", type=Path, nargs="*", default=DEFAULT_QAT_SEEDS,
                   help="bench/experiment.py --qat-seed results (default: bench/results/experiments/*-qatseed*-s*.json)")
    args = p.parse_args(argv)
    loaded, agreement, gpu, latency, cpu_steps, qat_seeds = [], [], [], [], [], []
    for path, into, command in [(r, loaded, "suite.py") for r in args.results] + \
            [(a, agreement, "deploy_agreement.py") for a in args.agreement] + \
            [(g, gpu, "gpu_steps.py") for g in [args.gpu] if g is not None] + \
            [(lat, latency, "latency.py") for lat in args.latency] + \
            [(c, cpu_steps, "step_times.py") for c in args.cpu_steps] + \
            [(q, qat_seeds, "experiment.py") for q in args.qat_seeds]:
        if not path.is_file():
            print(f"error: {path} not found: run python bench/{command} first", file=sys.stderr)
            return 2
        try:
            into.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            print(f"error: {path} is not valid JSON ({e}): run python bench/{command} again", file=sys.stderr)
            return 2
    root = BENCH.parent
    out = write_benchmarks(loaded, args.out, args.plots, agreement=agreement, gpu=gpu[0] if gpu else None,
                           latency=latency, cpu_steps=cpu_steps, qat_seeds=qat_seeds, sources=[
        str(r.resolve().relative_to(root)) if r.resolve().is_relative_to(root) else str(r)
        for r in args.results + args.agreement + ([args.gpu] if args.gpu else []) + args.latency + args.cpu_steps
        + args.qat_seeds])
    data = merge(loaded)
    tasks = list(data["tasks"]) + [t for t in TARGETS if t not in data["tasks"]]
    checks = [c for t in tasks for c in acceptance(t, data["rows"].get(t, []), data["step_times"].get(t))]
    print(f"wrote {out}: {sum(c.status == 'pass' for c in checks)} targets met, "
          f"{sum(c.status == 'fail' for c in checks)} missed, {sum(c.status == 'not measured' for c in checks)} "
          f"not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
