"""Mixture-of-experts routing as language models write it (Mixtral: each expert takes the tokens routed to it,
`tok, slot = torch.where(idx == e)`, and adds its gated outputs back with index_add; or by a boolean mask,
`out[m] = expert(x[m])`): the tokens an expert gets depend on the data, and an expert may get none. QAT learns, the
integer model computes QAT eval bit for bit, ONNX Runtime computes it (NonZero, GatherND, ScatterND; the
integer-only reference equals it), and an empty expert input neither sets nor breaks a range."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import runs_in_onnx_runtime
from torch import nn

import qatkit

D, E = 8, 4


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MoE(nn.Module):
    """Top-2 routing over E experts on (tokens, D) inputs; `style` says how tokens reach an expert."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.router, self.head = nn.Linear(D, E, bias=False), nn.Linear(D, 3)
        self.experts = nn.ModuleList(Expert() for _ in range(E))

    def forward(self, x):
        w, idx = torch.topk(F.softmax(self.router(x), dim=-1), 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            if self.style == "where":  # Mixtral: the (token, slot) pairs routed to e
                tok, slot = torch.where(idx == e)
                out = out.index_add(0, tok, expert(x[tok]) * w[tok, slot, None])
            elif self.style == "nonzero":
                tok = torch.nonzero((idx == e).any(-1)).squeeze(-1)
                out = out.index_add(0, tok, expert(x[tok]) * (w * (idx == e)).sum(-1)[tok, None])
            else:  # a boolean mask, read and assigned
                m = (idx == e).any(-1)
                out[m] = expert(x[m]) * (w * (idx == e)).sum(-1, keepdim=True)[m]
        return self.head(x + out)


@pytest.mark.parametrize("style", ["where", "nonzero", "mask"])
@pytest.mark.parametrize("bits", [8, 4])
def test_routed_experts_train_convert_and_run_in_onnx_runtime(style, bits, tmp_path):
    torch.manual_seed(0)
    model, x = MoE(style).eval(), torch.randn(64, D)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=bits, act_bits=bits), x[:8])
    assert len(qat.qat_info.layers) == 2 + 2 * E  # every expert's layers are quantized
    qatkit.calibrate(qat, [(x, y)])
    with torch.no_grad():  # the float model's outputs, but where the quantized router picks another expert of a
        error = (qat.eval()(x).double() - model.double()(x.double())).abs().amax(-1)  # near tie (0.2008 vs 0.2010)
        model.float()
    assert (error < 0.05).double().mean() > 0.95 if bits == 8 else error.median() < 0.2
    qat.train()
    opt = torch.optim.AdamW(qat.parameters(), lr=1e-2)
    for _ in range(5):
        loss = F.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    integer = qatkit.convert(qat.eval())
    other = torch.randn(37, D)  # other tokens, other routing
    with torch.no_grad():
        for batch in (x, other):
            assert torch.equal(integer(batch), qat(batch))
    result = runs_in_onnx_runtime(integer, other, tmp_path / "moe.onnx")
    assert result["max_step_diff"] == 0


class Threshold(nn.Module):
    """An expert that takes only the tokens whose first feature exceeds 1: none in some batches."""

    def __init__(self):
        super().__init__()
        self.expert, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        tok = torch.where(x[:, 0] > 1.0)[0]
        return self.head(x + torch.zeros_like(x).index_add(0, tok, self.expert(x[tok])))


def test_an_expert_with_no_tokens_sets_no_range_and_breaks_nothing(tmp_path):
    """The expert's input and output quantizers used to take an empty tensor's range (calibrate: RuntimeError of
    min() on an empty tensor; prepare's check: an MSE search over no values)."""
    torch.manual_seed(0)
    x = torch.randn(32, D)
    none, some = x.clone(), x.clone()
    none[:, 0] = -none[:, 0].abs()  # no token above 1
    some[:8, 0] = 2.0 + some[:8, 0].abs()
    y = torch.zeros(32, dtype=torch.long)
    qat = qatkit.prepare(Threshold().eval(), qatkit.QATConfig(), none[:4])
    qatkit.calibrate(qat, [(none, y)])
    with pytest.raises(qatkit.QatkitError, match=r"^convert needs every quantizer's range, but these have none: "
                                                 r"'expert\.out_quant'.*Fix: run "
                                                 r"qatkit\.calibrate\(model, batches\) on batches that reach them"):
        qatkit.convert(qat.eval())
    qatkit.calibrate(qat, [(none, y), (some, y)])  # the first batch reaches it with no values, the second with 8
    out_quant = qat.expert.out_quant
    expected = qatkit.prepare(Threshold().eval(), qatkit.QATConfig(), some[:4])
    expected.load_state_dict(qat.state_dict(), strict=False)
    qatkit.calibrate(expected, [(some, y)])
    assert torch.equal(out_quant.scale, expected.expert.out_quant.scale)  # the empty batch changed nothing
    qat.train()
    F.cross_entropy(qat(none), y).backward()  # an empty expert input in training
    integer = qatkit.convert(qat.eval())
    with torch.no_grad():
        for batch in (none, some):
            assert torch.equal(integer(batch), qat(batch))
    runs_in_onnx_runtime(integer, some, tmp_path / "threshold.onnx")
