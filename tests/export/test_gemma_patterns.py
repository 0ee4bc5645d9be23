"""Hugging Face's Gemma decoder as transformers writes it (modeling_gemma.py, eager attention): the causal mask built
from `torch.full((T, T), fill_value=torch.finfo(dtype).min)`, `torch.triu` and `*=` a position comparison, rotary
cos/sin computed from position ids by a matmul, Gemma's RMSNorm in float with (1 + weight), GELU (tanh) gating, the
embeddings scaled by `torch.tensor(√d, dtype=x.dtype)`, grouped-query attention by repeat_kv; and Phi's partial
rotary (the first half of each head rotated). QAT eval = integer model (bit for bit) = ONNX Runtime, two lengths."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit

V, D, H, KV, HD, L, N = 48, 32, 4, 2, 8, 32, 2

class GemmaRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__(); self.eps = eps; self.weight = nn.Parameter(torch.zeros(dim))
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)

class GemmaRotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos(); sin = emb.sin()
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]; x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)

def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim); sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)

def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)

class GemmaAttention(nn.Module):
    def __init__(self, partial):
        super().__init__()
        self.partial = partial
        self.q_proj = nn.Linear(D, H * HD, bias=False); self.k_proj = nn.Linear(D, KV * HD, bias=False)
        self.v_proj = nn.Linear(D, KV * HD, bias=False); self.o_proj = nn.Linear(H * HD, D, bias=False)
        self.rotary_ndims = HD // 2 if partial else HD
        self.rotary_emb = GemmaRotaryEmbedding(self.rotary_ndims)
    def forward(self, hidden_states, attention_mask, position_ids):
        bsz, q_len, _ = hidden_states.size()
        q = self.q_proj(hidden_states).view(bsz, q_len, H, HD).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, KV, HD).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, KV, HD).transpose(1, 2)
        cos, sin = self.rotary_emb(v, position_ids)
        if self.partial:  # Phi: rotary on the first rotary_ndims of each head
            q_rot, q_pass = q[..., : self.rotary_ndims], q[..., self.rotary_ndims :]
            k_rot, k_pass = k[..., : self.rotary_ndims], k[..., self.rotary_ndims :]
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
            q = torch.cat((q_rot, q_pass), dim=-1); k = torch.cat((k_rot, k_pass), dim=-1)
        else:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, H // KV); v = repeat_kv(v, H // KV)
        attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HD)
        causal_mask = attention_mask[:, :, :, : k.shape[-2]]
        attn_weights = attn_weights + causal_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_output = torch.matmul(attn_weights, v)
        attn_output = attn_output.transpose(1, 2).contiguous().view(bsz, q_len, -1)
        return self.o_proj(attn_output)

class GemmaMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, 2 * D, bias=False); self.up_proj = nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)
    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))

class GemmaDecoderLayer(nn.Module):
    def __init__(self, partial):
        super().__init__()
        self.self_attn = GemmaAttention(partial); self.mlp = GemmaMLP()
        self.input_layernorm = GemmaRMSNorm(D); self.post_attention_layernorm = GemmaRMSNorm(D)
    def forward(self, hidden_states, attention_mask, position_ids):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_ids)
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))

class GemmaForCausalLM(nn.Module):
    def __init__(self, partial=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D)
        self.layers = nn.ModuleList([GemmaDecoderLayer(partial) for _ in range(N)])
        self.norm = GemmaRMSNorm(D); self.lm_head = nn.Linear(D, V, bias=False)
    def forward(self, input_ids):
        inputs_embeds = self.embed_tokens(input_ids)
        past_seen_tokens = 0
        cache_position = torch.arange(past_seen_tokens, past_seen_tokens + inputs_embeds.shape[1], device=inputs_embeds.device)
        position_ids = cache_position.unsqueeze(0)
        dtype = inputs_embeds.dtype
        min_dtype = torch.finfo(dtype).min
        sequence_length = inputs_embeds.shape[1]
        target_length = sequence_length
        causal_mask = torch.full((sequence_length, target_length), fill_value=min_dtype, dtype=dtype, device=inputs_embeds.device)
        if sequence_length != 1:
            causal_mask = torch.triu(causal_mask, diagonal=1)
        causal_mask *= torch.arange(target_length, device=inputs_embeds.device) > cache_position.reshape(-1, 1)
        causal_mask = causal_mask[None, None, :, :].expand(inputs_embeds.shape[0], 1, -1, -1)
        hidden_states = inputs_embeds
        normalizer = torch.tensor(D**0.5, dtype=hidden_states.dtype)
        hidden_states = hidden_states * normalizer
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(hidden_states, causal_mask, position_ids)
        return self.lm_head(self.norm(hidden_states))


@pytest.mark.parametrize("partial", [False, True], ids=["gemma", "phi-partial-rotary"])
def test_gemma_as_transformers_writes_it_converts_and_runs_in_onnx_runtime(partial, tmp_path):
    torch.manual_seed(0)
    model = GemmaForCausalLM(partial).eval()
    ids = torch.randint(0, V, (16, 12))
    qat = prepares_whole(model, ids[:2])
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 2 * N
    qatkit.calibrate(qat, [ids])
    scale = model(ids).abs().max().item()
    integer = converts_exactly(qat, model, ids, 0.05 * scale)
    converts_exactly(qat, model, ids[:4, :7], 0.05 * scale)  # another length: mask and rotary follow it
    runs_in_onnx_runtime(integer, ids, tmp_path / "gemma.onnx")
    runs_in_onnx_runtime(integer, ids[:, :5], tmp_path / "gemma_short.onnx")
