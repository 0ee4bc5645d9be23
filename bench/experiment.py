"""One suite run with a changed recipe, for trying a recipe change before it goes into recipes.py.

Runs what bench/suite.py runs for one (task, method, bits, schedule, seed), with recipe fields overridden, and
writes the row (accuracy, sizes, ORT verify) with the overrides to bench/results/experiments/NAME.json.

    python bench/experiment.py mnist-small-cnn --bits 2 2 --set qat.error_penalty='{"*.weight": 100}' \\
        --name mnist-w2a2-qat-8epochs-dampen100-s0
    python bench/experiment.py cifar10-resnet20 --bits 2 2 --set qat_train.epochs=30 --name cifar-w2a2-30epochs-s0
    python bench/experiment.py cifar10-resnet20 --bits 4 4 --qat-seed 1 --name cifar-w4a4-qatseed1-s0

--set takes RECIPE.FIELD=JSON with RECIPE one of qat (QATConfig) or qat_train (TrainConfig).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import suite
from recipes import BENCH, DEFAULT_DATA, TASKS, WORK

RECIPES = ("qat", "qat_train")


def override(task, assignment: str):
    what, _, value = assignment.partition("=")
    recipe, dot, field = what.partition(".")
    if recipe not in RECIPES or not dot or not value:
        raise SystemExit(f"--set {assignment!r}: allowed: RECIPE.FIELD=JSON with RECIPE one of {', '.join(RECIPES)}. "
                         "Fix: e.g. --set qat_train.epochs=30")
    config = getattr(task, recipe)
    if field not in {f.name for f in dataclasses.fields(config)}:
        raise SystemExit(f"--set {assignment!r}: {type(config).__name__} has no field {field!r}. "
                         f"Fix: one of {', '.join(f.name for f in dataclasses.fields(config))}")
    try:
        value = json.loads(value)
    except ValueError:
        raise SystemExit(f"--set {assignment!r}: the value is not JSON. Fix: quote strings, e.g. "
                         "--set qat_train.penalty_schedule='\"cosine\"'") from None
    return dataclasses.replace(task, **{recipe: dataclasses.replace(config, **{field: value})})


def at_bits(task, method: str, w: int, a: int):
    """The task with the fine-tune the suite runs for (method, w, a) as its qat_train: the one --set changes."""
    if method != "qat":
        return task
    return dataclasses.replace(task, qat_train=task.qat_recipe(w, a), qat_train_at={})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--name", required=True, help="results file name (bench/results/experiments/NAME.json)")
    p.add_argument("--bits", type=int, nargs=2, default=(2, 2), metavar=("W", "A"))
    p.add_argument("--method", default="qat", choices=("qat", "ptq-minmax", "ptq-mse"))
    p.add_argument("--schedule", default="direct", help="direct, or progressive bits such as 8-4-2")
    p.add_argument("--seed", type=int, default=0, help="the float model's seed (its committed checkpoint)")
    p.add_argument("--qat-seed", type=int, default=None,
                   help="the fine-tune's seed (shuffling, calibration batches); default: --seed")
    p.add_argument("--set", action="append", default=[], metavar="RECIPE.FIELD=JSON")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args()
    task = at_bits(TASKS[args.task], args.method, *args.bits)
    for assignment in args.set:
        task = override(task, assignment)
    torch.set_num_threads(suite.THREADS)
    ds = task.load(args.data)
    work = WORK / "exp" / args.name
    work.mkdir(parents=True, exist_ok=True)
    model_f, path = suite.float_model(task, args.seed, args.data, False, ds, work)
    t0 = time.perf_counter()
    row = suite.run_one(task, (args.method, *args.bits, args.schedule, args.seed), model_f, path, ds, work, False,
                        qat_seed=args.qat_seed)
    row |= {"overrides": args.set, "qat_seed": args.seed if args.qat_seed is None else args.qat_seed,
            "seconds": round(time.perf_counter() - t0, 1)}
    out = BENCH / "results" / "experiments" / f"{args.name}.json"
    suite.write(out, row)  # atomic: an interrupted write leaves no half file
    print(f"{args.name}: accuracy {row['accuracy']:.4f} -> {out}")


if __name__ == "__main__":
    main()
