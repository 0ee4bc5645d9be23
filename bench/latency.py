"""Latency of ResNet-20 (CIFAR-10 layout) in four runtimes, interleaved in one process: float PyTorch, float ONNX
Runtime, qatkit's int8 QDQ export, and ONNX Runtime's quantize_static model from the same float weights.
Latency does not depend on the weights' values, so the float model is random-initialised; both int8 models are
calibrated on the same 8 batches of CIFAR-10 training images. With --reduce-range qatkit's model has 7-bit weights
where they would be 8-bit (QATConfig(reduce_range=True)), so its export keeps ONNX Runtime's u8·s8 kernels, which
without it are traded for exact u8·u8 ones on CPUs without VNNI (src/qatkit/export/ORT_NUMERICS.md).

--exact-multipliers and --exact-adds set those QATConfig options too (fixed-point hardware's integers = ORT's).

    python bench/latency.py [--data ../shared/data/cifar10] [--out bench/results/latency_resnet20.json] [--rounds 15]
    python bench/latency.py --reduce-range      # -> bench/results/latency_resnet20_reduce_range.json
    python bench/latency.py --reduce-range --exact-multipliers --exact-adds
                                                # -> latency_resnet20_reduce_range_exact_multipliers_exact_adds.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import qatkit
from qatkit.data import BatchLoader, load_dataset
from qatkit.export.bench import bench, format_table
from qatkit.models import build_model

OPTIONS = ("reduce_range", "exact_multipliers", "exact_adds")  # QATConfig switches, each a flag


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(root.parent / "shared" / "data" / "cifar10"))
    for option in OPTIONS:
        parser.add_argument(f"--{option.replace('_', '-')}", action="store_true",
                            help=f"qatkit's model with QATConfig({option}=True)")
    parser.add_argument("--out", help="results file (default: bench/results/latency_resnet20[_OPTION...].json)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args()
    options = {option: True for option in OPTIONS if getattr(args, option)}
    out = args.out or root / "bench" / "results" / f"latency_resnet20{''.join(f'_{o}' for o in options)}.json"
    torch.manual_seed(0)
    ds = load_dataset("cifar10", args.data)
    loader = BatchLoader(ds.train, batch_size=32, mean=ds.mean, std=ds.std, shuffle=True, seed=0)
    calib = [x for x, _ in zip((b[0] for b in loader), range(8))]
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32).eval()
    qat = qatkit.prepare(model, qatkit.QATConfig(**options), calib[0][:2])
    qatkit.calibrate(qat, calib, num_batches=8)
    result = bench(model, qat.eval(), calib[0][:1], calib, batches=(1, 32), threads=2, rounds=args.rounds)
    result.update({option: option in options for option in OPTIONS})
    Path(out).write_text(json.dumps(result, indent=2))
    print(format_table(result))


if __name__ == "__main__":
    main()
