"""Hugging Face's T5 encoder as transformers writes it (modeling_t5.py): relative position buckets computed from
positions (torch.abs, torch.log, .to(torch.long), torch.min with torch.full_like, torch.where of integers) and looked
up in an nn.Embedding, the bias shared by later blocks through a `position_bias=None` argument, T5's RMS layer norm,
`attention_mask=None` filled by torch.ones, `torch.finfo(dtype).min`, `softmax(scores.float()).type_as(scores)`.
QAT eval = integer model (bit for bit) = ONNX Runtime (within one step), at two lengths."""
from __future__ import annotations

import math

import numpy as np
import torch
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.export import export_onnx, ort
from qatkit.export.integer_reference import IntegerReference

V, D, H, DKV, DFF, N = 50, 32, 4, 8, 64, 2
NUM_BUCKETS, MAX_DIST = 8, 16

class T5LayerNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size)); self.variance_epsilon = eps
    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states

class T5DenseActDense(nn.Module):
    def __init__(self):
        super().__init__()
        self.wi = nn.Linear(D, DFF, bias=False); self.wo = nn.Linear(DFF, D, bias=False)
        self.dropout = nn.Dropout(0.1); self.act = nn.ReLU()
    def forward(self, hidden_states):
        hidden_states = self.wi(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.dropout(hidden_states)
        if (isinstance(self.wo.weight, torch.Tensor) and hidden_states.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8):
            hidden_states = hidden_states.to(self.wo.weight.dtype)
        return self.wo(hidden_states)

class T5LayerFF(nn.Module):
    def __init__(self):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(); self.layer_norm = T5LayerNorm(D); self.dropout = nn.Dropout(0.1)
    def forward(self, hidden_states):
        forwarded_states = self.layer_norm(hidden_states)
        forwarded_states = self.DenseReluDense(forwarded_states)
        return hidden_states + self.dropout(forwarded_states)

class T5Attention(nn.Module):
    def __init__(self, has_relative_attention_bias=False):
        super().__init__()
        self.has_relative_attention_bias = has_relative_attention_bias
        self.relative_attention_num_buckets = NUM_BUCKETS; self.relative_attention_max_distance = MAX_DIST
        self.n_heads, self.key_value_proj_dim, self.inner_dim = H, DKV, H * DKV
        self.q = nn.Linear(D, self.inner_dim, bias=False); self.k = nn.Linear(D, self.inner_dim, bias=False)
        self.v = nn.Linear(D, self.inner_dim, bias=False); self.o = nn.Linear(self.inner_dim, D, bias=False)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.relative_attention_num_buckets, self.n_heads)
        self.dropout = 0.1

    @staticmethod
    def _relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
        relative_buckets = 0
        if bidirectional:
            num_buckets //= 2
            relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
            relative_position = torch.abs(relative_position)
        else:
            relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        relative_position_if_large = max_exact + (
            torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).to(torch.long)
        relative_position_if_large = torch.min(relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
        relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
        return relative_buckets

    def compute_bias(self, query_length, key_length, device=None):
        if device is None:
            device = self.relative_attention_bias.weight.device
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position
        relative_position_bucket = self._relative_position_bucket(relative_position, bidirectional=True,
            num_buckets=self.relative_attention_num_buckets, max_distance=self.relative_attention_max_distance)
        values = self.relative_attention_bias(relative_position_bucket)
        values = values.permute([2, 0, 1]).unsqueeze(0)
        return values

    def forward(self, hidden_states, mask=None, position_bias=None):
        batch_size, seq_length = hidden_states.shape[:2]
        real_seq_length = seq_length
        key_length = real_seq_length
        def shape(states):
            return states.view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
        def unshape(states):
            return states.transpose(1, 2).contiguous().view(batch_size, -1, self.inner_dim)
        query_states = shape(self.q(hidden_states))
        key_states = shape(self.k(hidden_states))
        value_states = shape(self.v(hidden_states))
        scores = torch.matmul(query_states, key_states.transpose(3, 2))
        if position_bias is None:
            position_bias = self.compute_bias(real_seq_length, key_length, device=scores.device)
            if mask is not None:
                position_bias = position_bias + mask
        scores += position_bias
        attn_weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        attn_weights = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = unshape(torch.matmul(attn_weights, value_states))
        attn_output = self.o(attn_output)
        return attn_output, position_bias

class T5LayerSelfAttention(nn.Module):
    def __init__(self, has_relative_attention_bias=False):
        super().__init__()
        self.SelfAttention = T5Attention(has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(D); self.dropout = nn.Dropout(0.1)
    def forward(self, hidden_states, attention_mask=None, position_bias=None):
        normed_hidden_states = self.layer_norm(hidden_states)
        attention_output = self.SelfAttention(normed_hidden_states, mask=attention_mask, position_bias=position_bias)
        hidden_states = hidden_states + self.dropout(attention_output[0])
        return (hidden_states,) + attention_output[1:]

class T5Block(nn.Module):
    def __init__(self, has_relative_attention_bias=False):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(has_relative_attention_bias), T5LayerFF()])
    def forward(self, hidden_states, attention_mask=None, position_bias=None):
        self_attention_outputs = self.layer[0](hidden_states, attention_mask=attention_mask, position_bias=position_bias)
        hidden_states = self_attention_outputs[0]
        hidden_states = self.layer[-1](hidden_states)
        return (hidden_states,) + self_attention_outputs[1:]

class T5Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D)
        self.block = nn.ModuleList([T5Block(has_relative_attention_bias=bool(i == 0)) for i in range(N)])
        self.final_layer_norm = T5LayerNorm(D); self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(D, 3)
    def forward(self, input_ids, attention_mask=None):
        input_shape = input_ids.size()
        input_ids = input_ids.view(-1, input_shape[-1])
        inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_length = input_shape
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_length, device=inputs_embeds.device)
        extended_attention_mask = attention_mask[:, None, None, :]
        extended_attention_mask = extended_attention_mask.to(dtype=inputs_embeds.dtype)
        extended_attention_mask = (1.0 - extended_attention_mask) * torch.finfo(inputs_embeds.dtype).min
        position_bias = None
        hidden_states = self.dropout(inputs_embeds)
        for layer_module in self.block:
            layer_outputs = layer_module(hidden_states, attention_mask=extended_attention_mask, position_bias=position_bias)
            hidden_states = layer_outputs[0]
            position_bias = layer_outputs[1]
        hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.head(hidden_states.mean(1))


def test_t5_encoder_as_transformers_writes_it_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = T5Encoder().eval()
    ids = torch.randint(0, V, (16, 12))
    qat = prepares_whole(model, ids[:2])
    assert [n.name for n in qat.graph.nodes if n.op == "placeholder"] == ["input_ids"]  # attention_mask: its default
    layers = {row["name"] for row in qat.qat_info.layers}
    assert {f"block.{i}.layer.0.SelfAttention.{p}" for i in range(N) for p in "qkvo"} <= layers
    assert "block.0.layer.0.SelfAttention.relative_attention_bias" in layers  # the bucket table, quantized per row
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 2 * N
    qatkit.calibrate(qat, [ids])
    scale = model(ids).abs().max().item()
    integer = converts_exactly(qat, model, ids, 0.05 * scale)
    converts_exactly(qat, model, ids[:4, :7], 0.05 * scale)  # another length: the buckets follow it
    runs_in_onnx_runtime(integer, ids, tmp_path / "t5.onnx")
    runs_in_onnx_runtime(integer, ids[:, :5], tmp_path / "t5_short.onnx")


def test_relative_position_buckets_are_integers_in_the_integer_model_and_in_onnx(tmp_path):
    """The buckets, computed from positions in the integer model and in ONNX, are T5's (int64, PyTorch's values)."""
    attention = T5Attention(has_relative_attention_bias=True).eval()

    class Buckets(nn.Module):
        def forward(self, x):  # (B, T, D): the (T, T) buckets of its length
            t = x.size(1)
            relative = torch.arange(t)[None, :] - torch.arange(t)[:, None]
            return attention._relative_position_bucket(relative, num_buckets=NUM_BUCKETS, max_distance=MAX_DIST)

    x = torch.randn(2, 30, D)
    expected = Buckets()(x)
    assert expected.dtype == torch.long and expected.max() == NUM_BUCKETS - 1  # every bucket reached, the last clamped
    qat = qatkit.prepare(Buckets(), qatkit.QATConfig(), x[:1])
    integer = qatkit.convert(qat)
    assert torch.equal(integer(x), expected) and integer(x).dtype == torch.long
    export_onnx(integer, tmp_path / "buckets.onnx", x[:1])
    assert np.array_equal(ort.run(ort.session(tmp_path / "buckets.onnx", threads=1), x), expected.numpy())
    assert np.array_equal(IntegerReference(tmp_path / "buckets.onnx").run(x.numpy()), expected.numpy())


def test_a_model_of_two_inputs_trains_converts_and_runs_in_onnx_runtime(tmp_path):
    """T5 with its attention_mask: batches ((input_ids, attention_mask), labels) through calibrate, fit and evaluate;
    the integer model and ONNX Runtime take both inputs. The task (is token 1 among the unpadded tokens?) needs the
    mask: padding is filled with token 1."""
    torch.manual_seed(0)
    n, length = 256, 10
    ids = torch.randint(2, V, (n, length))
    lengths = torch.randint(3, length + 1, (n,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    labels = torch.randint(0, 2, (n,))
    rows = torch.nonzero(labels).flatten()
    ids[rows, (torch.rand(len(rows)) * lengths[rows]).long()] = 1  # a 1 among the tokens that count
    ids[mask == 0] = 1  # and 1s in the padding, for every sample
    batches = [((ids[i:i + 32], mask[i:i + 32]), labels[i:i + 32]) for i in range(0, n, 32)]
    model = T5Encoder().eval()
    qat = prepares_whole(model, (ids[:2], mask[:2]))
    assert [n.name for n in qat.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    assert qatkit.calibrate(qat, batches, num_batches=2) == 2
    qatkit.fit(qat, batches, qatkit.TrainConfig(epochs=12, lr=3e-3, progress=False), teacher=model)
    result = qatkit.evaluate(qat, batches)
    assert result["accuracy"] > 0.9, result
    unmasked = qatkit.evaluate(qat, [((i, torch.ones_like(m)), y) for (i, m), y in batches])
    assert unmasked["accuracy"] < 0.8, unmasked  # the mask was used
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        assert torch.equal(integer(ids, mask), qat(ids, mask))
    runs_in_onnx_runtime(integer, (ids, mask), tmp_path / "t5_mask.onnx")
