"""Tensor ops as people spell them, which the integer model knows in another spelling or as an ONNX op of their own:
x.square() (x·x), torch.minimum/maximum, x.clip (clamp), floor, ceil and round (ONNX's), trunc and frac (sign, floor,
abs), remainder and fmod (floor, trunc), logsumexp (max, exp, sum, log), logical_and/or/xor (&, |, != of bools), outer
(a product of unsqueezed vectors), cosine_similarity and pairwise_distance (F.normalize, norm), torch.special.erf/expit,
gather (ONNX's GatherElements, on the codes), x.unfold (a Gather of the windows), sort and argsort (TopK of every value,
equal ones in order), expm1, exp2, log2, log10 (exp, log), addcmul, addcdiv, lerp, hypot, logit, isnan, nan_to_num,
cdist (written out), tan, atan, asin, acos, sinh, cosh, prod (ONNX's), swapaxes/swapdims and x.mT (transpose), movedim,
x.T and x.t() (permute, from the rank on the example input), narrow and index_select (an index), flip (a Slice
backwards, on the codes), rot90 (flips and a transpose), log1p (log(1 + x)), var/std (the mean of squared deviations, as
a LayerNorm written out), BERT's GELU written out with torch.erf, sign, reciprocal, view_as/reshape_as (view/reshape to
the other's size), torch.mm (@), addmm and baddbmm (β·input + α·(m1 @ m2)), var_mean/std_mean (the two written out),
tile (repeat), vector_norm, linalg.norm (vector and Frobenius), torch.norm and dist (x.norm, of the flat x for every
value), diff (slices), F.pad circular (the far ends joined: ONNX opset 17 has no circular Pad), F.one_hot (ids ==
arange), scatter, scatter_add, scatter_reduce sum/prod (ONNX's ScatterElements), index_add (scatter_add), atan2 (atan
and the quadrants, signed zeros as PyTorch's), median and kthvalue (TopK's k smallest), logcumsumexp, any and all
(counts of the non-zero and zero values), x[:, mask] with a 1-D boolean mask (its true positions), torch.div(x, y,
rounding_mode="trunc") (from x // y). Each converts, computes the model's values (float64, every layer left float)
and runs in ONNX Runtime as qatkit does."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import converts_exactly, prepares_whole, runs_in_onnx_runtime
from torch import nn

import qatkit


def bert_gelu(x):  # Hugging Face's original `gelu`
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Net(nn.Module):
    """A conv, the op under test on its (B, C, H, W) output, and a head."""

    def __init__(self, op):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.register_buffer("order", torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]))
        self.op = op

    def forward(self, x):
        y = self.op(self, self.c1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.c2(y), 1), 1))


OPS = {
    "x.square": lambda m, y: y.square() - torch.square(y) * 0.5,
    "minimum-maximum": lambda m, y: torch.minimum(y, y.sigmoid()) + y.maximum(torch.zeros_like(y)),
    "swapaxes-swapdims": lambda m, y: y.swapaxes(2, 3).swapdims(-1, -2) + torch.swapaxes(y, 1, 1),
    "mT": lambda m, y: y.mT.relu(),
    "narrow": lambda m, y: torch.cat([y.narrow(1, 4, 4), torch.narrow(y, -3, 0, 4)], 1),
    "index_select": lambda m, y: y.index_select(1, m.order) + torch.index_select(y, -1, m.order),
    "flip": lambda m, y: y.flip(3) + y.flip(2, 3) + torch.flip(y, [1, -1]),
    "bert-gelu": lambda m, y: bert_gelu(y),
    "sign-reciprocal": lambda m, y: torch.sign(y) * (y.abs() + 1).reciprocal() + torch.reciprocal(y.exp()),
    "var-std": lambda m, y: (y - y.mean((2, 3), keepdim=True)) / (y.std(dim=(2, 3), keepdim=True) + 1e-3)
    + torch.var(y, 1, False, True) + y.var(-1, correction=0, keepdim=True),
    "movedim": lambda m, y: y.movedim(1, -1).movedim(-1, 1) + torch.moveaxis(y, (1, 2), (3, 1)).permute(0, 2, 3, 1),
    "x.T": lambda m, y: y.flatten(1).T.T.reshape(y.shape),
    "x.t": lambda m, y: torch.t(y.flatten(1).t()).reshape(y.shape) + y.flatten().t().reshape(y.shape),
    "rot90": lambda m, y: torch.rot90(y, 1, (2, 3)) + y.rot90(2, [2, 3]) + torch.rot90(y, -1, (3, 2))
    + y.rot90(4, (2, 3)),
    "log1p": lambda m, y: torch.log1p(y.abs()) + y.relu().log1p(),
    "clip": lambda m, y: y.clip(-1, 1) + torch.clip(y, min=0.2) + torch.clamp(y, min=-y.abs().mean(1, keepdim=True)),
    "floor-ceil-round": lambda m, y: torch.floor(y * 3) / 3 + y.ceil() + torch.round(y * 2) / 2 + y.round(),
    "trunc-frac": lambda m, y: torch.trunc(y * 2) + y.frac() + torch.fix(y * 3) + y.trunc(),
    "remainder-fmod": lambda m, y: torch.remainder(y, 0.5) + y.fmod(0.7) + y.remainder(-0.3),
    "logsumexp": lambda m, y: torch.logsumexp(y, 1, keepdim=True) + y.logsumexp((2, 3))[..., None, None],
    "logical": lambda m, y: torch.where(torch.logical_and(y > 0, y < 1) | torch.logical_xor(y > 0.5, y < -0.5), y,
                                        torch.logical_or(y > 1, y < -1).float()),
    "outer": lambda m, y: y * torch.outer(y.mean((0, 1, 3)), y.mean((0, 1, 2))),
    "cosine-pairwise": lambda m, y: y * F.cosine_similarity(y, y.flip(1), dim=1).unsqueeze(1)
    + F.pairwise_distance(y, y.flip(3)).unsqueeze(-1),
    "special": lambda m, y: torch.special.erf(y) + torch.special.expit(y),
    "gather": lambda m, y: torch.gather(y, 3, y.amax(1, keepdim=True).topk(8, dim=3).indices.expand(-1, 8, -1, -1))
    + y.gather(1, m.order.view(1, 8, 1, 1).expand(y.shape[0], -1, y.shape[2], y.shape[3])),
    "x.unfold": lambda m, y: y.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(y.shape)
    + torch.cat([y.unfold(3, 3, 1)[..., 1], y[..., :2]], 3),
    "addcmul-lerp-hypot": lambda m, y: torch.addcmul(y, y, y.sigmoid(), value=0.5) + torch.addcdiv(y, y, y.abs() + 1)
    + torch.lerp(y, y.flip(1), 0.3) + y.lerp(y.flip(2), 0.7) + torch.lerp(y, y.flip(3), y.sigmoid())
    + y.hypot(y.flip(1)),
    "logit-nan": lambda m, y: torch.logit(y.sigmoid(), eps=1e-3) + torch.where(torch.isnan(y.sqrt()), 0.0, y)
    + torch.nan_to_num(torch.sqrt(y), nan=0.25),
    "prod": lambda m, y: y * torch.prod(y.sigmoid() + 0.5, 1, keepdim=True) + y.sigmoid().prod(-1, keepdim=True),
    "trig": lambda m, y: torch.tan(y.clamp(-1, 1)) + y.atan() + torch.asin(y.clamp(-1, 1)) + y.clamp(-1, 1).acos()
    + y.sinh() + torch.cosh(y.clamp(-2, 2)),
    "cdist": lambda m, y: y * torch.cdist(y.flatten(2).transpose(1, 2), y.flatten(2).transpose(1, 2),  # (the exact
                                          compute_mode="donot_use_mm_for_euclid_dist").mean(-1).view(  # form)
        y.shape[0], 1, *y.shape[2:]),
    "exp-log": lambda m, y: torch.expm1(y) + y.exp2() + torch.log2(y.abs() + 1) + (y.abs() + 1).log10(),
    "sort-argsort": lambda m, y: torch.sort(y, 1)[0] + y.sort(dim=3, descending=True).values
    + torch.gather(y, 2, y.argsort(2)) + y.gather(1, torch.argsort(y, 1, descending=True)),
    "view_as-reshape_as": lambda m, y: F.softmax(y.flatten(2), -1).view_as(y) + y.flatten(1).reshape_as(y),
    "mm-addmm-baddbmm": lambda m, y: y + (torch.mm(y.mean((2, 3)), y.mean((2, 3)).t()).mean(1)
                                          + torch.addmm(y.mean((2, 3)), y.mean((2, 3)), y.mean((0, 2)), beta=0.5,
                                                        alpha=2).mean(1)).view(-1, 1, 1, 1)
    + torch.baddbmm(y[..., 0], y[..., 1], y[..., 2].transpose(1, 2))[..., None, :] * 0.1
    + y[..., 0].baddbmm(y[..., 1], y[..., 2].mT, beta=0)[..., None, :] * 0.1,
    "var_mean-std_mean": lambda m, y: y - torch.var_mean(y, (2, 3), keepdim=True)[1]
    + torch.std_mean(y, 1, keepdim=True, correction=0)[0] * torch.var_mean(y, -1, True, True)[0],
    "tile": lambda m, y: y.tile(1, 1, 1, 1) + y[:, :, :4].tile(2, 1) + torch.tile(y[..., :4], (2,)),
    "norms": lambda m, y: y / (torch.linalg.vector_norm(y, dim=1, keepdim=True) + 1)
    + (torch.norm(y, dim=2)[..., None] + torch.linalg.norm(y, dim=(2, 3), keepdim=True)
       + torch.linalg.norm(y, 1, 3, True)) * 0.1 + (y.norm() + torch.linalg.vector_norm(y, 1) * 0.1 + torch.dist(
        y, y.flip(1)) + y.dist(y.flip(2), 1) * 0.1) * 1e-3,
    "diff": lambda m, y: torch.diff(y, 2, 2, prepend=y[:, :, :2]) + y.diff(dim=1, append=y[:, :1]),
    "pad-circular": lambda m, y: F.pad(y, (2, 1, 0, 0), mode="circular")[..., 1:-2]
    + F.pad(y, (0, 1, 1, 0), "circular")[:, :, 1:, :-1] + F.pad(y[0], (3, 2), mode="circular")[None, ..., :8],
    "one_hot": lambda m, y: y * F.one_hot(y.argmax(1), 8).permute(0, 3, 1, 2).float(),
    "scatter": lambda m, y: torch.zeros_like(y).scatter(1, m.order.view(1, 8, 1, 1).expand_as(y), y)
    + y.scatter(1, m.order[:4].view(1, 4, 1, 1).expand(y.shape[0], 4, 8, 8), 0.5)  # (an index smaller than src)
    + torch.zeros_like(y).scatter(3, m.order.view(1, 1, 1, 8).expand(y.shape[0], 4, 8, 8), y).sum(1, keepdim=True),
    "scatter_add-scatter_reduce": lambda m, y: y + torch.zeros_like(y).scatter_add(  # (repeated indices: in order)
        1, (m.order % 3).view(1, 8, 1, 1).expand_as(y), y) + torch.ones_like(y).scatter_reduce(
        1, (m.order % 2).view(1, 8, 1, 1).expand_as(y), y.sigmoid(), "prod") + y.scatter_reduce(
        2, m.order.view(1, 1, 8, 1).expand_as(y), y, "sum"),
    "index_add": lambda m, y: y.index_add(1, m.order % 4, y) + torch.zeros_like(y).index_add_(2, m.order, y, alpha=0.5)
    + torch.index_add(y, -1, m.order, y),
    "atan2": lambda m, y: torch.atan2(y, y.flip(1)) + y.atan2(torch.where(y > 0.5, 0.0, y))  # (x = ±0 too)
    + torch.arctan2(y.relu(), -y.relu()),
    "median-kthvalue": lambda m, y: y - y.median(1, keepdim=True).values + torch.median(y, 3)[0][..., None]
    + y.median() + torch.kthvalue(y, 2, 2, True)[0] + y.kthvalue(3).values[..., None] * 0.5
    + (y.median(1, keepdim=True).indices == 2).float(),
    "logcumsumexp": lambda m, y: torch.logcumsumexp(y, 3) + y.logcumsumexp(dim=2),
    "boolean-mask-index": lambda m, y: y[:, m.order > 3].repeat(1, 2, 1, 1)
    + y[..., m.order % 2 == 0].repeat(1, 1, 1, 2),
    "div-trunc": lambda m, y: torch.div(y, 0.3, rounding_mode="trunc") * 0.3 + y.div(-0.7, rounding_mode="trunc")
    + torch.div(y, y.flip(1).abs() + 0.5, rounding_mode="trunc")
    + y * torch.div(m.order - 4, 3, rounding_mode="trunc").view(1, 8, 1, 1),  # (of ints: -1 / 3 is 0, not -1)
    "any-all": lambda m, y: y * (y > 0.5).any(1, keepdim=True) + torch.all(y > -0.2, dim=3, keepdim=True)
    + (y > 0).any() + (y > 0).all(-1)[..., None] * 2.0 + torch.any(y > 1.5, 2)[..., None, :],
    "scatter of integers": lambda m, y: y * torch.zeros(8, dtype=torch.long).scatter(0, m.order, torch.arange(8)).view(
        1, 8, 1, 1),
}
ON_CODES = {"swapaxes-swapdims", "narrow", "index_select", "flip", "movedim", "x.T", "x.t", "rot90", "gather",
            "sort-argsort", "x.unfold", "tile", "pad-circular"}  # on the codes: no float op


@pytest.mark.parametrize("name", OPS)
def test_op_converts_and_runs_in_onnx_runtime(name, tmp_path):
    torch.manual_seed(0)
    model, x = Net(OPS[name]).eval(), torch.randn(4, 3, 8, 8)
    qat = prepares_whole(model, x[:1], qatkit.QATConfig(weight_bits=8, act_bits=8))
    if name in ON_CODES:
        assert qat.qat_info.float_ops == []
    qatkit.calibrate(qat, [torch.randn(4, 3, 8, 8) for _ in range(4)])
    result = runs_in_onnx_runtime(converts_exactly(qat, model, x, tolerance=0.05), x, tmp_path / "m.onnx")
    if name in ON_CODES:
        assert result["max_step_diff"] == 0


@pytest.mark.parametrize("name", OPS)
def test_respelled_graph_computes_the_model_in_float64(name):
    torch.manual_seed(0)
    model, x = Net(OPS[name]).double().eval(), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    config = qatkit.QATConfig(rules=[qatkit.LayerRule(pattern="*", skip=True)], matmul_bits=None)  # nothing quantized
    qat = qatkit.prepare(model, config, x[:1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(qat(x), model(x), rtol=0, atol=1e-12)


def test_a_scatter_reduce_onnx_cannot_express_is_refused_at_export_with_the_fix(tmp_path):
    from qatkit.errors import QatkitError
    from qatkit.export import export_onnx

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = Net(lambda m, y: y.scatter_reduce(1, m.order.view(1, 8, 1, 1).expand_as(y), y, "amax")).eval()
    qat = qatkit.prepare(model, qatkit.QATConfig(), x[:1])
    qatkit.calibrate(qat, [x])
    with pytest.raises(QatkitError, match=r"scatter_reduce with reduce='amax'.*allowed: no reduce, 'add'/'sum'"):
        export_onnx(qatkit.convert(qat.eval()), tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()
