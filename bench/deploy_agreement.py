"""Deploy check of issue 3: models trained W8A8 (and W4A4) by qatkit, exported to ONNX, run by ONNX Runtime
on the whole test set and compared with qatkit's own model (`qatkit verify`), and the integer-only reference
executor's float32 and fixed-point modes against ONNX Runtime on the same test set.

Training uses the first N training samples and few epochs (the check is about agreement, not accuracy);
each finished task is cached in the results file, so an interrupted run resumes.

    python bench/deploy_agreement.py [--data ../shared/data] [--out bench/results/deploy_agreement.json]
    python bench/deploy_agreement.py --bits 4,8 --tasks cifar10-resnet20 --out bench/results/deploy_agreement_w4a8.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qatkit.config import TrainConfig
from qatkit.convert import convert
from qatkit.data import load_dataset
from qatkit.export import export_onnx, verify
from qatkit.export.integer_reference import REQUANT_MODES, IntegerReference
from qatkit.export.ort import session
from qatkit.pipeline import RunConfig, _loaders, quantize, train_float
from qatkit.train import evaluate

TASKS = {  # name: dataset, data folder, model, train samples, float epochs, QAT epochs, augment
    "mnist-small-cnn": ("mnist", "mnist", "small-cnn", 20000, 2, 1, "none"),
    "cifar10-resnet20": ("cifar10", "cifar10", "resnet20", 10000, 4, 1, "crop-flip"),
}


REFERENCE_SAMPLES = {"mnist-small-cnn": None, "cifar10-resnet20": 2000}  # numpy reference is slow: a subset for CIFAR


def reference_agreement(path: Path, loader, limit: int | None = None) -> dict:
    """The integer-only reference on the whole test set: float32-multiplier mode against ONNX Runtime's output,
    and each fixed-point mode against float32 mode (fraction of equal output values, largest difference in
    output steps)."""
    sess = session(path, threads=1)
    modes = {m: IntegerReference(path, m) for m in REQUANT_MODES}
    graph = modes["float32"].model.graph
    nodes = {n.output[0]: n for n in graph.node}
    step = float(modes["float32"].consts[nodes[nodes["output"].input[0]].input[1]])  # output = Identity(DQ(q, s, z))
    stats = {key: [0, 0, 0.0] for key in ["ort_vs_float32"] + [f"{m}_vs_float32" for m in REQUANT_MODES[1:]]}
    seen = 0
    for x, _ in loader:
        if limit is not None and seen >= limit:
            break
        x = x.numpy()[: None if limit is None else limit - seen]
        seen += x.shape[0]
        ref = modes["float32"].run(x)
        pairs = {"ort_vs_float32": sess.run(["output"], {sess.get_inputs()[0].name: x})[0]}
        pairs |= {f"{m}_vs_float32": modes[m].run(x) for m in REQUANT_MODES[1:]}
        for key, other in pairs.items():
            d = np.abs(other - ref) / step
            eq, n, worst = stats[key]
            stats[key] = [eq + int((d < 1e-3).sum()), n + d.size, max(worst, float(d.max()))]
    return {k: {"equal": eq / n, "values": n, "max_steps": round(w, 3)} for k, (eq, n, w) in stats.items()}


def run_task(name: str, data_root: Path, pairs: list[tuple[int, int]]) -> dict:
    dataset, folder, model, n_train, float_epochs, qat_epochs, augment = TASKS[name]
    ds = load_dataset(dataset, str(data_root / folder))
    ds = dataclasses.replace(ds, train=ds.train.head(n_train))
    config = RunConfig(dataset=dataset, model=model, float_epochs=float_epochs, float_lr=3e-3,
                       train=TrainConfig(epochs=qat_epochs, lr=3e-4, distill=0.5, augment=augment, progress=False))
    _, _, test_loader = _loaders(ds, config.train)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        float_model = train_float(config, ds, out)
        float_acc = evaluate(float_model, test_loader)["accuracy"]
        for w_bits, a_bits in pairs:
            t = time.perf_counter()
            qat = quantize(config, ds, float_model, w_bits, a_bits, out, train=True)
            path = out / f"w{w_bits}a{a_bits}.onnx"
            integer = convert(qat)
            notes = export_onnx(integer, path, torch.zeros(1, ds.in_channels, ds.image_size, ds.image_size))
            check = verify(path, integer, test_loader)
            rows.append({"weight_bits": w_bits, "act_bits": a_bits, "qat_accuracy": evaluate(integer, test_loader)["accuracy"],
                         **{k: check[k] for k in ("n", "top1_agreement", "within_one_step", "max_step_diff")},
                         "per_layer": check["per_layer"], "onnx_bytes": path.stat().st_size, "notes": notes,
                         "integer_reference": reference_agreement(path, test_loader, REFERENCE_SAMPLES[name]),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(name, rows[-1], flush=True)
    return {"task": name, "train_samples": n_train, "float_epochs": float_epochs, "qat_epochs": qat_epochs,
            "float_accuracy": float_acc, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "deploy_agreement.json"))
    parser.add_argument("--bits", nargs="+", default=["8,8", "4,4"], help="weight,activation bit pairs (default 8,8 4,4)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    pairs = [tuple(int(b) for b in pair.split(",")) for pair in args.bits]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"tasks": {}}
    results.update(torch=torch.__version__, threads=torch.get_num_threads())
    for name in args.tasks:
        if name not in results["tasks"]:
            results["tasks"][name] = run_task(name, Path(args.data), pairs)
            out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
