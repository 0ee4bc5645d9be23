"""Attention as people write it: F.scaled_dot_product_attention (rewritten as the ops it computes, float64
reference) and a nanoGPT model (both its flash and its explicit path): QAT eval = integer model = ONNX Runtime."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit
from qatkit.export import export_onnx, ort, verify
from qatkit.export.integer_reference import IntegerReference


class SDPA(nn.Module):
    def __init__(self, causal: bool, scale: float | None, dropout: float, mask: str | None):
        super().__init__()
        self.causal, self.scale, self.dropout, self.mask = causal, scale, dropout, mask

    def forward(self, q, k, v):
        mask = None
        if self.mask == "bool":  # each query sees the first keys up to its own row's length
            mask = torch.arange(k.size(-2))[None, :] <= torch.arange(q.size(-2))[:, None] % 3 + 1
        elif self.mask == "float":
            mask = torch.linspace(-1.0, 1.0, q.size(-2) * k.size(-2), dtype=q.dtype).reshape(q.size(-2), k.size(-2))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout, is_causal=self.causal,
                                              scale=self.scale)


@pytest.mark.parametrize("causal, scale, mask", [(False, None, None), (True, None, None), (False, 0.3, "bool"),
                                                 (False, None, "float")])
def test_scaled_dot_product_attention_is_rewritten_as_the_ops_it_computes(causal, scale, mask):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    qat = qatkit.prepare(SDPA(causal, scale, 0.2, mask), qatkit.QATConfig(matmul_bits=None), (q, k, v))
    assert "F.scaled_dot_product_attention" not in qat.code and "matmul" in qat.code  # nothing quantized: float ops
    with torch.no_grad():
        torch.testing.assert_close(qat.eval()(q, k, v), SDPA(causal, scale, 0.0, mask)(q, k, v), rtol=1e-12, atol=1e-12)
    qat.train()  # dropout_p became an nn.Dropout that follows the mode (SDPA itself drops in eval too)
    torch.manual_seed(0)
    first = qat(q, k, v)
    torch.manual_seed(1)
    assert not torch.equal(first, qat(q, k, v))


class CausalSelfAttention(nn.Module):
    """nanoGPT's (model.py): flash = F.scaled_dot_product_attention, else the explicit masked softmax."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, flash: bool):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, 0.1, flash
        if not flash:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                               is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, flash: bool):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, flash)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(0.1))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, flash: bool, vocab: int = 40, block_size: int = 16, n_embd: int = 32):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(0.1),
            h=nn.ModuleList([Block(n_embd, 2, block_size, flash) for _ in range(2)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}, block size is only {self.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x)[:, [-1], :])  # the next token's logits


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt_quantizes_converts_and_runs_exactly_in_onnx_runtime(flash, tmp_path):
    torch.manual_seed(0)
    model = GPT(flash).eval()
    idx = torch.randint(0, 40, (32, 12))
    qat = qatkit.prepare(model, qatkit.QATConfig(), idx[:2])
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 4  # q·kᵀ and weights·v of both blocks
    qatkit.calibrate(qat, [idx])
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        expected = qat(idx)
        assert expected.shape == (32, 1, 40) and (expected - model(idx)).abs().max() < 0.1
        assert torch.equal(integer(idx), expected)
    path = tmp_path / "gpt.onnx"
    export_onnx(integer, path, idx[:1])
    result = verify(path, integer, [idx])  # LayerNorm, softmax, GELU are float islands: at most one step apart
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0
    ort_out = ort.run(ort.session(path, threads=1), idx)
    assert np.array_equal(IntegerReference(path, requant="float32").run(idx.numpy()), ort_out)
