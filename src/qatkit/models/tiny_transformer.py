"""TinyTransformer: a small pre-norm transformer encoder for image patches or token ids.

Built only from nn.Linear, nn.LayerNorm, nn.GELU, nn.Embedding and attention written out with
matmuls and softmax (no nn.MultiheadAttention), so a QAT tool sees every matmul it must quantize.
All shapes come from constructor arguments and the batch size, so torch.fx can trace it:
images must be (B, in_channels, image_size, image_size); token sequences must be (B, max_len),
padded with id 0 to max_len. Pads are masked: no token attends to them and the mean pool skips them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import bad_value


class Attention(nn.Module):
    """Multi-head softmax self-attention over a fixed number of tokens."""

    def __init__(self, dim: int, heads: int, num_tokens: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.num_tokens = heads, dim // heads, num_tokens
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D); key_bias (B, 1, 1, N) is added to the attention logits (-1e4 masks a key)."""
        batch, n, h, d = x.shape[0], self.num_tokens, self.heads, self.head_dim
        qkv = self.qkv(x).reshape(batch, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, h, N, d)
        logits = q @ k.transpose(-2, -1) * self.scale  # (B, h, N, N)
        attn = (logits if key_bias is None else logits + key_bias).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, n, h * d)  # (B, N, D)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, num_tokens: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, num_tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.attn(self.norm1(x), key_bias)
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return x


class TinyTransformer(nn.Module):
    """Give either image_size, in_channels and patch_size (images) or vocab_size and max_len (tokens)."""

    def __init__(
        self,
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        image_size: int | None = None,
        in_channels: int | None = None,
        patch_size: int | None = None,
        vocab_size: int | None = None,
        max_len: int | None = None,
    ) -> None:
        super().__init__()
        inputs = {"image_size": image_size, "in_channels": in_channels, "patch_size": patch_size,
                  "vocab_size": vocab_size, "max_len": max_len}
        given = {k for k, v in inputs.items() if v is not None}
        if given not in ({"image_size", "in_channels", "patch_size"}, {"vocab_size", "max_len"}):
            raise bad_value(
                "TinyTransformer input arguments",
                sorted(given),
                "exactly {image_size, in_channels, patch_size} or {vocab_size, max_len}",
                "pass all three image arguments for images, or both token arguments for token ids",
            )
        if dim % heads:
            raise bad_value("dim", dim, f"a multiple of heads={heads}", "change dim or heads")
        self.token_input = vocab_size is not None
        if self.token_input:
            num_tokens = max_len
            self.embed = nn.Embedding(vocab_size, dim)
        else:
            if image_size % patch_size:
                raise bad_value("patch_size", patch_size, f"a divisor of image_size={image_size}",
                                "pick a patch size that divides the image size")
            self.in_channels, self.patch_size, self.grid = in_channels, patch_size, image_size // patch_size
            num_tokens = self.grid**2
            self.embed = nn.Linear(in_channels * patch_size**2, dim)
        self.num_tokens = num_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, num_tokens) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT init: truncated normal (std 0.02) for embeddings and Linear weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Non-overlapping patches, row-major: (B, C, H, W) -> (B, N, C * p * p)."""
        batch, c, g, p = x.shape[0], self.in_channels, self.grid, self.patch_size
        x = x.reshape(batch, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, p, p)
        return x.reshape(batch, g * g, c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.token_input:  # images (B, C, H, W) -> (B, N, D)
            x = self.norm(self.blocks(self.embed(self._patchify(x)) + self.pos_embed))
            return self.head(x.mean(1))  # (B, num_classes)
        keep = (x != 0).float().unsqueeze(-1)  # token ids (B, N) -> (B, N, 1): 1 for a token, 0 for padding
        key_bias = (keep.reshape(x.shape[0], 1, 1, self.num_tokens) - 1.0) * 1e4  # (B, 1, 1, N)
        x = self.embed(x) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x, key_bias)
        x = self.norm(x)
        return self.head((x * keep).sum(1) / keep.sum(1))  # mean over the tokens (B, D) -> (B, num_classes)
