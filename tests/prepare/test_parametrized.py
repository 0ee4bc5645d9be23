"""Layers whose weight is computed by a parametrization (torch.nn.utils.parametrizations.weight_norm: audio vocoders,
spectral_norm: GAN discriminators) are quantized as their plain class: the weight quantizer sees the computed weight,
what trains are the parametrization's own parameters (g and v), and the integer model holds the computed weight.
The deprecated hook-based torch.nn.utils.weight_norm is refused with the fix."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn
from torch.nn.utils import parametrizations

import qatkit


class Vocoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = parametrizations.weight_norm(nn.Conv1d(4, 8, 5, padding=2))
        self.bn = nn.BatchNorm1d(8)
        self.c2 = parametrizations.spectral_norm(nn.Conv1d(8, 8, 3, padding=1))
        self.fc = parametrizations.weight_norm(nn.Linear(8, 3))

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(y)).mean(-1))


def _weight_norm64(g, v):  # w = g · v / ‖v‖, norms over every axis but the output channel's, in float64
    v = v.double()
    return g.double() * v / v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))


def test_parametrized_layers_are_quantized_and_their_parameters_train(tmp_path):
    torch.manual_seed(0)
    model, x = Vocoder().eval(), torch.randn(6, 4, 16)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    assert [(r["name"], r["bn_folded"]) for r in qat.qat_info.layers] == [("c1", True), ("c2", False), ("fc", False)]
    names = {n for n, _ in qat.named_parameters()}
    assert {"c1.parametrizations.weight.original0", "c1.parametrizations.weight.original1",
            "c2.parametrizations.weight.original", "fc.parametrizations.weight.original1"} <= names
    assert not {"c1.weight", "c2.weight", "fc.weight"} & names  # computed, not stored
    fc = qat.get_submodule("fc")
    g, v = fc.parametrizations.weight.original0, fc.parametrizations.weight.original1
    torch.testing.assert_close(fc.folded()[0].double(), _weight_norm64(g, v), rtol=1e-6, atol=0)
    qatkit.calibrate(qat, [torch.randn(6, 4, 16) for _ in range(4)])
    integer = converts_exactly(qat, model, x, tolerance=0.05)
    assert runs_in_onnx_runtime(integer, x, tmp_path / "m.onnx")["max_step_diff"] == 0
    qat.train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    qat(x).square().mean().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
    before = fc.folded()[0].detach().clone()
    optimizer.step()
    after = fc.folded()[0].detach()  # the weight the quantizer sees follows what trained
    assert not torch.equal(after, before)
    torch.testing.assert_close(after.double(), _weight_norm64(g, v), rtol=1e-6, atol=0)


@pytest.mark.parametrize("hook", [nn.utils.weight_norm, nn.utils.spectral_norm])
def test_hook_based_norms_are_refused_with_the_fix(hook):
    with pytest.warns(FutureWarning) if hook is nn.utils.weight_norm else contextlib.nullcontext():
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), hook(nn.Linear(4, 2)))
    with pytest.raises(qatkit.QatkitError, match=r"\['2'\].*Fix: call torch.nn.utils.remove_weight_norm"):
        qatkit.prepare(model, qatkit.QATConfig(), torch.randn(2, 4))


def test_hooks_are_refused_naming_the_modules():
    """The QAT graph calls no hook: a hook that halves a conv's output changed the float model's outputs by ~0.2 and
    was dropped without a word, from the QAT and the integer model alike."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    handles = [model[0].register_forward_hook(lambda m, args, out: out * 0.5),
               model.register_forward_pre_hook(lambda m, args: (args[0] * 2,)),
               model[3].register_full_backward_hook(lambda m, grad_in, grad_out: None)]
    with pytest.raises(qatkit.QatkitError, match=r"^modules with hooks = \['model \(forward pre-hook\)', '0 \(forward "
                                                 r"hook\)', '3 \(backward hook\)'\] is not allowed; .*Fix: remove "
                                                 r"them \(handle\.remove\(\)\)"):
        qatkit.prepare(model, qatkit.QATConfig(), x)
    for handle in handles:
        handle.remove()
    qat = qatkit.prepare(model, qatkit.QATConfig(), x)
    assert [row["name"] for row in qat.qat_info.layers] == ["0", "3"]
