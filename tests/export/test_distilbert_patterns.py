"""Hugging Face's DistilBERT as transformers writes it (modeling_distilbert.py, eager attention): the mask as
`(mask == 0).view(...).expand_as(scores)`, `masked_fill(mask, torch.tensor(torch.finfo(dtype).min))`,
`attention_mask=None` filled by `torch.ones(input_ids.size())`, position ids from a buffer sliced by the length,
`nn.ReLU()(x)` made inside forward; with its blocks separate, or one block shared by every layer (ALBERT's sharing);
called with input_ids alone or with the attention mask. QAT eval = integer model (bit for bit) = ONNX Runtime."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.inputs import call
from qatkit.prepare.modes import trace

V, D, H, L, N, HID = 50, 32, 4, 24, 2, 64

class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(V, D, padding_idx=0)
        self.position_embeddings = nn.Embedding(L, D)
        self.LayerNorm = nn.LayerNorm(D, eps=1e-12); self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(L).expand((1, -1)), persistent=False)
    def forward(self, input_ids, input_embeds=None):
        if input_ids is not None:
            input_embeds = self.word_embeddings(input_ids)
        seq_length = input_embeds.size(1)
        if hasattr(self, "position_ids"):
            position_ids = self.position_ids[:, :seq_length]
        else:
            position_ids = torch.arange(seq_length, dtype=torch.long, device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand_as(input_ids)
        position_embeddings = self.position_embeddings(position_ids)
        embeddings = input_embeds + position_embeddings
        embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)

class MultiHeadSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_heads, self.dim = H, D
        self.dropout = nn.Dropout(p=0.1)
        self.q_lin = nn.Linear(D, D); self.k_lin = nn.Linear(D, D); self.v_lin = nn.Linear(D, D); self.out_lin = nn.Linear(D, D)
        self.attention_head_size = self.dim // self.n_heads
    def forward(self, query, key, value, mask, head_mask=None, output_attentions=False):
        bs, q_length, dim = query.size()
        k_length = key.size(1)
        dim_per_head = self.dim // self.n_heads
        mask_reshp = (bs, 1, 1, k_length)
        def shape(x):
            return x.view(bs, -1, self.n_heads, dim_per_head).transpose(1, 2)
        def unshape(x):
            return x.transpose(1, 2).contiguous().view(bs, -1, self.n_heads * dim_per_head)
        q = shape(self.q_lin(query)); k = shape(self.k_lin(key)); v = shape(self.v_lin(value))
        q = q / math.sqrt(dim_per_head)
        scores = torch.matmul(q, k.transpose(2, 3))
        mask = (mask == 0).view(mask_reshp).expand_as(scores)
        scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
        weights = nn.functional.softmax(scores, dim=-1)
        weights = self.dropout(weights)
        if head_mask is not None:
            weights = weights * head_mask
        context = torch.matmul(weights, v)
        context = unshape(context)
        context = self.out_lin(context)
        if output_attentions:
            return (context, weights)
        return (context,)

class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(p=0.1); self.lin1 = nn.Linear(D, HID); self.lin2 = nn.Linear(HID, D)
        self.activation = nn.GELU()
    def forward(self, input):
        x = self.lin1(input); x = self.activation(x); x = self.lin2(x); return self.dropout(x)

class TransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = MultiHeadSelfAttention(); self.sa_layer_norm = nn.LayerNorm(D, eps=1e-12)
        self.ffn = FFN(); self.output_layer_norm = nn.LayerNorm(D, eps=1e-12)
    def forward(self, x, attn_mask=None, head_mask=None, output_attentions=False):
        sa_output = self.attention(query=x, key=x, value=x, mask=attn_mask, head_mask=head_mask, output_attentions=output_attentions)
        if output_attentions:
            sa_output, sa_weights = sa_output
        else:
            if type(sa_output) is not tuple:
                raise TypeError(f"sa_output must be a tuple but it is {type(sa_output)} type")
            sa_output = sa_output[0]
        sa_output = self.sa_layer_norm(sa_output + x)
        ffn_output = self.ffn(sa_output)
        ffn_output = self.output_layer_norm(ffn_output + sa_output)
        output = (ffn_output,)
        if output_attentions:
            output = (sa_weights,) + output
        return output

class DistilBertForSequenceClassification(nn.Module):
    def __init__(self, shared=False):
        super().__init__()
        self.embeddings = Embeddings()
        blk = TransformerBlock()
        self.layer = nn.ModuleList([blk if shared else TransformerBlock() for _ in range(N)])
        self.pre_classifier = nn.Linear(D, D); self.classifier = nn.Linear(D, 2); self.dropout = nn.Dropout(0.2)
    def forward(self, input_ids=None, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.size(), device=input_ids.device)
        hidden_state = self.embeddings(input_ids)
        for layer_module in self.layer:
            hidden_state = layer_module(hidden_state, attention_mask)[-1]
        pooled_output = hidden_state[:, 0]
        pooled_output = self.pre_classifier(pooled_output)
        pooled_output = nn.ReLU()(pooled_output)
        pooled_output = self.dropout(pooled_output)
        return self.classifier(pooled_output)


@pytest.mark.parametrize("shared", [False, True], ids=["blocks", "shared-block"])
@pytest.mark.parametrize("inputs", ["ids", "ids-and-mask", "by-name"])
def test_distilbert_as_transformers_writes_it_converts_and_runs_in_onnx_runtime(shared, inputs, tmp_path):
    """by-name: the inputs as a tokenizer returns them, {"input_ids": ..., "attention_mask": ...}."""
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(shared).eval()
    ids = torch.randint(1, V, (16, 12))
    mask = (torch.arange(12)[None, :] < torch.randint(4, 13, (16, 1))).long()
    ids[mask == 0] = 0

    def given(ids, mask):
        return {"ids": ids, "ids-and-mask": (ids, mask), "by-name": {"input_ids": ids, "attention_mask": mask}}[inputs]

    x = given(ids, mask)
    qat = prepares_whole(model, given(ids[:2], mask[:2]))
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 2 * N  # a shared block: each call its own
    qatkit.calibrate(qat, [(x,)])
    with torch.no_grad():
        expected = call(qat.eval(), x)
        assert (expected - call(model, x)).abs().max() < 0.05 * call(model, x).abs().max()
        integer = qatkit.convert(qat)
        assert torch.equal(call(integer, x), expected)
    runs_in_onnx_runtime(integer, x, tmp_path / "distilbert.onnx")


class InlineModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return nn.Hardtanh(-1.0, 1.0)(nn.ReLU()(self.fc(x)))


class InlineLayer(nn.Module):
    def forward(self, x):
        return nn.Linear(4, 4)(x)  # new weights at every call: no model of it can be traced


def test_a_parameter_free_module_made_in_forward_is_traced_through_and_a_layer_is_not():
    gm = trace(InlineModules())
    assert [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"] == ["relu", "hardtanh"]
    with pytest.raises(NameError, match="not installed as a submodule"):
        trace(InlineLayer())
