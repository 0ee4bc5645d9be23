"""Hugging Face's BART decoder as transformers writes it (modeling_bart.py, eager attention): self- and
cross-attention by `torch.bmm` over (batch·heads, length, head) views, a causal mask made by `torch.full` and the
in-place `mask.masked_fill_(...)`, learned positions offset by 2 (an nn.Embedding subclass), two inputs (the
decoder's ids and the encoder's states, of another length). QAT eval = integer model (bit for bit) = ONNX Runtime."""
from __future__ import annotations

import operator

import pytest
import torch
from conftest import prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit

V, D, H, N, FF, L = 40, 32, 4, 2, 64, 24

class BartLearnedPositionalEmbedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim):
        self.offset = 2
        super().__init__(num_embeddings + self.offset, embedding_dim)
    def forward(self, input_ids, past_key_values_length=0):
        bsz, seq_len = input_ids.shape[:2]
        positions = torch.arange(past_key_values_length, past_key_values_length + seq_len, dtype=torch.long, device=self.weight.device).expand(bsz, -1)
        return super().forward(positions + self.offset)

class BartAttention(nn.Module):
    def __init__(self, is_decoder=False):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = D, H, D // H
        self.scaling = self.head_dim ** -0.5; self.is_decoder = is_decoder; self.dropout = 0.0
        self.k_proj = nn.Linear(D, D); self.v_proj = nn.Linear(D, D); self.q_proj = nn.Linear(D, D); self.out_proj = nn.Linear(D, D)
    def _shape(self, tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()
    def forward(self, hidden_states, key_value_states=None, attention_mask=None):
        is_cross_attention = key_value_states is not None
        bsz, tgt_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states) * self.scaling
        if is_cross_attention:
            key_states = self._shape(self.k_proj(key_value_states), -1, bsz)
            value_states = self._shape(self.v_proj(key_value_states), -1, bsz)
        else:
            key_states = self._shape(self.k_proj(hidden_states), -1, bsz)
            value_states = self._shape(self.v_proj(hidden_states), -1, bsz)
        proj_shape = (bsz * self.num_heads, -1, self.head_dim)
        query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)
        key_states = key_states.reshape(*proj_shape)
        value_states = value_states.reshape(*proj_shape)
        src_len = key_states.size(1)
        attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
        if attention_mask is not None:
            attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
            attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_probs = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = torch.bmm(attn_probs, value_states)
        attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim)
        attn_output = attn_output.transpose(1, 2)
        attn_output = attn_output.reshape(bsz, tgt_len, self.embed_dim)
        return self.out_proj(attn_output)

class BartDecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = BartAttention(is_decoder=True); self.self_attn_layer_norm = nn.LayerNorm(D)
        self.encoder_attn = BartAttention(is_decoder=True); self.encoder_attn_layer_norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, FF); self.fc2 = nn.Linear(FF, D); self.final_layer_norm = nn.LayerNorm(D)
        self.activation_fn = nn.GELU(); self.dropout = 0.0
    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None):
        residual = hidden_states
        hidden_states = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = residual + hidden_states
        hidden_states = self.self_attn_layer_norm(hidden_states)
        if encoder_hidden_states is not None:
            residual = hidden_states
            hidden_states = self.encoder_attn(hidden_states, key_value_states=encoder_hidden_states)
            hidden_states = residual + hidden_states
            hidden_states = self.encoder_attn_layer_norm(hidden_states)
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = self.fc2(hidden_states)
        hidden_states = residual + hidden_states
        return self.final_layer_norm(hidden_states)

def _make_causal_mask(input_ids_shape, dtype, device):
    bsz, tgt_len = input_ids_shape
    mask = torch.full((tgt_len, tgt_len), torch.finfo(dtype).min, device=device)
    mask_cond = torch.arange(mask.size(-1), device=device)
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    mask = mask.to(dtype)
    return mask[None, None, :, :].expand(bsz, 1, tgt_len, tgt_len)

class BartDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D, 1); self.embed_positions = BartLearnedPositionalEmbedding(L, D)
        self.layers = nn.ModuleList([BartDecoderLayer() for _ in range(N)]); self.layernorm_embedding = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
    def forward(self, input_ids, encoder_hidden_states):
        input_shape = input_ids.size()
        inputs_embeds = self.embed_tokens(input_ids)
        attention_mask = _make_causal_mask(input_shape, inputs_embeds.dtype, inputs_embeds.device)
        positions = self.embed_positions(input_ids)
        hidden_states = self.layernorm_embedding(inputs_embeds + positions)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(hidden_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states)
        return self.lm_head(hidden_states)


def test_bart_decoder_as_transformers_writes_it_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = BartDecoder().eval()
    ids, encoded = torch.randint(2, V, (16, 9)), torch.randn(16, 11, D)
    qat = prepares_whole(model, (ids[:2], encoded[:2]))
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 4 * N  # bmm: self- and cross-attention
    # the learned positions' table too (an nn.Embedding subclass whose forward computes the positions)
    assert {"embed_tokens", "embed_positions"} <= {r["name"] for r in qat.qat_info.layers}
    qatkit.calibrate(qat, [((ids, encoded),)])
    integer = qatkit.convert(qat)
    with torch.no_grad():
        expected = qat.eval()(ids, encoded)
        assert (expected - model(ids, encoded)).abs().max() < 0.05 * model(ids, encoded).abs().max()
        assert torch.equal(integer(ids, encoded), expected)
        short = ids[:4, :5], encoded[:4, :7]  # other lengths: the mask follows the decoder's
        assert torch.equal(integer(*short), qat(*short))
    runs_in_onnx_runtime(integer, (ids, encoded), tmp_path / "bart.onnx")


class InPlace(nn.Module):
    """In-place ops on a tensor made in forward (functional in the graph), and on a view of a layer's output (left as
    written: the layer's output changes through it)."""

    def __init__(self, on_view: bool):
        super().__init__()
        self.fc, self.on_view = nn.Linear(4, 4), on_view

    def forward(self, x):
        h = self.fc(x)
        if self.on_view:
            h[:, :2].mul_(2.0)
        bias = torch.zeros(x.shape[0], 4)
        bias.add_(1.0)
        bias.masked_fill_(x > 0, -1.0)
        return h + bias


@pytest.mark.parametrize("on_view", [False, True])
def test_in_place_ops_on_tensors_made_in_forward_become_functional(on_view):
    model = InPlace(on_view).eval()
    qat = qatkit.prepare(model, qatkit.QATConfig(), torch.randn(2, 4))
    methods = [n.target for n in qat.graph.nodes if n.op == "call_method"]
    adds = [n for n in qat.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 2  # bias.add_(1.0) as bias + 1.0 (prepare spells x.add(y) as x + y), and h + bias
    assert "masked_fill" in methods and "add_" not in methods and "masked_fill_" not in methods
    assert ("mul_" in methods) == on_view
    x = torch.randn(8, 4)
    qatkit.calibrate(qat, [x])
    with torch.no_grad():
        assert (qat.eval()(x) - model(x)).abs().max() < 0.05
        if not on_view:
            assert torch.equal(qatkit.convert(qat)(x), qat(x))
