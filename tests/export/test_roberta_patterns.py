"""Hugging Face's RoBERTa embeddings as transformers writes them (modeling_roberta.py): position ids from the ids,
`input_ids.ne(padding_idx).int()`, `torch.cumsum(mask, dim=1).type_as(mask)`, `.long()`, token types from a buffer
sliced and expanded, `embeddings += …`. QAT eval = integer model (bit for bit) = ONNX Runtime, two lengths."""
from __future__ import annotations

import torch
from conftest import converts_exactly, runs_in_onnx_runtime
from torch import fx, nn

import qatkit

V, D, L, PAD = 40, 32, 30, 1

def create_position_ids_from_input_ids(input_ids, padding_idx, past_key_values_length=0):
    mask = input_ids.ne(padding_idx).int()
    incremental_indices = (torch.cumsum(mask, dim=1).type_as(mask) + past_key_values_length) * mask
    return incremental_indices.long() + padding_idx

class RobertaEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(V, D, padding_idx=PAD)
        self.position_embeddings = nn.Embedding(L, D, padding_idx=PAD)
        self.token_type_embeddings = nn.Embedding(2, D)
        self.LayerNorm = nn.LayerNorm(D, eps=1e-12); self.dropout = nn.Dropout(0.1)
        self.register_buffer("token_type_ids", torch.zeros((1, L), dtype=torch.long), persistent=False)
        self.padding_idx = PAD
    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, past_key_values_length=0):
        if position_ids is None:
            position_ids = create_position_ids_from_input_ids(input_ids, self.padding_idx, past_key_values_length)
        input_shape = input_ids.size()
        seq_length = input_shape[1]
        if token_type_ids is None:
            if hasattr(self, "token_type_ids"):
                buffered_token_type_ids = self.token_type_ids[:, :seq_length]
                buffered_token_type_ids_expanded = buffered_token_type_ids.expand(input_shape[0], seq_length)
                token_type_ids = buffered_token_type_ids_expanded
            else:
                token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=self.position_ids.device)
        inputs_embeds = self.word_embeddings(input_ids)
        token_type_embeddings = self.token_type_embeddings(token_type_ids)
        embeddings = inputs_embeds + token_type_embeddings
        embeddings += self.position_embeddings(position_ids)
        embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = RobertaEmbeddings(); self.dense = nn.Linear(D, D); self.out = nn.Linear(D, 3)
    def forward(self, input_ids):
        h = self.embeddings(input_ids)
        return self.out(torch.tanh(self.dense(h[:, 0])))


def test_roberta_position_ids_from_the_ids_convert_and_run_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = Model().eval()
    ids = torch.randint(2, V, (16, 12))
    ids[:, 9:] = PAD  # padding keeps position padding_idx
    qat = qatkit.prepare(model, qatkit.QATConfig(), ids[:2])
    assert isinstance(qat, fx.GraphModule) and not qat.qat_info.untraced
    qatkit.calibrate(qat, [ids])
    integer = converts_exactly(qat, model, ids, 0.1)
    converts_exactly(qat, model, ids[:4, :7], 0.1)
    runs_in_onnx_runtime(integer, ids, tmp_path / "roberta.onnx")
