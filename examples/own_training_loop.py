"""qatkit around your own training loop: prepare → calibrate → your loop → convert.

qatkit.fit is optional: a prepared model is an ordinary nn.Module whose quantizer scales are
Parameters, so any optimizer, schedule, AMP or DDP wrapper you already use trains it. Run:
    python examples/own_training_loop.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import qatkit
from qatkit.data import BatchLoader, load_dataset
from qatkit.models import build_model


def my_loop(model, loader, epochs, lr):
    """A plain PyTorch loop — stands for whatever loop you have."""
    quant_params = [p for n, p in model.named_parameters() if n.endswith((".scale", ".zero_point"))]
    others = [p for n, p in model.named_parameters() if not n.endswith((".scale", ".zero_point"))]
    # Quantizer steps are ~1e-3..1e-1: give them a smaller learning rate than the weights under Adam.
    opt = torch.optim.AdamW([{"params": others}, {"params": quant_params, "lr": lr / 100}], lr=lr)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return hits / loader.num_samples


def main() -> None:
    torch.manual_seed(0)
    ds = load_dataset("digits")
    train = BatchLoader(ds.train, batch_size=64, mean=ds.mean, std=ds.std, shuffle=True)
    test = BatchLoader(ds.test, batch_size=256, mean=ds.mean, std=ds.std, shuffle=False)

    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8)  # or your own nn.Module
    my_loop(model, train, epochs=10, lr=3e-3)
    print(f"float    {accuracy(model, test):.4f}")

    # 1. prepare: the QAT model (the float model is left as it is)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4), example_inputs=next(iter(test))[0][:2])
    print(qatkit.describe(qat))
    # 2. calibrate the activation ranges on a few batches
    qatkit.calibrate(qat, train, num_batches=8)
    print(f"PTQ W4A4 {accuracy(qat, test):.4f}")
    # 3. your loop, unchanged, now trains weights and quantizer steps together
    my_loop(qat, train, epochs=5, lr=3e-4)
    print(f"QAT W4A4 {accuracy(qat, test):.4f}")
    # 4. convert: the integer model computes what the QAT model computes in eval mode
    integer = qatkit.convert(qat)
    path = qatkit.save(integer, "small_cnn_w4a4.safetensors")
    print(f"integer  {accuracy(qatkit.load(path), test):.4f}  ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
