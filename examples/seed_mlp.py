"""The project's worked example: 3 inputs → 5 sigmoid hidden units → 2 softmax outputs, quantized.

    loss = ½·Σ(softmax(z) − y)² + λ1·ΔW1² + λ2·ΔW2² + λ3·Δb1² + λ4·Δb2²

with Δ = x − x̂ the quantization error of each tensor (mean over its elements) and the steps β of the
quantizers (y = round(x/β)·β) learned by gradient descent along with the weights. Biases are quantized as
the integer runtime holds them: int32 at step β_in·β_W. Run: python examples/seed_mlp.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import qatkit
from qatkit.models import SeedMLP

LAMBDAS = {"fc1.weight": 1e-2, "fc2.weight": 1e-2, "fc1.bias": 1e-2, "fc2.bias": 1e-2}  # λ1, λ2, λ3, λ4


def toy_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 features, 2 classes (one-hot): class 1 when x0 + x1·x2 > 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    label = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long()
    return x, F.one_hot(label, 2).float()


def build(seed: int = 0, weight_bits: int = 4, act_bits: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = qatkit.QATConfig(weight_bits=weight_bits, act_bits=act_bits, per_channel=False, first_last_bits=None,
                              output_bits=None,  # the softmax reads float logits, as in the worked example
                              error_penalty=LAMBDAS)
    return qatkit.prepare(SeedMLP(3, 5, 2), config)


def seed_loss(qat: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """½·Σ(softmax − y)² (mean over the batch) + Σ_k λ_k·mean(Δ_k²)."""
    p = torch.softmax(qat(x), dim=-1)
    return 0.5 * (p - y).pow(2).sum(dim=-1).mean() + qatkit.quantization_error_penalty(qat, LAMBDAS)


def train(qat: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 400, lr: float = 0.03,
          beta_lr: float = 1e-3) -> list[float]:
    """Full-batch Adam on the weights, biases and every step β (the steps at a smaller rate: Adam moves
    each parameter by about lr per step, and a step of 0.03 is larger than β itself)."""
    betas = [p for n, p in qat.named_parameters() if n.endswith(("scale", "zero_point"))]
    others = [p for n, p in qat.named_parameters() if not n.endswith(("scale", "zero_point"))]
    opt = torch.optim.Adam([{"params": others, "lr": lr}, {"params": betas, "lr": beta_lr}])
    losses = []
    for _ in range(steps):
        loss = seed_loss(qat, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    x, y = toy_data()
    qat = build()
    qatkit.calibrate(qat, [x], num_batches=1)  # initial β of the activations from the data
    beta_before = {n: p.detach().clone() for n, p in qat.named_parameters() if n.endswith("scale")}
    losses = train(qat, x, y)
    qat.eval()
    accuracy = (qat(x).argmax(-1) == y.argmax(-1)).float().mean().item()
    print(f"loss {losses[0]:.4f} → {losses[-1]:.4f}, accuracy {accuracy:.3f}")
    for name, before in beta_before.items():
        print(f"β {name}: {before.item():.5f} → {qat.get_submodule(name.rsplit('.', 1)[0]).scale.item():.5f}")
    integer = qatkit.convert(qat)
    print("integer model equals the QAT model:", torch.equal(integer(x), qat(x)))
    print(qatkit.describe(qat))


if __name__ == "__main__":
    main()
