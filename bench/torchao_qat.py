"""External baseline: torch.ao.quantization's FX-mode QAT at W8A8 (x86 backend), fine-tuned from the same
float model and with the same optimizer and schedule as qatkit's QAT recipe, converted to a real int8 model
on torch's quantized CPU kernels.

qconfig: `get_default_qat_qconfig_mapping("x86")`, i.e. int8 per-channel symmetric weights and uint8
per-tensor activations with moving-average min/max observers. The x86 qconfig sets reduce_range=True, so
activations use 0..127 (7 bits) to avoid overflow in fbgemm's int8 dot products.

    from torchao_qat import run  # bench/ on sys.path, as for recipes.py
    result = run(float_model, train_loader, test_loader, epochs=12, lr=3e-4, example=x[:1])
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_observer, get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
from tqdm import tqdm

from qatkit.train import evaluate as _evaluate

BACKEND = "x86"
# torch.ao.quantization's deprecation notices (it points users to torchao), two of them as UserWarnings.
_DEPRECATIONS = ("torch.ao.quantization is deprecated", "Please use quant_min and quant_max",
                 "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Ignore the deprecation notices above inside the block."""
    with warnings.catch_warnings():
        for message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message)
        yield


def prepare(float_model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """A train-mode copy of `float_model` traced and prepared for QAT (conv-BN fused, fake quantizers inserted)."""
    model = copy.deepcopy(float_model).train()
    with _quiet():
        return prepare_qat_fx(model, get_default_qat_qconfig_mapping(BACKEND), (example,))


def train(qat_model: torch.fx.GraphModule, train_loader: Iterable, epochs: int, lr: float, *, observer_epochs: int,
          bn_freeze_epoch: int, seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Fine-tune in place: AdamW (no weight decay), per-step cosine from lr to 0, cross-entropy.

    Observers are disabled once `observer_epochs` epochs are done (scales and zero points are fixed from then
    on); BN uses its running statistics from epoch index `bn_freeze_epoch` (0-based) on. Each epoch e starts
    from torch.manual_seed(seed + e) and loader.set_epoch(e).
    """
    steps = len(train_loader)
    optimizer = torch.optim.AdamW(qat_model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / (epochs * steps)))))
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        torch.manual_seed(seed + epoch)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        qat_model.train()
        if epoch >= bn_freeze_epoch:
            qat_model.apply(freeze_bn_stats)
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in tqdm(train_loader, total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                         leave=False, dynamic_ncols=True):
            logits = qat_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
            n += y.shape[0]
        if epoch + 1 >= observer_epochs:
            qat_model.apply(disable_observer)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": correct / n,
                        "seconds": time.perf_counter() - t0})
    return history


def convert(qat_model: torch.fx.GraphModule) -> nn.Module:
    """An int8 copy of the QAT model on torch's quantized CPU kernels (x86 engine, else fbgemm)."""
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = BACKEND if BACKEND in engines else "fbgemm"
    with _quiet():
        return convert_fx(copy.deepcopy(qat_model).eval())


def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy (fraction) over (x, y) batches, in eval mode without grad."""
    return _evaluate(model, loader)["accuracy"]


def model_bytes(int8_model: nn.Module) -> int:
    """Bytes of the converted model's serialized state_dict (packed int8 weights, scales, zero points)."""
    buf = io.BytesIO()
    torch.save(int8_model.state_dict(), buf)
    return buf.getbuffer().nbytes


def run(float_model: nn.Module, train_loader: Iterable, test_loader: Iterable, *, epochs: int, lr: float,
        seed: int = 0, example: torch.Tensor) -> dict[str, Any]:
    """Prepare, fine-tune, convert and measure one torch.ao QAT run.

    Observers off after half of the epochs (torch.ao's QAT tutorial: after 4 of 8), BN frozen from two thirds
    on (qatkit's recipe: from epoch 8 of 12); with one epoch, both stay on for all of it and the observers are
    turned off at its end, before evaluation and conversion.
    """
    qat_model = prepare(float_model, example)
    t0 = time.perf_counter()
    history = train(qat_model, train_loader, epochs, lr, observer_epochs=max(1, epochs // 2),
                    bn_freeze_epoch=max(1, 2 * epochs // 3), seed=seed)
    train_seconds = time.perf_counter() - t0
    int8_model = convert(qat_model)
    return {"accuracy": evaluate(int8_model, test_loader), "fake_quant_accuracy": evaluate(qat_model, test_loader),
            "model_bytes": model_bytes(int8_model), "train_seconds": train_seconds, "history": history}
