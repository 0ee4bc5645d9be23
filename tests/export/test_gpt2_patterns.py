"""Hugging Face's GPT-2 as transformers writes it (modeling_gpt2.py, eager attention): Conv1D layers (the weight stored
(in, out), `torch.addmm`), a causal-mask buffer sliced by the lengths, `torch.finfo(dtype).min`, `torch.full([],
v.size(-1) ** 0.5)`, `.type(v.dtype)`, the tanh GELU written out, tied input and output embeddings. QAT eval =
integer model (bit for bit) = ONNX Runtime (within one step), at two lengths; the Conv1D layers are quantized."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import converts_exactly, learns_next_token, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.prepare.decompose import decompose

VOCAB, DIM, HEADS, MAX_LEN = 40, 32, 4, 24


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer with its weight transposed."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


class NewGELUActivation(nn.Module):
    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self):
        super().__init__()
        mask = torch.tril(torch.ones((MAX_LEN, MAX_LEN), dtype=torch.bool)).view(1, 1, MAX_LEN, MAX_LEN)
        self.register_buffer("bias", mask, persistent=False)
        self.num_heads, self.head_dim, self.split_size = HEADS, DIM // HEADS, DIM
        self.c_attn, self.c_proj = Conv1D(3 * DIM, DIM), Conv1D(DIM, DIM)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)

    def _attn(self, query, key, value):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype,
                                                 device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value), attn_weights

    def _split_heads(self, tensor, num_heads, attn_head_size):
        new_shape = tensor.size()[:-1] + (num_heads, attn_head_size)
        return tensor.view(new_shape).permute(0, 2, 1, 3)

    def _merge_heads(self, tensor, num_heads, attn_head_size):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        return tensor.view(tensor.size()[:-2] + (num_heads * attn_head_size,))

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query, key, value = (self._split_heads(t, self.num_heads, self.head_dim) for t in (query, key, value))
        attn_output, _ = self._attn(query, key, value)
        attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * DIM, DIM), Conv1D(DIM, 4 * DIM)
        self.act, self.dropout = NewGELUActivation(), nn.Dropout(0.1)

    def forward(self, hidden_states):
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(DIM), GPT2Attention()
        self.ln_2, self.mlp = nn.LayerNorm(DIM), GPT2MLP()

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.attn(self.ln_1(hidden_states)) + residual
        residual = hidden_states
        return residual + self.mlp(self.ln_2(hidden_states))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.wte, self.wpe, self.drop = nn.Embedding(VOCAB, DIM), nn.Embedding(MAX_LEN, DIM), nn.Dropout(0.1)
        self.h = nn.ModuleList(GPT2Block() for _ in range(layers))
        self.ln_f = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT2LMHeadModel ties them

    def forward(self, input_ids):
        input_shape = input_ids.size()
        input_ids = input_ids.view(-1, input_shape[-1])
        position_ids = torch.arange(0, input_shape[-1], dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.lm_head(self.ln_f(hidden_states))


CONV1D = ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj",
          "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]


def test_gpt2_as_transformers_writes_it_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel().eval()
    ids = torch.randint(0, VOCAB, (16, 12))
    qat = prepares_whole(model, ids[:2])
    layers = {row["name"]: row for row in qat.qat_info.layers}
    assert [n for n in layers if n in CONV1D] == CONV1D  # every Conv1D a quantized Linear
    assert all(layers[n]["type"] == "Linear" and layers[n]["weight_bits"] == 8 for n in CONV1D), layers
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 4  # q·kᵀ and weights·v of both blocks
    qatkit.calibrate(qat, [ids])
    scale = model(ids).abs().max().item()
    integer = converts_exactly(qat, model, ids, 0.05 * scale)
    converts_exactly(qat, model, ids[:4, :7], 0.05 * scale)  # another length: the mask buffer's slice is symbolic
    runs_in_onnx_runtime(integer, ids, tmp_path / "gpt2.onnx")
    runs_in_onnx_runtime(integer, ids[:, :5], tmp_path / "gpt2_short.onnx")


def test_conv1d_becomes_the_linear_layer_it_is():
    torch.manual_seed(0)
    conv = Conv1D(6, 4).double()
    with torch.no_grad():
        conv.bias.normal_()
    linear = decompose(conv)
    assert type(linear) is nn.Linear and linear.weight.shape == (6, 4)
    for shape in [(5, 4), (2, 3, 4), (4,)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(linear(x), conv(x), rtol=1e-12, atol=1e-12)


class ScaledAddmm(Conv1D):
    def forward(self, x):  # beta = 0.5: not a linear layer's bias
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight, beta=0.5).view(x.size()[:-1] + (self.nf,))


class FlatOut(Conv1D):
    def forward(self, x):  # the same addmm, its result flattened
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(-1)


class Squared(Conv1D):
    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).pow(2).view(x.size()[:-1] + (self.nf,))


@pytest.mark.parametrize("cls", [ScaledAddmm, FlatOut, Squared])
def test_modules_that_only_look_like_conv1d_are_kept(cls):
    module = cls(6, 4)
    assert decompose(module) is module


def test_qat_trains_gpt2_and_the_integer_model_computes_what_it_learned():
    """W4A8 QAT of the tied-embedding GPT-2 on a next-token rule (id + 1 mod V): it learns, and the converted model
    predicts as the QAT model does, bit for bit."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(layers=1).eval()
    seq = (torch.arange(13)[None, :] + torch.randint(0, VOCAB, (64, 1))) % VOCAB
    x, y = seq[:, :-1], seq[:, 1:]
    qat = prepares_whole(model, x[:2], qatkit.QATConfig(weight_bits=4, act_bits=8))
    learns_next_token(qat, VOCAB, x, y, lr=1e-2)
