"""Hugging Face's ViT as transformers writes it (modeling_vit.py, eager attention): shape checks that raise,
`torch.jit.is_tracing()`, a branch on the weights' dtype, `interpolate_pos_encoding=None`, the class token expanded
to the batch, heads by `x.size()[:-1] + (heads, size)`. Works as written (no change was needed): a guard.
QAT eval = integer model (bit for bit) = ONNX Runtime."""
from __future__ import annotations

import collections.abc
import math

import torch
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit

IMG, P, C, D, H, N, HID, NL = 16, 4, 3, 32, 4, 2, 64, 5

class ViTPatchEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        image_size, patch_size = IMG, P
        image_size = image_size if isinstance(image_size, collections.abc.Iterable) else (image_size, image_size)
        patch_size = patch_size if isinstance(patch_size, collections.abc.Iterable) else (patch_size, patch_size)
        num_patches = (image_size[1] // patch_size[1]) * (image_size[0] // patch_size[0])
        self.image_size, self.patch_size, self.num_channels, self.num_patches = image_size, patch_size, C, num_patches
        self.projection = nn.Conv2d(C, D, kernel_size=patch_size, stride=patch_size)
    def forward(self, pixel_values, interpolate_pos_encoding=False):
        batch_size, num_channels, height, width = pixel_values.shape
        if num_channels != self.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match with the one set in the configuration.")
        if not interpolate_pos_encoding:
            if height != self.image_size[0] or width != self.image_size[1]:
                raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({self.image_size[0]}*{self.image_size[1]}).")
        embeddings = self.projection(pixel_values).flatten(2).transpose(1, 2)
        return embeddings

class ViTEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.patch_embeddings = ViTPatchEmbeddings()
        num_patches = self.patch_embeddings.num_patches
        self.position_embeddings = nn.Parameter(torch.randn(1, num_patches + 1, D))
        self.dropout = nn.Dropout(0.0); self.patch_size = P
    def interpolate_pos_encoding(self, embeddings, height, width):
        num_patches = embeddings.shape[1] - 1
        num_positions = self.position_embeddings.shape[1] - 1
        if not torch.jit.is_tracing() and num_patches == num_positions and height == width:
            return self.position_embeddings
        raise NotImplementedError
    def forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
        batch_size, num_channels, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)

class ViTSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_attention_heads = H; self.attention_head_size = D // H; self.all_head_size = D
        self.query = nn.Linear(D, D); self.key = nn.Linear(D, D); self.value = nn.Linear(D, D); self.dropout = nn.Dropout(0.0)
    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3)
    def forward(self, hidden_states, head_mask=None, output_attentions=False):
        mixed_query_layer = self.query(hidden_states)
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        query_layer = self.transpose_for_scores(mixed_query_layer)
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        if head_mask is not None:
            attention_probs = attention_probs * head_mask
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        context_layer = context_layer.view(new_context_layer_shape)
        outputs = (context_layer, attention_probs) if output_attentions else (context_layer,)
        return outputs

class ViTSelfOutput(nn.Module):
    def __init__(self):
        super().__init__(); self.dense = nn.Linear(D, D); self.dropout = nn.Dropout(0.0)
    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states))

class ViTAttention(nn.Module):
    def __init__(self):
        super().__init__(); self.attention = ViTSelfAttention(); self.output = ViTSelfOutput()
    def forward(self, hidden_states, head_mask=None, output_attentions=False):
        self_outputs = self.attention(hidden_states, head_mask, output_attentions)
        attention_output = self.output(self_outputs[0], hidden_states)
        return (attention_output,) + self_outputs[1:]

class ViTIntermediate(nn.Module):
    def __init__(self):
        super().__init__(); self.dense = nn.Linear(D, HID); self.intermediate_act_fn = nn.GELU()
    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))

class ViTOutput(nn.Module):
    def __init__(self):
        super().__init__(); self.dense = nn.Linear(HID, D); self.dropout = nn.Dropout(0.0)
    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states)) + input_tensor

class ViTLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = ViTAttention(); self.intermediate = ViTIntermediate(); self.output = ViTOutput()
        self.layernorm_before = nn.LayerNorm(D, eps=1e-12); self.layernorm_after = nn.LayerNorm(D, eps=1e-12)
    def forward(self, hidden_states, head_mask=None, output_attentions=False):
        self_attention_outputs = self.attention(self.layernorm_before(hidden_states), head_mask, output_attentions=output_attentions)
        attention_output = self_attention_outputs[0]
        outputs = self_attention_outputs[1:]
        hidden_states = attention_output + hidden_states
        layer_output = self.layernorm_after(hidden_states)
        layer_output = self.intermediate(layer_output)
        layer_output = self.output(layer_output, hidden_states)
        return (layer_output,) + outputs

class ViTForImageClassification(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = ViTEmbeddings()
        self.layer = nn.ModuleList([ViTLayer() for _ in range(N)])
        self.layernorm = nn.LayerNorm(D, eps=1e-12)
        self.classifier = nn.Linear(D, NL)
    def forward(self, pixel_values=None, head_mask=None, interpolate_pos_encoding=None):
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states, None)[0]
        sequence_output = self.layernorm(hidden_states)
        return self.classifier(sequence_output[:, 0, :])


def test_vit_as_transformers_writes_it_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification().eval()
    x = torch.randn(16, C, IMG, IMG)
    qat = prepares_whole(model, x[:2])
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 2 * N
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, 0.05 * model(x).abs().max().item())
    runs_in_onnx_runtime(integer, x, tmp_path / "vit.onnx")
