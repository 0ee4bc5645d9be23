"""A Conformer encoder block as speech recognisers write it (Gulati et al. 2020): a conv subsampling front end over
log-mel frames, macaron feed-forward halves with SiLU, nn.MultiheadAttention, the convolution module (pointwise conv,
GLU, depthwise Conv1d, BatchNorm1d, SiLU, pointwise conv between transposes), x.tanh() in a gate and CTC's
x.log_softmax(-1). Prepared at 64 frames, it takes any number of frames: QAT eval = integer model bit for bit, ONNX
Runtime within one step, at 64 and 100."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import prepares_whole
from torch import nn

import qatkit
from qatkit.export import export_onnx, verify

D = 32


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.l1, self.l2 = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        return x + 0.5 * self.l2(F.silu(self.l1(self.ln(x))))


class ConvModule(nn.Module):
    def __init__(self, k=7):
        super().__init__()
        self.ln, self.pw1 = nn.LayerNorm(D), nn.Conv1d(D, 2 * D, 1)
        self.dw, self.bn = nn.Conv1d(D, D, k, padding=k // 2, groups=D), nn.BatchNorm1d(D)
        self.pw2, self.drop = nn.Conv1d(D, D, 1), nn.Dropout(0.1)

    def forward(self, x):  # (B, T, D)
        y = F.glu(self.pw1(self.ln(x).transpose(1, 2)), dim=1)
        y = F.silu(self.bn(self.dw(y)))
        return x + self.drop(self.pw2(y)).transpose(1, 2)


class Conformer(nn.Module):
    def __init__(self, mels=80, vocab=29):
        super().__init__()
        self.subsample = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.proj, self.gate = nn.Linear(8 * (mels // 4), D), nn.Linear(D, D)
        self.ff1, self.attention, self.conv = FeedForward(), nn.MultiheadAttention(D, 4, batch_first=True), ConvModule()
        self.ff2, self.ln, self.head = FeedForward(), nn.LayerNorm(D), nn.Linear(D, vocab)

    def forward(self, feats):  # (B, T, mels)
        x = self.subsample(feats.unsqueeze(1))  # (B, 8, T/4, mels/4)
        b, c, t, f = x.shape
        x = self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f))
        x = x * self.gate(x).tanh()
        x = self.ff1(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = self.ln(self.ff2(self.conv(x)))
        return self.head(x).log_softmax(-1)  # CTC's log-probabilities


def test_conformer_block_converts_and_runs_in_onnx_runtime_at_any_length(tmp_path):
    torch.manual_seed(0)
    model = Conformer().train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm statistics
            model(torch.randn(4, 64, 80))
    model.eval()
    x, longer = torch.randn(4, 64, 80), torch.randn(2, 100, 80)
    qat = prepares_whole(model, x[:2])
    assert qat.qat_info.input_sizes == {"feats": [None, None, 80]}  # the frames free
    assert {"proj", "gate", "conv.pw1", "conv.dw", "conv.pw2", "head"} <= {r["name"] for r in qat.qat_info.layers}
    qatkit.calibrate(qat, [x])
    qat.eval()
    with torch.no_grad():
        assert (qat(x) - model(x)).abs().max() < 0.02 * model(x).abs().max()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        for inputs in (x, longer):
            assert torch.equal(integer(inputs), qat(inputs))
    export_onnx(integer, tmp_path / "conformer.onnx", x[:1])
    result = verify(tmp_path / "conformer.onnx", integer, [(x,), (longer,)])
    assert result["top1_agreement"] == 1.0 and result["within_one_step"] == 1.0, result
