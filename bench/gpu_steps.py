"""Training-step time on a GPU: float vs qatkit QAT (W8A8, W4A4, W4A4 with exact multipliers) vs torch.ao QAT W8A8,
for the suite's two models, interleaved rounds, medians of per-round ratios to the float step. Random inputs of the
task's shape and freshly initialised weights (neither changes a step's cost); the activation ranges are calibrated
on them. Each step ends with torch.cuda.synchronize(), so a sample is the GPU's time, not the launch queue's.

    python bench/gpu_steps.py [--device cuda] [--batches 128 512] [--rounds 15] [--out bench/results/gpu_step_times.json]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import suite
import torchao_qat
from qatkit.calibrate import calibrate
from qatkit.export.bench import interleaved
from qatkit.models import build_model
from qatkit.prepare import prepare
from qatkit.train.loop import build_optimizer
from recipes import BENCH, TASKS

SHAPES = {"mnist-small-cnn": (1, 28), "cifar10-resnet20": (3, 32)}  # (channels, image size)
VARIANTS = {"qat-w8a8": {"weight_bits": 8, "act_bits": 8}, "qat-w4a4": {"weight_bits": 4, "act_bits": 4},
            "qat-w4a4-exact": {"weight_bits": 4, "act_bits": 4, "exact_multipliers": True}}


def models_for(task, device: torch.device, batch: int) -> dict[str, torch.nn.Module]:
    channels, size = SHAPES[task.name]
    torch.manual_seed(0)
    model_f = build_model(task.model, num_classes=10, in_channels=channels, image_size=size).to(device)
    calib = [torch.randn(batch, channels, size, size, device=device) for _ in range(2)]
    models = {"float": copy.deepcopy(model_f).train()}
    for name, options in VARIANTS.items():
        q = prepare(model_f, dataclasses.replace(task.qat, **options), calib[0][:1])
        calibrate(q, calib)
        models[name] = q.train()
    models["torch.ao-qat-w8a8"] = torchao_qat.prepare(model_f.cpu(), calib[0][:1].cpu()).to(device).train()
    return models


def step_fn(name: str, model: torch.nn.Module, task):
    opt = (torch.optim.AdamW(model.parameters(), lr=task.qat_train.lr) if name.startswith("torch.ao")
           else build_optimizer(model, task.qat_train))

    def step(batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "gpu_step_times.json")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results = {"machine": {**suite.machine_info(), "threads": torch.get_num_threads(), "gpu": gpu},
               "rounds": args.rounds, "step_times": {}}
    for task_name in SHAPES:
        task = TASKS[task_name]
        channels, size = SHAPES[task_name]
        models = models_for(task, device, max(args.batches))
        steps = {name: step_fn(name, m, task) for name, m in models.items()}
        data = {b: (torch.randn(b, channels, size, size, device=device), torch.randint(0, 10, (b,), device=device))
                for b in args.batches}
        with torchao_qat._quiet():
            samples = interleaved(steps, {n: data for n in steps}, args.batches, args.rounds, warmup=5)
        rows = {}
        for b in args.batches:
            per = {n: np.array(samples[(n, b)]) for n in steps}
            rows[str(b)] = {"median_ms": {n: round(float(np.median(s)), 3) for n, s in per.items()},
                            "ratio_to_float": {n: round(float(np.median(s / per["float"])), 3)
                                               for n, s in per.items() if n != "float"}}
        results["step_times"][task_name] = rows
        print(task_name, json.dumps(rows), flush=True)
    suite.write(args.out, results)


if __name__ == "__main__":
    main()
