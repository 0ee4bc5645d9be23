"""Deploy check of issue 3 on the suite's trained QAT models: the integer-only reference executor against ONNX Runtime.

For each (task, bits, seed) it takes the ONNX file bench/suite.py exported for that QAT row (the fully trained model;
the row's `verify` already holds ONNX Runtime against qatkit's own model on the whole test set), or with --experiments
the ONNX file of a bench/experiment.py run (e.g. a recipe with power-of-two scales), and measures on the
test set (CIFAR-10: the first 2,000 images, the numpy reference is slow):
  - ort_vs_float32: ONNX Runtime's output against the reference in float32-multiplier mode (ORT's arithmetic);
  - for each fixed-point mode, against float32 mode:
      end_to_end  the graph's output values, each mode running on its own integers (differences compound: a flip
                  in one layer moves the accumulators of the next);
      per_kernel  every integer kernel's output codes with its inputs forced to float32 mode's codes, by op kind
                  (what the requantization rule itself changes).
Each entry reports `equal` (fraction of equal values), `values` and `max_steps` (largest difference, in steps).
Results are cached per model, so an interrupted run resumes.

    python bench/suite.py --no-timing        # first: trains and exports the QAT rows
    python bench/deploy_agreement.py [--bits 8,8 4,4] [--tasks mnist-small-cnn cifar10-resnet20]
    python bench/deploy_agreement.py --experiments cifar-w8a8-po2-s0   # models of bench/experiment.py instead
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from qatkit.data.loader import BatchLoader
from qatkit.export.integer_reference import REQUANT_MODES, IntegerReference
from qatkit.export.ort import session
from recipes import BENCH, DEFAULT_DATA, TASKS, WORK
from suite import recipe_id, write

LIMIT = {"mnist-small-cnn": None, "cifar10-resnet20": 2000}  # test images (None: all)
BATCH = 250


class Tally:
    """Equal fraction and largest difference (in steps) over many arrays."""

    def __init__(self):
        self.equal, self.values, self.max_steps = 0, 0, 0.0

    def add(self, a: np.ndarray, b: np.ndarray, step: float = 1.0) -> None:
        d = np.abs(a.astype(np.float64) - b.astype(np.float64)) / step
        self.equal += int((d < 1e-3).sum())
        self.values += d.size
        self.max_steps = max(self.max_steps, float(d.max(initial=0.0)))

    def result(self) -> dict:
        return {"equal": self.equal / max(self.values, 1), "values": self.values, "max_steps": round(self.max_steps, 3)}


def agreement(path: Path, loader, limit: int | None) -> dict:
    sess = session(path, threads=1)
    modes = {m: IntegerReference(path, m) for m in REQUANT_MODES}
    ref = modes["float32"]
    nodes = {n.output[0]: n for n in ref.model.graph.node}
    out = nodes[ref.output_names[0]]
    out_dq = nodes[out.input[0]] if out.op_type == "Identity" else out
    out_q, step = out_dq.input[0], ref.consts[out_dq.input[1]]  # the output's codes and DequantizeLinear scale
    zero = ref.consts[out_dq.input[2]] if len(out_dq.input) > 2 and out_dq.input[2] else 0
    ort = Tally()
    end_to_end = {m: Tally() for m in REQUANT_MODES[1:]}
    per_kernel = {m: defaultdict(Tally) for m in REQUANT_MODES[1:]}
    kinds = {m: {f.out: f.kind for f in modes[m].fused.values()} for m in REQUANT_MODES[1:]}  # output -> op kind
    seen = 0
    for x, _ in loader:
        x = x.numpy()[: None if limit is None else limit - seen]
        if x.shape[0] == 0:
            break
        seen += x.shape[0]
        codes = ref.run_codes(x)
        y = (codes[out_q].astype(np.float32) - np.float32(zero)) * step  # DequantizeLinear, in float32 as ORT
        ort.add(sess.run(None, {sess.get_inputs()[0].name: x})[0], y, float(step))
        for m in REQUANT_MODES[1:]:
            end_to_end[m].add(modes[m].run_codes(x)[out_q], codes[out_q])
            for name, v in modes[m].run_codes(x, force=codes).items():
                per_kernel[m][kinds[m].get(name, "QuantizeLinear")].add(v, codes[name])
    return {"images": seen, "ort_vs_float32": ort.result(),
            **{f"{m}_vs_float32": {"end_to_end": end_to_end[m].result(),
                                   "per_kernel": {k: t.result() for k, t in sorted(per_kernel[m].items())}}
               for m in REQUANT_MODES[1:]}}


def suite_models(args) -> list[dict]:
    """The suite's QAT rows at --bits of --tasks: what each measurement starts from, and its ONNX path."""
    suite_runs = {(r["task"], r["key"]): r for r in json.loads(args.suite.read_text())["runs"]}
    models = []
    for name in args.tasks:
        for w, a in (tuple(int(b) for b in pair.split(",")) for pair in args.bits):
            key = f"qat-w{w}a{a}-s{args.seed}"
            run = suite_runs.get((name, key))
            if run is None or run["recipe"] != recipe_id(TASKS[name], "qat", w, a):
                held = sorted(k for t, k in suite_runs if t == name and k.startswith("qat-w"))
                raise SystemExit(f"{name} {key}: no run of the current recipe in {args.suite} (it holds {held}). "
                                 f"Fix: python bench/suite.py --tasks {name} --no-timing, or --bits of those")
            models.append({"task": name, "key": key, "recipe": run["recipe"], "weight_bits": w, "act_bits": a,
                           "qat_accuracy": run["accuracy"], "verify": run["verify"],
                           "path": WORK / "suite" / name / run["onnx"]})
    return models


def experiment_models(names: list[str]) -> list[dict]:
    """The QAT models bench/experiment.py trained under these names (their rows in bench/results/experiments/)."""
    models = []
    for name in names:
        row_file = BENCH / "results" / "experiments" / f"{name}.json"
        if not row_file.exists():
            held = sorted(p.stem for p in row_file.parent.glob("*.json"))
            raise SystemExit(f"--experiments {name}: {row_file} does not exist. Fix: run bench/experiment.py "
                             f"--name {name} first, or name one of {held}")
        row = json.loads(row_file.read_text())
        models.append({"task": row["task"], "key": f"experiment:{name}", "recipe": row["overrides"],
                       "weight_bits": row["weight_bits"], "act_bits": row["act_bits"], "qat_accuracy": row["accuracy"],
                       "verify": row["verify"], "path": WORK / "exp" / name / row["onnx"]})
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "deploy_agreement.json")
    p.add_argument("--suite", type=Path, default=BENCH / "results" / "suite.json", help="the suite's results file")
    p.add_argument("--bits", nargs="+", default=["8,8", "4,4"], help="weight,activation bit pairs (default 8,8 4,4)")
    p.add_argument("--tasks", nargs="+", default=["mnist-small-cnn", "cifar10-resnet20"], choices=list(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiments", nargs="+", metavar="NAME",
                   help="measure these bench/experiment.py models instead of the suite's rows")
    args = p.parse_args()
    models = experiment_models(args.experiments) if args.experiments else suite_models(args)
    results = json.loads(args.out.read_text()) if args.out.exists() else \
        {"source": "QAT models the suite (bench/suite.py) or bench/experiment.py trained, their exported ONNX files",
         "models": []}
    datasets = {}
    for model in models:
        name, key, path = model["task"], model["key"], model.pop("path")
        if any(m["task"] == name and m["key"] == key and m["recipe"] == model["recipe"] for m in results["models"]):
            continue
        if name not in datasets:  # once per task, and only if a model needs it
            datasets[name] = TASKS[name].load(args.data)
        ds = datasets[name]
        loader = BatchLoader(ds.test, batch_size=BATCH, shuffle=False, mean=ds.mean, std=ds.std)
        t0 = time.perf_counter()
        row = {**model, **agreement(path, loader, LIMIT[name]), "seconds": round(time.perf_counter() - t0, 1)}
        results["models"] = [m for m in results["models"] if (m["task"], m["key"]) != (name, key)] + [row]
        write(args.out, results)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
