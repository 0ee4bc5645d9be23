"""The accuracy benchmark suite: tasks {MNIST small CNN, CIFAR-10 ResNet-20} × methods {float, PTQ min/max,
PTQ MSE, QAT W8A8/W4A8/W4A4/W3A3/W2A2 (and progressive 8→4→2 at W2A2), torch.ao QAT W8A8}, and SST-2 with the tiny
transformer × {float, PTQ min/max, PTQ MSE, QAT} at W8A8 and W4A4.

Every (task, method, bits, seed) run lands in the results file as soon as it is done, and a QAT run
checkpoints every epoch (bench/work/suite/), so an interrupted suite resumes where it stopped when the same
command runs again. Two timing phases per task follow the runs, on a machine with nothing else running:
ONNX Runtime latency of every exported model (batch 32, interleaved rounds, medians) and the training step
time of QAT vs the float model and torch.ao's QAT (batch 64, interleaved rounds, medians of per-round ratios).

    python bench/suite.py                       # full suite (hours; float checkpoints from bench/pretrain.py)
    python bench/suite.py --tasks mnist-small-cnn --no-timing    # accuracy runs only
    python bench/suite.py --timing-only         # timing phases only (stop a suite running beside it first)
    python bench/suite.py --step-times-only     # the QAT/float step-time phase only (after a training-speed change)
    python bench/suite.py --quick --out /tmp/quick.json          # CI smoke run: tiny subsets, 1 epoch
    python bench/report.py                      # BENCHMARKS.md and plots from the results
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import torchao_qat
from pretrain import pretrain
from qatkit.calibrate import calibrate
from qatkit.config import QATConfig, TrainConfig, to_dict
from qatkit.convert import convert, save
from qatkit.export import export_onnx, verify
from qatkit.export.bench import export_float, interleaved, machine
from qatkit.export.ort import session
from qatkit.fileio import atomic_file
from qatkit.pipeline import _loaders, build_for
from qatkit.prepare import prepare
from qatkit.train import evaluate, fit
from qatkit.train.loop import CHECKPOINT_NAME, build_optimizer
from recipes import BENCH, DEFAULT_DATA, TASKS, WORK, Task

PAIRS = ((8, 8), (4, 8), (4, 4), (3, 3), (2, 2))
PROGRESSIVE = {(2, 2): (8, 4, 2)}  # progressive-precision rows, beside the direct ones at the same bits
QAT_ORDER = ((4, 4), (8, 8), (2, 2), (3, 3), (4, 8))  # the rows both tasks target first, then W3A3 (CIFAR's
# target only), W4A8, torch.ao's row and the progressive rows (compared, not targeted)
QUICK = {"train": 256, "test": 256, "epochs": 1, "rounds": 2}
LATENCY_BATCH, STEP_BATCH, THREADS = 32, 64, 2


# ---- one run ------------------------------------------------------------------------------------
def _recipes(task: Task, method: str, w: int, a: int) -> dict:
    """The recipes a run uses (as JSON has them): float training, the QAT fine-tune (a QAT run's at its bits,
    Task.qat_recipe) and the QAT config."""
    train = task.qat_recipe(w, a) if method == "qat" else task.qat_train
    return json.loads(json.dumps({"float": to_dict(task.float_train), "qat_train": to_dict(train),
                                  "qat": to_dict(task.qat)}))


def _digest(recipes: dict) -> str:
    return hashlib.sha256(json.dumps(recipes, sort_keys=True).encode()).hexdigest()[:12]


def recipe_id(task: Task, method: str, w: int, a: int) -> str:
    """Changes with the recipes a run uses: runs made with another recipe are stale and run again; a change made at
    some bits reruns only those rows."""
    return _digest(_recipes(task, method, w, a))


def is_current(run: dict, task: Task, made_with: dict | None) -> bool:
    """Whether a run in the results file was made with the task's recipes: its recipe id is theirs, or the file's
    `tasks` entry it was made with (made_with) differs from them only by config fields added since, which hold their
    defaults there (TrainConfig.grad_clip, QATConfig.reduce_range, …: they changed nothing; the committed runs
    would all run again)."""
    now = _recipes(task, run["method"], run["weight_bits"], run["act_bits"])
    if run.get("recipe") == _digest(now):
        return True
    if made_with is None:
        return False
    at = made_with.get("qat_recipe_at", {}).get(f"w{run['weight_bits']}a{run['act_bits']}", {})
    made = {"float": made_with["float_recipe"], "qat": made_with["qat_config"],
            "qat_train": {**made_with["qat_recipe"], **(at if run["method"] == "qat" else {})}}
    defaults = json.loads(json.dumps({"float": to_dict(TrainConfig()), "qat_train": to_dict(TrainConfig()),
                                      "qat": to_dict(QATConfig())}))
    return run.get("recipe") == _digest(made) and all(
        made[part].get(key, defaults[part].get(key)) == value for part, fields in now.items()
        for key, value in fields.items())


def _key(method: str, w: int, a: int, schedule: str | None, seed: int) -> str:
    return f"{method}-w{w}a{a}" + (f"-{schedule}" if schedule and schedule != "direct" else "") + f"-s{seed}"


def pairs_of(task: Task) -> tuple[tuple[int, int], ...]:
    return task.bits or PAIRS


def planned_runs(task: Task, seeds: list[int]) -> list[tuple[str, int, int, str | None, int]]:
    """Each seed's float and PTQ runs (minutes), then each training run over all seeds in turn, so that a suite cut
    off holds the targeted rows of every seed before the rest."""
    runs, pairs = [], pairs_of(task)
    for seed in seeds:
        runs.append(("float", 32, 32, None, seed))
        runs += [(m, w, a, None, seed) for m in ("ptq-minmax", "ptq-mse") for w, a in pairs]
    trained = [("qat", w, a, "direct") for w, a in QAT_ORDER if (w, a) in pairs]
    if task.baselines:
        trained += [("torch.ao-qat", 8, 8, None)]
        trained += [("qat", w, a, "-".join(map(str, stages))) for (w, a), stages in PROGRESSIVE.items()]
    return runs + [(*spec, seed) for spec in trained for seed in seeds]


def float_model(task: Task, seed: int, data_root: Path, quick: bool, ds, work: Path) -> tuple[torch.nn.Module, Path]:
    """The committed float checkpoint of (task, seed); in --quick mode without one, a 1-epoch model on the subset."""
    path = task.checkpoint(seed)
    if not path.exists():
        if not quick:
            sys.exit(f"error: {path} not found. Fix: run python bench/pretrain.py {task.name} first")
        path = work / path.name
        if not path.exists():
            pretrain(task.name, seed, data_root, epochs=QUICK["epochs"], limit=QUICK["train"], out=path, work=work)
    model = build_for(task.model, ds)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), path


def run_one(task: Task, spec: tuple, model_f: torch.nn.Module, float_path: Path, ds, work: Path, quick: bool,
            qat_seed: int | None = None) -> dict:
    """One row; the fine-tune (shuffling, calibration batches) draws from the float model's seed, or `qat_seed`."""
    method, w, a, schedule, seed = spec
    train_cfg = task.qat_recipe(w, a) if method == "qat" else task.qat_train
    train_cfg = dataclasses.replace(train_cfg, seed=seed if qat_seed is None else qat_seed,
                                    **({"epochs": QUICK["epochs"]} if quick else {}))
    train_loader, calib_loader, test_loader = _loaders(ds, train_cfg)
    example = next(iter(test_loader))[0][:1]
    row = {"task": task.name, "method": method, "schedule": schedule, "weight_bits": w, "act_bits": a, "seed": seed}
    t0 = time.perf_counter()
    if method == "float":
        onnx = export_float(model_f, example, work / f"{_key(method, w, a, None, seed)}.onnx")
        return {**row, "accuracy": evaluate(model_f, test_loader)["accuracy"], "model_bytes": float_path.stat().st_size,
                "onnx_bytes": onnx.stat().st_size, "onnx": onnx.name, "train_seconds": None, "verify": None}
    if method == "torch.ao-qat":
        result = torchao_qat.run(model_f, train_loader, test_loader, epochs=train_cfg.epochs, lr=train_cfg.lr,
                                 seed=seed, example=example)
        return {**row, "accuracy": result["accuracy"], "fake_quant_accuracy": result["fake_quant_accuracy"],
                "model_bytes": result["model_bytes"], "onnx_bytes": None, "onnx": None,
                "train_seconds": round(result["train_seconds"], 1), "verify": None}
    init = {"ptq-minmax": "minmax"}.get(method, task.qat.weight_init)
    qcfg = dataclasses.replace(task.qat, weight_bits=w, act_bits=a, weight_init=init,
                               act_init={"ptq-minmax": "minmax"}.get(method, task.qat.act_init))
    model = prepare(model_f, qcfg, example)
    calibrate(model, calib_loader, train_cfg.calib_batches)
    if method == "qat":
        if schedule != "direct":
            train_cfg = dataclasses.replace(train_cfg, progressive_bits=tuple(int(b) for b in schedule.split("-")))
        ckpt = work / "checkpoints" / recipe_id(task, method, w, a) / _key(method, w, a, schedule, seed)
        history = fit(model, train_loader, train_cfg, teacher=model_f, error_penalty=qcfg.error_penalty,
                      checkpoint_dir=ckpt, resume=(ckpt / CHECKPOINT_NAME).exists())
        row["oscillating"] = history[-1].get("oscillating")  # share of sub-8-bit weights, last epoch
    seconds = time.perf_counter() - t0
    name = _key(method, w, a, schedule, seed)
    save(convert(model), work / f"{name}.safetensors")
    export_onnx(model, work / f"{name}.onnx", example)
    row |= {"accuracy": evaluate(model, test_loader)["accuracy"], "model_bytes": (work / f"{name}.safetensors").stat().st_size,
            "onnx_bytes": (work / f"{name}.onnx").stat().st_size, "onnx": f"{name}.onnx",
            "train_seconds": round(seconds, 1) if method == "qat" else None, "verify": None}
    if method == "qat" or (w, a) == (8, 8):  # ONNX Runtime's int8 kernels against qatkit's model, whole test set
        v = verify(work / f"{name}.onnx", model, test_loader, threads=THREADS)
        row["verify"] = {k: v[k] for k in ("n", "top1_agreement", "within_one_step", "max_step_diff")}
    return row


# ---- timing -------------------------------------------------------------------------------------
def latency(runs: list[dict], work: Path, rounds: int, x: np.ndarray) -> dict[str, float]:
    """ONNX Runtime median ms per batch x (LATENCY_BATCH samples) for every exported model of the first seed,
    interleaved."""
    if not runs:
        return {}
    seed = min(r["seed"] for r in runs)
    files = {r["onnx"]: work / r["onnx"] for r in runs if r["seed"] == seed and r.get("onnx") and (work / r["onnx"]).exists()}
    fns = {}
    for name, path in files.items():
        sess = session(path, THREADS)
        fns[name] = (lambda s, i: (lambda x: s.run(None, {i: x})))(sess, sess.get_inputs()[0].name)
    samples = interleaved(fns, {n: {LATENCY_BATCH: x} for n in fns}, [LATENCY_BATCH], rounds, warmup=3)
    return {name: round(float(np.median(samples[(name, LATENCY_BATCH)])), 4) for name in fns}


def step_times(task: Task, model_f: torch.nn.Module, ds, rounds: int) -> dict:
    """Training step (forward, backward, optimizer step; cross-entropy, no teacher) of the float model, qatkit's
    QAT models and torch.ao's QAT model on the same batch, in rotating order; medians and per-round ratios."""
    train_cfg = task.qat_train
    _, calib_loader, _ = _loaders(ds, train_cfg)
    x, y = next(iter(_loaders(ds, dataclasses.replace(train_cfg, batch_size=STEP_BATCH))[0]))
    models = {"float": copy.deepcopy(model_f).train()}
    for w, a in pairs_of(task):
        q = prepare(model_f, dataclasses.replace(task.qat, weight_bits=w, act_bits=a), x[:1])
        calibrate(q, calib_loader, 2)
        models[f"qat-w{w}a{a}"] = q.train()
    if task.baselines:
        models["torch.ao-qat-w8a8"] = torchao_qat.prepare(model_f, x[:1])
    steps = {}
    for name, model in models.items():
        opt = build_optimizer(model, train_cfg) if not name.startswith("torch.ao") else torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=0.0)

        def step(_, model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[name] = step
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torchao_qat._quiet():
            samples = interleaved(steps, {n: {STEP_BATCH: None} for n in steps}, [STEP_BATCH], rounds, warmup=3)
    finally:
        torch.set_num_threads(previous)
    per = {n: np.array(samples[(n, STEP_BATCH)]) for n in steps}
    return {"machine": machine_info(), "batch": STEP_BATCH, "threads": THREADS, "rounds": rounds, "teacher": False,
            "median_ms": {n: round(float(np.median(s)), 3) for n, s in per.items()},
            "ratio_to_float": {n: round(float(np.median(s / per["float"])), 4) for n, s in per.items() if n != "float"}}


# ---- rows ---------------------------------------------------------------------------------------
def aggregate(runs: list[dict], step: dict | None, lat: dict | None) -> list[dict]:
    """One row per (task, method, schedule, bits): accuracy mean and sample std over seeds; sizes, latency and
    verify of the first seed (verify: the worst over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"], r["schedule"], r["weight_bits"], r["act_bits"]), []).append(r)
    rows = []
    for (task, method, schedule, w, a), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        accs = [r["accuracy"] for r in rs]
        verifies = [r["verify"] for r in rs if r.get("verify")]
        osc = [r["oscillating"] for r in rs if r.get("oscillating") is not None]  # QAT below 8 bits
        step_key = {"qat": f"qat-w{w}a{a}", "torch.ao-qat": "torch.ao-qat-w8a8"}.get(method)
        ratios = (step or {}).get("ratio_to_float", {})
        rows.append({
            "task": task, "method": method, "schedule": schedule, "weight_bits": w, "act_bits": a,
            "accuracy": statistics.fmean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accuracies": accs, "seeds": [r["seed"] for r in rs], "model_bytes": rs[0]["model_bytes"],
            "onnx_bytes": rs[0]["onnx_bytes"], "latency_ms": (lat or {}).get(rs[0].get("onnx") or ""),
            "step_time_ratio": ratios.get(step_key) if step_key else None,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rs) if rs[0]["train_seconds"] else None,
            "oscillating": statistics.fmean(osc) if osc else None,
            "verify": None if not verifies else {
                "n": verifies[0]["n"], "top1_agreement": min(v["top1_agreement"] for v in verifies),
                "within_one_step": min(v["within_one_step"] for v in verifies),
                "max_step_diff": max(v["max_step_diff"] for v in verifies)},
        })
    return rows


def machine_info() -> dict:
    return {"cpu": machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": THREADS,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1))


def run_task(task: Task, results: dict, out: Path, data_root: Path, quick: bool, timing: bool, work: Path,
             seeds: list[int] | None = None, log=print, runs: bool = True, latency_phase: bool = True) -> None:
    limit = QUICK["train"] if quick else None
    ds = task.load(data_root, limit)
    seeds = seeds or list(task.seeds[:1] if quick else task.seeds)
    made_with = results["tasks"].get(task.name)
    if runs or task.name not in results["tasks"]:  # the recipes of the runs in the file (--timing-only runs none)
        results["tasks"][task.name] = {"dataset": task.dataset, "model": task.model, "train_samples": len(ds.train),
                                       "test_samples": len(ds.test), "seeds": seeds,
                                       "float_recipe": to_dict(task.float_train), "qat_recipe": to_dict(task.qat_train),
                                       "qat_recipe_at": task.qat_train_at, "qat_config": to_dict(task.qat)}
    work = work / ("suite-quick" if quick else "suite") / task.name
    work.mkdir(parents=True, exist_ok=True)
    if runs:  # runs of an earlier recipe run again
        results["runs"] = [r for r in results["runs"] if r["task"] != task.name or is_current(r, task, made_with)]
        for r in results["runs"]:  # (ids of the recipes as they are now)
            if r["task"] == task.name:
                r["recipe"] = recipe_id(task, r["method"], r["weight_bits"], r["act_bits"])
    done = {r["key"] for r in results["runs"] if r["task"] == task.name}
    floats = {}
    for spec in planned_runs(task, seeds) if runs else []:
        key = _key(spec[0], *spec[1:4], spec[4])
        if key in done:
            continue
        seed = spec[4]
        if seed not in floats:
            floats[seed] = float_model(task, seed, data_root, quick, ds, work)
        t0 = time.perf_counter()
        row = {"key": key, "recipe": recipe_id(task, *spec[:3]), **run_one(task, spec, *floats[seed], ds, work, quick)}
        results["runs"].append(row)
        update_rows(results, task.name)  # the file's rows always match its runs, also when the suite is cut off
        write(out, results)
        log(f"[suite] {task.name} {key}: accuracy {row['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)")
    if timing:
        runs = [r for r in results["runs"] if r["task"] == task.name]
        rounds = QUICK["rounds"] if quick else 15
        if latency_phase:
            x = next(iter(_loaders(ds, task.qat_train)[2]))[0][:LATENCY_BATCH]  # the first test samples
            results["latency_ms"][task.name] = latency(runs, work, rounds, x.numpy())
        model_f = float_model(task, seeds[0], data_root, quick, ds, work)[0]
        results["step_times"][task.name] = step_times(task, model_f, ds, rounds)
        log(f"[suite] {task.name} step time / float: {results['step_times'][task.name]['ratio_to_float']}")
    update_rows(results, task.name)
    write(out, results)


def update_rows(results: dict, task_name: str) -> None:
    """Re-aggregate `task_name`'s rows from its runs and the timing sections."""
    runs = [r for r in results["runs"] if r["task"] == task_name]
    results["rows"] = [r for r in results["rows"] if r["task"] != task_name] + aggregate(
        runs, results["step_times"].get(task_name), results["latency_ms"].get(task_name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=None, help="results file (default bench/results/suite.json; "
                                                             "--quick: WORK/suite-quick.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: first {QUICK['train']} samples, "
                                                        f"{QUICK['epochs']} epoch, {QUICK['rounds']} timing rounds")
    p.add_argument("--seeds", help="comma-separated seeds (default: each task's; --quick: its first)")
    p.add_argument("--work", type=Path, default=WORK, help="resumable state of runs in progress (default bench/work)")
    phase = p.add_mutually_exclusive_group()
    phase.add_argument("--no-timing", dest="timing", action="store_false", help="accuracy runs only (timing needs a quiet machine)")
    phase.add_argument("--timing-only", action="store_true", help="timing phases only, of the runs the results file holds")
    phase.add_argument("--step-times-only", action="store_true",
                       help="the step-time phase only (no runs, no latency: the ONNX files may be elsewhere)")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        p.error(f"--tasks {args.tasks!r}: allowed: {', '.join(TASKS)}. Fix: pick from those")
    out = args.out or (args.work / "suite-quick.json" if args.quick else BENCH / "results" / "suite.json")
    try:
        results = json.loads(out.read_text()) if out.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        p.error(f"{out} is not a results file ({e}); allowed: a JSON file this suite wrote. Fix: pass another --out, "
                "or move the file away to start again")
    if not isinstance(results, dict):
        p.error(f"{out} holds a {type(results).__name__}, not a results object; allowed: a JSON file this suite "
                "wrote. Fix: pass another --out")
    if results and results.get("quick") != args.quick:
        p.error(f"{out} holds a {'quick' if results.get('quick') else 'full'} run; allowed: the same mode. "
                "Fix: pass another --out")
    results = {"machine": machine_info(), "quick": args.quick, "tasks": {}, "step_times": {}, "latency_ms": {},
               "runs": [], "rows": [], **results}
    torch.set_num_threads(int(os.environ.get("QATKIT_BENCH_THREADS", THREADS)))
    for name in tasks:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        run_task(TASKS[name], results, out, args.data, args.quick, args.timing, args.work, seeds,
                 runs=not (args.timing_only or args.step_times_only), latency_phase=not args.step_times_only)
    print(f"[suite] results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
