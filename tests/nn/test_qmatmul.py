"""QMatMul: the matmul of two activations (attention's Q·Kᵀ and weights·V) on integers, as QLinearMatMul."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qatkit
from qatkit.models import build_model
from qatkit.nn import QMatMul
from qatkit.quantizer import FakeQuantizer


def _quantizer(x: torch.Tensor, bits: int = 8) -> FakeQuantizer:
    q = FakeQuantizer(qatkit.QATConfig(act_init="minmax").act_spec(bits), kind="act")  # uint8, zero point
    q.init_from(x)
    return q


@pytest.mark.parametrize("seed", range(5))
def test_integer_forward_equals_a_float64_reference(seed):
    """acc = (q_a − z_a)(q_b − z_b) summed exactly; codes = clamp(rint(f32(acc)·f32(s_a·s_b/s_y)) + z_y)."""
    torch.manual_seed(seed)
    a, b = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 16, 5) * 2
    qa, qb = _quantizer(a), _quantizer(b)
    mm = QMatMul(qatkit.QATConfig(act_init="minmax").act_spec(8))
    mm.out_quant.init_from(a @ b)
    mm.eval()
    assert qa.qrange == qb.qrange == mm.out_quant.qrange == (0, 255)
    got = mm(a, b, qa, qb)
    (s_a, z_a), (s_b, z_b), (s_y, z_y) = qa.qparams(), qb.qparams(), mm.out_quant.qparams()
    ca = np.clip(np.rint(a.double().numpy() / float(s_a)) + float(z_a), 0, 255) - float(z_a)
    cb = np.clip(np.rint(b.double().numpy() / float(s_b)) + float(z_b), 0, 255) - float(z_b)
    acc = np.matmul(ca, cb)  # integers, exact in float64
    m = np.float32(np.float32(s_a) * np.float32(s_b)) / np.float32(s_y)
    codes = np.clip(np.rint(acc.astype(np.float32) * m) + float(z_y), 0, 255)
    expected = (codes - float(z_y)) * float(s_y)
    assert np.array_equal(got.numpy(), expected.astype(np.float32))


def test_training_forward_fake_quantizes_the_product_and_trains_the_scales():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    mm = QMatMul(qatkit.QATConfig(act_init="minmax").act_spec(8))
    mm.out_quant.init_from((a @ b).detach())
    y = mm(a, b)
    assert (y - a @ b).abs().max() <= float(mm.out_quant.qparams()[0]) / 2 + 1e-6  # within half a step
    y.square().sum().backward()
    assert a.grad is not None and b.grad is not None and mm.out_quant.scale.grad is not None


def test_prepare_quantizes_attention_matmuls_unless_matmul_bits_is_none():
    model = build_model("tiny-transformer", num_classes=10, in_channels=1, image_size=8)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=4, act_bits=4))
    matmuls = [m for m in qat.modules() if isinstance(m, QMatMul)]
    # inputs at matmul_bits (8), not act_bits: the qkv projections' outputs and the attention weights (softmax)
    assert [int(q.bits) for name, q in qat.named_modules() if name.startswith("quant_softmax")] == [8, 8]
    assert all(int(qat.get_submodule(f"blocks.{i}.attn.qkv").out_quant.bits) == 8 for i in (0, 1))
    # outputs: the logits Q·Kᵀ (into softmax, float) at 8 bits; weights·V straight at the 4 bits its projection reads
    assert sorted(int(m.out_quant.bits) for m in matmuls) == [4, 4, 8, 8]
    assert not any("matmul" in op for op in qat.qat_info.float_ops)
    floats = qatkit.prepare(model, qatkit.QATConfig(matmul_bits=None))
    assert not any(isinstance(m, QMatMul) for m in floats.modules())
    assert sum("(matmul)" in op for op in floats.qat_info.float_ops) == 4


class WeightMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) @ self.w  # a weight, not an activation: no QLinearMatMul


def test_a_matmul_with_a_parameter_is_a_layer_not_a_matmul_of_activations():
    qat = qatkit.prepare(WeightMatmul(), qatkit.QATConfig())
    assert not any(isinstance(m, QMatMul) for m in qat.modules()) and not qat.qat_info.float_ops
    assert [r["name"] for r in qat.qat_info.layers] == ["fc", "w_linear"]  # (tests/prepare/test_layer_subclasses.py)
