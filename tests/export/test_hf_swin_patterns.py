"""Hugging Face's Swin as transformers writes it (modeling_swin.py, abridged to the patch embedding, one stage of two
layers — the second shifted, its attention mask built by item assignment in a loop on every call — and a pooled
classifier): window size and shift decided from the input's resolution, padding to a window multiple, the relative
position bias gathered by an index buffer, `batch_size // mask_shape` views. QAT eval = integer model (bit for bit) =
ONNX Runtime (within one step; here every output value equal)."""
from __future__ import annotations

import collections.abc
import math

import pytest
import torch
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.convert import ops
from qatkit.errors import DataError

DIM, HEADS, WS, IMG, PATCH, CLASSES = 32, 4, 4, 32, 4, 5


def window_partition(input_feature, window_size):
    batch_size, height, width, num_channels = input_feature.shape
    input_feature = input_feature.view(
        batch_size, height // window_size, window_size, width // window_size, window_size, num_channels
    )
    windows = input_feature.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, num_channels)
    return windows


def window_reverse(windows, window_size, height, width):
    num_channels = windows.shape[-1]
    windows = windows.view(-1, height // window_size, width // window_size, window_size, window_size, num_channels)
    windows = windows.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, height, width, num_channels)
    return windows


class SwinPatchEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        image_size = IMG if isinstance(IMG, collections.abc.Iterable) else (IMG, IMG)
        patch_size = PATCH if isinstance(PATCH, collections.abc.Iterable) else (PATCH, PATCH)
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, 3
        self.grid_size = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        self.projection = nn.Conv2d(3, DIM, kernel_size=patch_size, stride=patch_size)

    def maybe_pad(self, pixel_values, height, width):
        if width % self.patch_size[1] != 0:
            pad_values = (0, self.patch_size[1] - width % self.patch_size[1])
            pixel_values = nn.functional.pad(pixel_values, pad_values)
        if height % self.patch_size[0] != 0:
            pad_values = (0, 0, 0, self.patch_size[0] - height % self.patch_size[0])
            pixel_values = nn.functional.pad(pixel_values, pad_values)
        return pixel_values

    def forward(self, pixel_values):
        _, num_channels, height, width = pixel_values.shape
        pixel_values = self.maybe_pad(pixel_values, height, width)
        embeddings = self.projection(pixel_values)
        _, _, height, width = embeddings.shape
        output_dimensions = (height, width)
        embeddings = embeddings.flatten(2).transpose(1, 2)
        return embeddings, output_dimensions


class SwinSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        self.num_attention_heads = num_heads
        self.attention_head_size = int(dim / num_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.window_size = (
            window_size if isinstance(window_size, collections.abc.Iterable) else (window_size, window_size)
        )
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), num_heads)
        )
        nn.init.normal_(self.relative_position_bias_table, std=0.1)
        coords_h = torch.arange(self.window_size[0])
        coords_w = torch.arange(self.window_size[1])
        coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
        relative_coords = relative_coords.permute(1, 2, 0).contiguous()
        relative_coords[:, :, 0] += self.window_size[0] - 1
        relative_coords[:, :, 1] += self.window_size[1] - 1
        relative_coords[:, :, 0] *= 2 * self.window_size[1] - 1
        relative_position_index = relative_coords.sum(-1)
        self.register_buffer("relative_position_index", relative_position_index)
        self.query = nn.Linear(self.all_head_size, self.all_head_size, bias=True)
        self.key = nn.Linear(self.all_head_size, self.all_head_size, bias=True)
        self.value = nn.Linear(self.all_head_size, self.all_head_size, bias=True)
        self.dropout = nn.Dropout(0.0)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
        batch_size, dim, num_channels = hidden_states.shape
        mixed_query_layer = self.query(hidden_states)
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        query_layer = self.transpose_for_scores(mixed_query_layer)
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        relative_position_bias = relative_position_bias.view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1
        )
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attention_scores = attention_scores + relative_position_bias.unsqueeze(0)
        if attention_mask is not None:
            mask_shape = attention_mask.shape[0]
            attention_scores = attention_scores.view(
                batch_size // mask_shape, mask_shape, self.num_attention_heads, dim, dim
            )
            attention_scores = attention_scores + attention_mask.unsqueeze(1).unsqueeze(0)
            attention_scores = attention_scores.view(-1, self.num_attention_heads, dim, dim)
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


class SwinAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        self.self = SwinSelfAttention(dim, num_heads, window_size)
        self.output = nn.Linear(dim, dim)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
        self_outputs = self.self(hidden_states, attention_mask, head_mask, output_attentions)
        attention_output = self.output(self_outputs[0])
        outputs = (attention_output,) + self_outputs[1:]
        return outputs


class SwinLayer(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, shift_size=0):
        super().__init__()
        self.shift_size = shift_size
        self.window_size = WS
        self.input_resolution = input_resolution
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-5)
        self.attention = SwinAttention(dim, num_heads, window_size=self.window_size)
        self.drop_path = nn.Identity()
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-5)
        self.intermediate = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU())
        self.output = nn.Linear(2 * dim, dim)

    def set_shift_and_window_size(self, input_resolution):
        if min(input_resolution) <= self.window_size:
            self.shift_size = int(0)  # transformers: torch_int(0), int(0) outside tracing
            self.window_size = (
                torch.min(torch.tensor(input_resolution)) if torch.jit.is_tracing() else min(input_resolution)
            )

    def get_attn_mask(self, height, width, dtype, device):
        if self.shift_size > 0:
            img_mask = torch.zeros((1, height, width, 1), dtype=dtype, device=device)
            height_slices = (
                slice(0, -self.window_size),
                slice(-self.window_size, -self.shift_size),
                slice(-self.shift_size, None),
            )
            width_slices = (
                slice(0, -self.window_size),
                slice(-self.window_size, -self.shift_size),
                slice(-self.shift_size, None),
            )
            count = 0
            for height_slice in height_slices:
                for width_slice in width_slices:
                    img_mask[:, height_slice, width_slice, :] = count
                    count += 1
            mask_windows = window_partition(img_mask, self.window_size)
            mask_windows = mask_windows.view(-1, self.window_size * self.window_size)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        else:
            attn_mask = None
        return attn_mask

    def maybe_pad(self, hidden_states, height, width):
        pad_right = (self.window_size - width % self.window_size) % self.window_size
        pad_bottom = (self.window_size - height % self.window_size) % self.window_size
        pad_values = (0, 0, 0, pad_right, 0, pad_bottom)
        hidden_states = nn.functional.pad(hidden_states, pad_values)
        return hidden_states, pad_values

    def forward(self, hidden_states, input_dimensions, head_mask=None, output_attentions=False, always_partition=False):
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states = hidden_states.view(batch_size, height, width, channels)
        hidden_states, pad_values = self.maybe_pad(hidden_states, height, width)
        _, height_pad, width_pad, _ = hidden_states.shape
        if self.shift_size > 0:
            shifted_hidden_states = torch.roll(hidden_states, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            shifted_hidden_states = hidden_states
        hidden_states_windows = window_partition(shifted_hidden_states, self.window_size)
        hidden_states_windows = hidden_states_windows.view(-1, self.window_size * self.window_size, channels)
        attn_mask = self.get_attn_mask(
            height_pad, width_pad, dtype=hidden_states.dtype, device=hidden_states_windows.device
        )
        attention_outputs = self.attention(
            hidden_states_windows, attn_mask, head_mask, output_attentions=output_attentions
        )
        attention_output = attention_outputs[0]
        attention_windows = attention_output.view(-1, self.window_size, self.window_size, channels)
        shifted_windows = window_reverse(attention_windows, self.window_size, height_pad, width_pad)
        if self.shift_size > 0:
            attention_windows = torch.roll(shifted_windows, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            attention_windows = shifted_windows
        was_padded = pad_values[3] > 0 or pad_values[5] > 0
        if was_padded:
            attention_windows = attention_windows[:, :height, :width, :].contiguous()
        attention_windows = attention_windows.view(batch_size, height * width, channels)
        hidden_states = shortcut + self.drop_path(attention_windows)
        layer_output = self.layernorm_after(hidden_states)
        layer_output = self.intermediate(layer_output)
        layer_output = hidden_states + self.output(layer_output)
        layer_outputs = (layer_output, attention_outputs[1]) if output_attentions else (layer_output,)
        return layer_outputs


class SwinForImageClassification(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = SwinPatchEmbeddings()
        grid = IMG // PATCH
        self.layers = nn.ModuleList([SwinLayer(DIM, (grid, grid), HEADS, shift_size=0 if i % 2 == 0 else WS // 2)
                                     for i in range(2)])
        self.layernorm = nn.LayerNorm(DIM)
        self.pooler = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(DIM, CLASSES)

    def forward(self, pixel_values):
        hidden_states, input_dimensions = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden_states = layer(hidden_states, input_dimensions)[0]
        sequence_output = self.layernorm(hidden_states)
        pooled_output = self.pooler(sequence_output.transpose(1, 2))
        pooled_output = torch.flatten(pooled_output, 1)
        return self.classifier(pooled_output)


def test_hugging_face_swin_converts_and_runs_in_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = SwinForImageClassification().eval()
    x = torch.randn(8, 3, IMG, IMG)
    qat = prepares_whole(model, x[:2])
    assert {r["name"] for r in qat.qat_info.layers} >= {"embeddings.projection", "layers.1.attention.self.query",
                                                        "layers.1.output", "classifier"}
    assert sum(n.target is ops.setitem for n in qat.graph.nodes) == 9  # the shifted layer's mask, one per region
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, 0.05)
    # at 16×16 (4×4 patches, one window) HF's Swin turns its shift off, which the graph traced at 32×32 keeps: the
    # QAT and integer models take the example's size only
    assert qat.qat_info.input_sizes == {"pixel_values": [None, 3, IMG, IMG]}
    for m in (qat, integer):
        with pytest.raises(DataError, match=r"input 'pixel_values' has shape \(2, 3, 48, 48\); this model takes "
                                            r"\(batch, 3, 32, 32\)"):
            m(torch.randn(2, 3, 48, 48))
    result = runs_in_onnx_runtime(integer, x, tmp_path / "hf_swin.onnx")
    assert result["max_step_diff"] == 0
