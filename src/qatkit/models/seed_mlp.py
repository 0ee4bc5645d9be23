"""SeedMLP: the project's worked example, 3 inputs -> 5 sigmoid hidden units -> 2 outputs.

Small enough to follow every number by hand through training, quantization and conversion.
The model returns logits: the softmax of the worked example is applied by the loss.
"""
from __future__ import annotations

import torch
from torch import nn


class SeedMLP(nn.Module):
    """flatten -> Linear -> Sigmoid -> Linear."""

    def __init__(self, in_features: int = 3, hidden: int = 5, out_features: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.Sigmoid()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (B, in_features); images (B, C, H, W) are flattened too
        return self.fc2(self.act(self.fc1(x)))  # (B, out_features) logits
