"""Swin Transformers as timm (>= 0.9) writes them: shifted windows (torch.roll, F.pad to a window multiple, window
partition and reverse by view/permute), a relative position bias gathered from a table by an index buffer, the
shift mask as a buffer; Swin V2's cosine attention, its bias from an MLP over a coordinate table, and its qkv layer
called as F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias)). QAT eval = integer model (bit for bit) = ONNX
Runtime (within one step); the old window_reverse's int() gets a fix that names it."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, runs_in_onnx_runtime
from torch import nn

import qatkit
from qatkit.errors import QatkitError


def window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows, ws, H, W):
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def window_reverse_before_timm_09(windows, ws, H, W):
    B = int(windows.shape[0] / (H * W / ws / ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def relative_position_index(ws):
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, ws):
        super().__init__()
        self.heads, self.area, self.scale = heads, ws * ws, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(0.1 * torch.randn((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=False)
        self.qkv, self.proj, self.softmax = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Softmax(dim=-1)

    def bias(self):
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(self.area, self.area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def scores(self, x):
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return (q * self.scale) @ k.transpose(-2, -1) + self.bias(), v

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        attn, v = self.scores(x)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, N, N)
        return self.proj((self.softmax(attn) @ v).transpose(1, 2).reshape(B_, N, -1))


class WindowAttentionV2(WindowAttention):
    """Cosine attention with a learned temperature; the bias from an MLP over log-spaced relative coordinates."""

    def __init__(self, dim, heads, ws):
        super().__init__(dim, heads, ws)
        del self.relative_position_bias_table
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(inplace=True), nn.Linear(32, heads, bias=False))
        r = torch.arange(-(ws - 1), ws, dtype=torch.float32) / (ws - 1) * 8
        table = torch.stack(torch.meshgrid(r, r, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
        self.register_buffer("relative_coords_table", table, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(0.1 * torch.randn(dim)), nn.Parameter(0.1 * torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)

    def bias(self):
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.heads)
        bias = table[self.relative_position_index.view(-1)].view(self.area, self.area, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias.contiguous()).unsqueeze(0)

    def scores(self, x):
        B_, N, _ = x.shape
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B_, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        return attn + self.bias(), v


class Block(nn.Module):
    def __init__(self, dim, heads, res, ws, shift, v2, reverse):
        super().__init__()
        self.ws, self.shift, self.reverse = ws, shift, reverse
        self.norm1, self.attn = nn.LayerNorm(dim), (WindowAttentionV2 if v2 else WindowAttention)(dim, heads, ws)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        mask = None
        if shift:  # the windows that wrap around after the roll see only their own region
            padded = -(-res // ws) * ws
            img, cnt = torch.zeros(1, padded, padded, 1), 0
            for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                    img[:, h, w, :] = cnt
                    cnt += 1
            windows = window_partition(img, ws).view(-1, ws * ws)
            mask = windows.unsqueeze(1) - windows.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attn(self, x):
        B, H, W, C = x.shape
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        pad_h, pad_w = (self.ws - H % self.ws) % self.ws, (self.ws - W % self.ws) % self.ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        _, Hp, Wp, _ = x.shape
        windows = self.attn(window_partition(x, self.ws).view(-1, self.ws * self.ws, C), mask=self.attn_mask)
        x = self.reverse(windows.view(-1, self.ws, self.ws, C), self.ws, Hp, Wp)[:, :H, :W, :].contiguous()
        return torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2)) if self.shift else x

    def forward(self, x):
        B, H, W, C = x.shape
        x = (x + self._attn(self.norm1(x))).reshape(B, -1, C)
        return (x + self.mlp(self.norm2(x))).reshape(B, H, W, C)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape
        return self.reduction(self.norm(x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)))


class Swin(nn.Module):
    """Patch embedding (stride-2 conv, channels last), a stage of two blocks (plain, shifted) at 6×6 patches (padded
    to 8×8 windows of 4), patch merging, one block at 3×3 (padded to 4×4), mean-pooled head."""

    def __init__(self, v2=False, reverse=window_reverse, dim=16, heads=2, ws=4):
        super().__init__()
        self.patch, self.pnorm = nn.Conv2d(3, dim, 2, 2), nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(Block(dim, heads, 6, ws, 0, v2, reverse), Block(dim, heads, 6, ws, ws // 2, v2, reverse))
        self.merge = PatchMerging(dim)
        self.stage2 = nn.Sequential(Block(2 * dim, 2 * heads, 3, ws, 0, v2, reverse))
        self.norm, self.head = nn.LayerNorm(2 * dim), nn.Linear(2 * dim, 10)

    def forward(self, x):
        x = self.stage2(self.merge(self.stage1(self.pnorm(self.patch(x).permute(0, 2, 3, 1)))))
        return self.head(self.norm(x).mean(dim=(1, 2)))


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin-v2"])
def test_swin_transformer_converts_and_runs_in_onnx_runtime(v2, tmp_path):
    torch.manual_seed(0)
    model = Swin(v2=v2).eval()
    x = torch.randn(16, 3, 12, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = qatkit.prepare(model, qatkit.QATConfig(), x[:2])
    assert not [str(w.message) for w in caught if any(s in str(w.message) for s in ("will refuse", "could not"))]
    assert sum(type(m).__name__ == "QMatMul" for m in qat.modules()) == 6  # q·kᵀ and weights·v of the 3 blocks
    quantized = {row["name"] for row in qat.qat_info.layers}
    assert {f"stage{s}.attn.qkv" for s in ("1.0", "1.1", "2.0")} <= quantized  # v2: called as F.linear(x, its weight)
    qatkit.calibrate(qat, [x])
    integer = converts_exactly(qat, model, x, 0.2)
    converts_exactly(qat, model, x[:3], 0.2)  # another batch: the window count follows it
    runs_in_onnx_runtime(integer, x, tmp_path / "swin.onnx")


def test_int_of_a_size_is_refused_with_the_fix_that_timm_made():
    model = Swin(reverse=window_reverse_before_timm_09).eval()
    with pytest.raises(QatkitError, match=r"int\(\) or float\(\).*// or let view/reshape infer it with -1"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qatkit.prepare(model, qatkit.QATConfig(), torch.randn(2, 3, 12, 12))
