"""Attention as people write it: F.scaled_dot_product_attention (rewritten as the ops it computes, float64
reference), a nanoGPT model (both its flash and its explicit path) and timm's ViT: QAT eval = integer model = ONNX
Runtime."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.quantizer import FakeQuantizer


class SDPA(nn.Module):
    def __init__(self, causal: bool, scale: float | None, dropout: float, mask: str | None, gqa: bool = False):
        super().__init__()
        self.causal, self.scale, self.dropout, self.mask, self.gqa = causal, scale, dropout, mask, gqa

    def forward(self, q, k, v):
        mask = None
        if self.mask == "bool":  # each query sees the first keys up to its own row's length
            mask = torch.arange(k.size(-2))[None, :] <= torch.arange(q.size(-2))[:, None] % 3 + 1
        elif self.mask == "float":
            mask = torch.linspace(-1.0, 1.0, q.size(-2) * k.size(-2), dtype=q.dtype).reshape(q.size(-2), k.size(-2))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout, is_causal=self.causal,
                                              scale=self.scale, **({"enable_gqa": True} if self.gqa else {}))


@pytest.mark.parametrize("causal, scale, mask, gqa", [(False, None, None, False), (True, None, None, False),
                                                      (False, 0.3, "bool", False), (False, None, "float", False),
                                                      (True, None, None, True)])
def test_scaled_dot_product_attention_is_rewritten_as_the_ops_it_computes(causal, scale, mask, gqa):
    """gqa: grouped-query attention (enable_gqa, torch >= 2.5): 6 query heads share 2 key/value heads."""
    if gqa and "enable_gqa" not in F.scaled_dot_product_attention.__doc__:
        pytest.skip("enable_gqa needs torch >= 2.5")
    torch.manual_seed(0)
    q = torch.randn(2, 6 if gqa else 3, 5, 4, dtype=torch.float64)
    k, v = (torch.randn(2, 2 if gqa else 3, 5, 4, dtype=torch.float64) for _ in range(2))
    qat = qatkit.prepare(SDPA(causal, scale, 0.2, mask, gqa), qatkit.QATConfig(matmul_bits=None), (q, k, v))
    assert "F.scaled_dot_product_attention" not in qat.code and "matmul" in qat.code  # nothing quantized: float ops
    with torch.no_grad():
        want = SDPA(causal, scale, 0.0, mask, gqa)(q, k, v)
        torch.testing.assert_close(qat.eval()(q, k, v), want, rtol=1e-12, atol=1e-12)
        if mask != "float":  # made by torch.linspace, which has no integer-model form
            torch.testing.assert_close(qatkit.convert(qat)(q, k, v), want, rtol=1e-12, atol=1e-12)
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
    integer = converts_exactly(qat, model, idx, 0.1)
    assert integer(idx).shape == (32, 1, 40)  # the next token's logits
    runs_in_onnx_runtime(integer, idx, tmp_path / "gpt.onnx")


class TimmAttention(nn.Module):
    """timm's ViT attention: one qkv projection permuted to (3, B, heads, N, head_dim) and unbound along dim 0."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm, self.attn_drop = nn.Identity(), nn.Identity(), nn.Dropout(0.1)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ViT(nn.Module):
    """timm's VisionTransformer in small: conv patch embedding, class token, position embedding, pre-norm blocks
    with layer scale, the class token's features to the head."""

    def __init__(self, dim: int = 48, heads: int = 3, patch: int = 8, image: int = 32, classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(dim, eps=1e-6), attn=TimmAttention(dim, heads), norm2=nn.LayerNorm(dim, eps=1e-6),
            mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)))) for _ in range(2))
        self.gamma = nn.Parameter(0.1 * torch.ones(dim))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for b in self.blocks:
            x = x + self.gamma * b["attn"](b["norm1"](x))
            x = x + b["mlp"](b["norm2"](x))
        return self.head(self.norm(x)[:, 0])


def test_timm_vision_transformer_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = ViT().eval()
    x = torch.randn(16, 3, 32, 32)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 4  # q·kᵀ and weights·v of both blocks
    qatkit.calibrate(qat, [x])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.1), x, tmp_path / "vit.onnx")


class Einsum(nn.Module):
    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, a, b):
        return torch.einsum(self.equation, a, b)


EINSUMS = {  # equation: (shapes of a and b, whether it is a batched matrix product)
    "bhid,bhjd->bhij": (((2, 3, 4, 5), (2, 3, 6, 5)), True), "bhij,bhjd->bhid": (((2, 3, 4, 6), (2, 3, 6, 5)), True),
    "b i d, b j d -> b j i": (((2, 4, 5), (2, 6, 5)), True), "hbid,bhjd->bhji": (((3, 2, 4, 5), (2, 3, 6, 5)), True),
    "ik,kj->ij": (((4, 5), (5, 6)), True), "bi,bi->b": (((3, 4), (3, 4)), False),
    "bid,bjd->bijd": (((2, 4, 5), (2, 6, 5)), False)}


@pytest.mark.parametrize("equation", list(EINSUMS))
def test_einsum_of_two_tensors_becomes_a_matmul_where_it_is_one(equation):
    (shape_a, shape_b), is_matmul = EINSUMS[equation]
    torch.manual_seed(0)
    a, b = torch.randn(shape_a, dtype=torch.float64), torch.randn(shape_b, dtype=torch.float64)
    qat = qatkit.prepare(Einsum(equation), qatkit.QATConfig(matmul_bits=None), (a, b))
    assert ("einsum" in qat.code) != is_matmul and ("matmul" in qat.code) == is_matmul
    want = torch.einsum(equation, a, b)
    with torch.no_grad():
        torch.testing.assert_close(qat.eval()(a, b), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(qatkit.convert(qat)(a, b), want, rtol=1e-12, atol=1e-12)


class EinsumAttention(nn.Module):
    """Attention written with einsum, as in many research codebases: both products run on integers."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.to_qkv, self.to_out = heads, nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * (d // self.heads) ** -0.5
        out = torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(-1), v)
        return self.head(self.to_out(out.transpose(1, 2).reshape(b, n, d)).mean(1))


def test_einsum_attention_runs_its_products_on_integers(tmp_path):
    torch.manual_seed(0)
    model = EinsumAttention().eval()
    x = torch.randn(32, 6, 32)
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 2 and "einsum" not in qat.code
    qatkit.calibrate(qat, [x])
    runs_in_onnx_runtime(converts_exactly(qat, model, x, 0.1), x, tmp_path / "einsum.onnx")


class BertEmbeddings(nn.Module):
    """Hugging Face's: position and token type ids from buffers, sliced to the length and expanded to the batch."""

    def __init__(self, vocab=50, dim=32, max_len=16):
        super().__init__()
        self.word, self.position, self.token_type = nn.Embedding(vocab, dim, padding_idx=0), nn.Embedding(max_len, dim), nn.Embedding(2, dim)
        self.LayerNorm = nn.LayerNorm(dim)
        self.register_buffer("position_ids", torch.arange(max_len).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(self.position_ids.size(), dtype=torch.long), persistent=False)

    def forward(self, input_ids):
        seq_length = input_ids.size(1)
        token_type_ids = self.token_type_ids[:, :seq_length].expand(input_ids.shape[0], seq_length)
        embeddings = self.word(input_ids) + self.token_type(token_type_ids)
        return self.LayerNorm(embeddings + self.position(self.position_ids[:, :seq_length]))


class Bert(nn.Module):
    """A BERT classifier written as transformers' BertModel is: `(ids != 0).long()` mask, extended to
    (1 - mask) · finfo.min, heads by `x.size()[:-1] + (heads, head_dim)`, merged back by `view(size()[:-2] + (all,))`,
    a tanh pooler on the first token."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.embeddings, self.heads, self.head_dim = BertEmbeddings(dim=dim), heads, dim // heads
        self.query, self.key, self.value, self.output = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intermediate, self.out = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.pooler, self.classifier = nn.Linear(dim, dim), nn.Linear(dim, 2)

    def transpose_for_scores(self, x):
        return x.view(x.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, input_ids):
        attention_mask = (input_ids != 0).long()
        extended = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        x = self.embeddings(input_ids)
        q, k, v = (self.transpose_for_scores(layer(x)) for layer in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + extended
        context = torch.matmul(nn.functional.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        context = context.view(context.size()[:-2] + (self.heads * self.head_dim,))
        x = self.norm1(x + self.output(context))
        x = self.norm2(x + self.out(F.gelu(self.intermediate(x))))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def test_hugging_face_style_bert_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = Bert().eval()
    ids = torch.randint(1, 50, (16, 12))
    ids[:, 9:] = 0  # padding
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 2
    qatkit.calibrate(qat, [ids])
    integer = converts_exactly(qat, model, ids, 0.2)
    converts_exactly(qat, model, ids[:3, :7], 0.2)  # another batch and length
    runs_in_onnx_runtime(integer, ids, tmp_path / "bert.onnx")


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder, shrunk: two GELU conv1d over mel frames, a sinusoidal position buffer sliced to the
    length, pre-norm nn.MultiheadAttention (its scores go straight from the q·kᵀ matmul into softmax)."""

    def __init__(self, n_mels=8, dim=16, ctx=16):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(n_mels, dim, 3, padding=1), nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        inv = torch.exp(-math.log(10000) / (dim // 2 - 1) * torch.arange(dim // 2))
        t = torch.arange(ctx)[:, None] * inv[None, :]
        self.register_buffer("positional_embedding", torch.cat([torch.sin(t), torch.cos(t)], 1))
        self.attn_ln, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, 2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(dim, 4)

    def forward(self, mel):
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).permute(0, 2, 1)
        x = (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        h = self.attn_ln(x)
        return self.head((x + self.attn(h, h, h, need_weights=False)[0]).mean(1))


def test_a_softmax_of_integer_scores_gets_the_scale_at_which_onnx_runtime_is_exact(tmp_path):
    """ORT fuses DQ → Softmax → Q into QLinearSoftmax, which gives the float softmax's codes only at the output scale
    2^-8, zero point 0: prepare fixes that scale there (QuantSpec.unit_range); ORT then agrees exactly (it was two
    steps off at the output). A softmax of float scores (nanoGPT's, scaled after the matmul) keeps a learned scale."""
    torch.manual_seed(0)
    model, mel = WhisperEncoder().eval(), torch.randn(16, 8, 16)
    qat = qatkit.prepare(model, qatkit.QATConfig(), mel[:2])
    fixed = [m for m in qat.modules() if isinstance(m, FakeQuantizer) and m.spec.unit_range]
    assert len(fixed) == 1 and fixed[0].scale.item() == 2.0**-8
    qatkit.calibrate(qat, [mel])
    assert fixed[0].scale.item() == 2.0**-8
    result = runs_in_onnx_runtime(converts_exactly(qat, model, mel, 0.2), mel, tmp_path / "whisper.onnx")
    assert result["max_step_diff"] == 0
    gpt = qatkit.prepare(GPT(flash=False).eval(), qatkit.QATConfig(), torch.randint(0, 40, (2, 12)))
    assert not [m for m in gpt.modules() if isinstance(m, FakeQuantizer) and m.spec.unit_range]


class ClipTextEncoder(nn.Module):
    """CLIP's text tower, shrunk: learned positions, a causal mask buffer for nn.MultiheadAttention, and the
    features of each sequence's end-of-text token (the largest id) picked by x[torch.arange(B), text.argmax(-1)]."""

    def __init__(self, vocab=50, length=12, dim=16):
        super().__init__()
        self.token_embedding, self.positional_embedding = nn.Embedding(vocab, dim), nn.Parameter(0.1 * torch.randn(length, dim))
        self.ln_1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln_final, self.text_projection = nn.LayerNorm(dim), nn.Linear(dim, 8, bias=False)
        self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1), persistent=False)

    def forward(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=self.attn_mask, need_weights=False)[0]
        return self.text_projection(self.ln_final(x)[torch.arange(x.shape[0]), text.argmax(dim=-1)])


def test_clip_text_encoder_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model, text = ClipTextEncoder().eval(), torch.randint(0, 50, (16, 12))
    qat = qatkit.prepare(model, qatkit.QATConfig(), text[:2])
    assert not any("argmax" in op for op in qat.qat_info.float_ops)  # positions from the ids: integer ops
    qatkit.calibrate(qat, [text])
    integer = converts_exactly(qat, model, text, 0.2)
    runs_in_onnx_runtime(integer, text, tmp_path / "clip.onnx", top1=False)
