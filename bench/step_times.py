"""The suite's training-step timing phase on its own (no accuracy runs): float vs qatkit QAT at each bit-width vs
torch.ao QAT, batch 64, 2 threads, interleaved rounds. Weights do not change a step's cost: a task whose float
checkpoint is not there yet is timed with freshly initialised weights.

    python bench/step_times.py [--rounds 15] [--out bench/results/step_times.json]   # a few minutes, machine quiet
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from qatkit.pipeline import build_for

import suite
from recipes import BENCH, DEFAULT_DATA, TASKS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=BENCH / "results" / "step_times.json")
    args = p.parse_args()
    results = {"machine": suite.machine_info(), "step_times": {}}
    for name, task in TASKS.items():
        ds = task.load(args.data, limit=4096)
        torch.manual_seed(0)
        model = build_for(task.model, ds)
        checkpoint = task.checkpoint(task.seeds[0])
        if checkpoint.exists():
            model.load_state_dict(load_file(str(checkpoint)))
        results["step_times"][name] = {"weights": checkpoint.name if checkpoint.exists() else "initial",
                                       **suite.step_times(task, model.eval(), ds, args.rounds)}
        print(name, json.dumps(results["step_times"][name]["ratio_to_float"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
