"""A Llama-style decoder as people write it (RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU),
in the variants found in the wild: QAT eval = integer model (bit for bit) = ONNX Runtime (within one step), and the
integer-only reference = ONNX Runtime."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, learns_next_token, runs_in_onnx_runtime
from torch import nn

import qatkit

VOCAB, DIM, HEADS, KV_HEADS, MAX_LEN = 48, 32, 4, 2, 32


class RMSNorm(nn.Module):
    """Llama's own (x · rsqrt(mean(x²) + eps) · weight)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """cos/sin of position × frequency: precomputed buffers sliced to the length (buffer), or computed in forward
    from the positions as Hugging Face's LlamaRotaryEmbedding does (computed)."""

    def __init__(self, head_dim: int, computed: bool):
        super().__init__()
        self.computed = computed
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)
        angles = torch.outer(torch.arange(MAX_LEN).float(), inv_freq)
        self.register_buffer("cos_cached", torch.cat((angles, angles), -1).cos())
        self.register_buffer("sin_cached", torch.cat((angles, angles), -1).sin())

    def forward(self, x):
        T = x.shape[-2]
        if not self.computed:
            return self.cos_cached[:T], self.sin_cached[:T]
        positions = torch.arange(T, device=x.device).float()
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, kv: str, rope: str):
        super().__init__()
        self.kv, self.head_dim = kv, DIM // HEADS
        self.q_proj = nn.Linear(DIM, DIM, bias=False)
        self.k_proj = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * self.head_dim, bias=False)
        self.o_proj = nn.Linear(DIM, DIM, bias=False)
        self.rotary = Rotary(self.head_dim, computed=rope == "computed")

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, HEADS, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, KV_HEADS, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, KV_HEADS, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(q)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.kv == "sdpa-gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.kv == "repeat_interleave":
                k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
            else:  # Hugging Face's repeat_kv
                n_rep = HEADS // KV_HEADS
                k, v = (t[:, :, None, :, :].expand(B, KV_HEADS, n_rep, T, self.head_dim).reshape(B, HEADS, T, self.head_dim)
                        for t in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):  # SwiGLU
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(DIM, 2 * DIM, bias=False), nn.Linear(DIM, 2 * DIM, bias=False)
        self.down_proj = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(kind: str) -> nn.Module:
    return nn.RMSNorm(DIM, eps=1e-6) if kind == "module" else RMSNorm(DIM)


class Decoder(nn.Module):
    def __init__(self, norm: str, kv: str, rope: str):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(attn_norm=_norm(norm), attn=Attention(kv, rope),
                                                       mlp_norm=_norm(norm), mlp=MLP())) for _ in range(2))
        self.norm, self.lm_head = _norm(norm), nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer["attn"](layer["attn_norm"](x))
            x = x + layer["mlp"](layer["mlp_norm"](x))
        return self.lm_head(self.norm(x))


VARIANTS = [("manual", "repeat_interleave", "buffer"), ("manual", "sdpa-gqa", "computed"),
            ("module", "repeat_kv", "computed"), ("manual", "repeat_kv", "buffer")]


@pytest.mark.parametrize("norm, kv, rope", VARIANTS)
def test_llama_style_decoder_converts_and_runs_in_onnx_runtime(norm, kv, rope, tmp_path):
    if norm == "module" and not hasattr(nn, "RMSNorm"):
        pytest.skip("nn.RMSNorm needs torch >= 2.4")
    torch.manual_seed(0)
    model = Decoder(norm, kv, rope).eval()
    ids = torch.randint(0, VOCAB, (16, 12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    unwanted = ("will refuse", "train()", "could not")  # convert refusals, training-only code, a concrete trace
    assert not [str(w.message) for w in caught if any(s in str(w.message) for s in unwanted)]
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 4  # q·kᵀ and weights·v of both layers
    qatkit.calibrate(qat, [ids])
    integer = converts_exactly(qat, model, ids, 0.15)
    assert integer(ids).shape == (16, 12, VOCAB)
    converts_exactly(qat, model, ids[:4, :7], 0.15)  # another length: fx traced the rotary cache's slice symbolically
    runs_in_onnx_runtime(integer, ids, tmp_path / "decoder.onnx")  # top-1 of each of the (16, 12) positions


def test_rms_norm_and_rotary_ops_match_float64_in_the_integer_model():
    """The float ops a Llama block adds (pow, mean, rsqrt, sin/cos, repeat_interleave, a slice bounded by a size)
    run in the integer model as in PyTorch: an unquantized model converts to the same function (float64 check)."""
    torch.manual_seed(1)
    model = Decoder("manual", "repeat_interleave", "computed").double().eval()
    ids = torch.randint(0, VOCAB, (3, 9))
    config = qatkit.QATConfig(matmul_bits=None, rules=(qatkit.LayerRule(pattern="*", skip=True),))  # nothing quantized
    qat = qatkit.prepare(model, config, ids)
    assert not any(type(m).__name__.startswith("Q") for m in qat.modules())
    with torch.no_grad():
        torch.testing.assert_close(qatkit.convert(qat.eval())(ids), model(ids), rtol=1e-12, atol=1e-12)


def test_qat_trains_the_decoder_and_the_integer_model_computes_what_it_learned():
    """W4A8 QAT of the decoder (GQA by enable_gqa, computed rotary) on a next-token rule (id + 1 mod V): it learns,
    and the converted model predicts as the QAT model does, bit for bit."""
    torch.manual_seed(0)
    model = Decoder("manual", "sdpa-gqa", "computed").eval()
    seq = (torch.arange(13)[None, :] + torch.randint(0, VOCAB, (64, 1))) % VOCAB
    x, y = seq[:, :-1], seq[:, 1:]
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=8), x[:2])
    learns_next_token(qat, VOCAB, x, y, lr=3e-3)


class RepeatHeads(nn.Module):
    """Two key/value heads, each serving three query heads (repeats 3 ≠ 2 heads: ONNX's Expand must not broadcast
    the heads against the repeats)."""

    def __init__(self):
        super().__init__()
        self.kv, self.out = nn.Linear(8, 8), nn.Linear(24, 5)

    def forward(self, x):
        b, t, _ = x.shape
        heads = self.kv(x).view(b, t, 2, 4).transpose(1, 2).repeat_interleave(3, dim=1)  # (B, 6, T, 4)
        return self.out(heads.transpose(1, 2).reshape(b, t, 24))


def test_repeat_interleave_of_more_repeats_than_heads_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = RepeatHeads().eval()
    x = torch.randn(16, 5, 8)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    qatkit.calibrate(qat, [x])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.1), x, tmp_path / "heads.onnx")
