"""Run by tests/train/test_distributed.py under `torchrun --standalone --nproc_per_node 2`: each rank trains the
models `build(name)` returns on its part of every batch and writes what it ended with to OUT/rank{r}.pt."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import qatkit
from qatkit.data import BatchLoader, load_dataset
from qatkit.errors import ConfigError, DataError
from qatkit.models import build_model
from qatkit.train import distributed

BATCH, LIMIT = 32, 320


def data(shard=(0, 1)):
    ds = load_dataset("digits", None, limit=LIMIT)
    common = dict(mean=ds.mean, std=ds.std)
    return (BatchLoader(ds.train, batch_size=BATCH, shuffle=True, augment="crop-flip", shard=shard, **common),
            BatchLoader(ds.train, batch_size=BATCH, shuffle=False, **common),
            BatchLoader(ds.test, batch_size=64, shuffle=False, shard=shard, **common))


def build(name: str, calibrated: bool = True) -> nn.Module:
    """'mlp': no BatchNorm, so data-parallel = one process on the whole batch; 'cnn': the zoo's small CNN (BN)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    else:
        model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4), torch.zeros(2, 1, 8, 8))
    if calibrated:
        qatkit.calibrate(qat, data()[1], 2)
    return qat


def train(qat: nn.Module, shard, epochs: int, checkpoint_dir=None) -> list[dict]:
    train_loader, _, val_loader = data(shard)
    return qatkit.fit(qat, train_loader, qatkit.TrainConfig(epochs=epochs, lr=1e-2, progress=False),
                      val_loader=val_loader, checkpoint_dir=checkpoint_dir)


def step(qat: nn.Module, shard, batch: int = BATCH) -> list[dict]:
    """One step on the first batch (this rank's part of it). The comparison with one process is made after one step:
    QAT's rounding turns float32's summation-order differences (data-parallel or not, AVX2 or AVX-512 kernels) into
    code flips that grow over a longer run. An odd `batch` splits unevenly (17 / 16 of 33)."""
    ds = load_dataset("digits", None, limit=LIMIT)
    loader = BatchLoader(ds.train, batch_size=batch, shuffle=False, shard=shard, mean=ds.mean, std=ds.std)
    return qatkit.fit(qat, [next(iter(loader))], qatkit.TrainConfig(epochs=1, lr=1e-2, progress=False))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    with distributed.process_group("cpu"):
        rank, shard = distributed.rank(), (distributed.rank(), distributed.world_size())
        result = {"world_size": distributed.world_size()}
        for name, epochs in (("mlp", 1), ("cnn", 2)):
            qat = build(name)
            result[f"{name}_history"] = train(qat, shard, epochs, checkpoint_dir=out / f"ckpt_{name}")
            result[name] = qat.state_dict()
        qat = build("mlp")
        result["mlp_step_history"], result["mlp_step"] = step(qat, shard), qat.state_dict()
        qat = build("mlp")
        result["mlp_odd_step_history"], result["mlp_odd_step"] = step(qat, shard, BATCH + 1), qat.state_dict()
        try:
            train(build("mlp", calibrated=False), shard, 1)
        except ConfigError as e:
            result["uncalibrated"] = str(e)
        train_loader, _, _ = data(shard)
        short = [b for b in train_loader][: len(train_loader) - rank]  # rank 1 has a batch fewer
        try:
            qatkit.fit(build("mlp"), short, qatkit.TrainConfig(epochs=1, progress=False))
        except DataError as e:
            result["unequal"] = str(e)
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
