"""The benchmark tasks and their training recipes, shared by bench/pretrain.py and bench/suite.py.

A task is a dataset, a zoo model and two recipes: the float pretraining whose checkpoints the project
produces itself (bench/pretrain.py, committed in bench/checkpoints/) and the QAT fine-tune from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from qatkit.config import QATConfig, TrainConfig
from qatkit.data import ImageDataset, TextDataset, load_dataset

BENCH = Path(__file__).resolve().parent
CHECKPOINTS = BENCH / "checkpoints"  # committed float weights (small)
WORK = BENCH / "work"  # resumable state of runs in progress (not committed)
DEFAULT_DATA = BENCH.parent.parent / "shared" / "data"


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    folder: str  # under --data
    model: str
    float_train: TrainConfig
    qat_train: TrainConfig  # QAT fine-tune from the float checkpoint (also PTQ's calibration batches)
    seeds: tuple[int, ...]  # float checkpoints (and QAT rows) per seed
    qat: QATConfig = QATConfig()  # bit-widths set per row
    qat_train_at: dict[str, dict] = field(default_factory=dict)  # qat_train fields changed at some bits: {"w2a2": {...}}
    bits: tuple[tuple[int, int], ...] | None = None  # the (W, A) rows of PTQ and QAT; None: every pair of the suite
    baselines: bool = True  # torch.ao's QAT and the progressive-precision rows beside qatkit's

    def qat_recipe(self, weight_bits: int, act_bits: int) -> TrainConfig:
        """The QAT fine-tune at these bits: qat_train with the changes qat_train_at names for them."""
        return dataclasses.replace(self.qat_train, **self.qat_train_at.get(f"w{weight_bits}a{act_bits}", {}))

    def load(self, data_root: Path, limit: int | None = None) -> ImageDataset | TextDataset:
        return load_dataset(self.dataset, str(data_root / self.folder), limit=limit)

    def checkpoint(self, seed: int) -> Path:
        return CHECKPOINTS / f"{self.name}-s{seed}.safetensors"


# The QAT recipe (Nagel et al. 2021's, with LSQ's first/last layers at 8 bits): qatkit's defaults — symmetric
# per-channel weights, asymmetric activations, MSE range init, learnable scales and zero points (AdamW, scales
# at lr/100), BN folded and frozen for the last third, distillation from the float model; the share of weights
# oscillating (Nagel et al. 2022) is tracked, reported per QAT row.
TASKS = {
    # SmallCNN (4 conv-BN-ReLU, 65 k params) on MNIST: AdamW, cosine, no augmentation.
    "mnist-small-cnn": Task(
        "mnist-small-cnn", "mnist", "mnist", "small-cnn", seeds=(0, 1, 2),
        float_train=TrainConfig(epochs=12, batch_size=128, lr=3e-3, weight_decay=5e-4, optimizer="adamw",
                                warmup_epochs=0.5, progress=False),
        # 8 epochs: with 4, W2A2 lost 0.68 pp (seed 0; 8 epochs: 0.41 pp)
        qat_train=TrainConfig(epochs=8, batch_size=128, lr=3e-4, distill=0.5, bn_freeze_epoch=6, track_oscillations=True,
                              progress=False)),
    # ResNet-20 (He et al. 2016, 0.27 M params) on CIFAR-10: the usual SGD recipe (momentum 0.9, lr 0.1 at
    # batch 128, weight decay 5e-4, random crop + flip) with a cosine schedule instead of step decays.
    "cifar10-resnet20": Task(
        "cifar10-resnet20", "cifar10", "cifar10", "resnet20", seeds=(0,),
        float_train=TrainConfig(epochs=120, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd", momentum=0.9,
                                warmup_epochs=1, augment="crop-flip", progress=False),
        qat_train=TrainConfig(epochs=15, batch_size=128, lr=5e-4, distill=0.5, bn_freeze_epoch=10, augment="crop-flip",
                              track_oscillations=True, progress=False),
        # W2A2 with 15 epochs: 84.40 % (−7.5 pp), training accuracy still rising (87.6 %); with 40 epochs, BN
        # frozen for the last third as at the other bits: 86.71 %. BN frozen from the start (training runs the
        # folded layer as deployed, no batch statistics): 87.26 % in 15 epochs (experiments/
        # cifar-w2a2-15ep-bnfreeze0-s0.json), 88.27 % in 40. A learning rate of 1e-3 instead of 5e-4 changed nothing
        # in 4 epochs.
        qat_train_at={"w2a2": {"epochs": 40, "bn_freeze_epoch": 0}}),
    # TinyTransformer (2 pre-norm blocks, width 64, 4 heads; padding masked) from scratch on SST-2 (GLUE; the
    # 872-sentence dev split is the test split, as papers report it): AdamW with weight decay, cosine.
    "sst2-transformer": Task(
        "sst2-transformer", "sst2", "sst2", "tiny-transformer", seeds=(0,),
        float_train=TrainConfig(epochs=3, batch_size=64, lr=1e-3, weight_decay=0.05, optimizer="adamw",
                                warmup_epochs=0.5, progress=False),
        qat_train=TrainConfig(epochs=2, batch_size=64, lr=1e-4, distill=0.5, track_oscillations=True, progress=False),
        bits=((8, 8), (4, 4)), baselines=False),
}


def float_recipe(task: Task, seed: int, epochs: int | None = None) -> TrainConfig:
    return dataclasses.replace(task.float_train, seed=seed, **({} if epochs is None else {"epochs": epochs}))
