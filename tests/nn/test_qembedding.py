"""QEmbedding: per-row quantized tables, against a float64 reference; its gradients; and the same rows from the
integer model file, ONNX Runtime and the integer reference."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qatkit
from qatkit.config import QATConfig
from qatkit.export import export_onnx
from qatkit.export.integer_reference import IntegerReference
from qatkit.export.ort import output_steps, run, session
from qatkit.models import TinyTransformer
from qatkit.nn import QEmbedding

CFG = QATConfig()


def make(bits: int, per_channel: bool = True, seed: int = 0) -> tuple[QEmbedding, torch.Tensor]:
    torch.manual_seed(seed)
    emb = nn.Embedding(40, 16, padding_idx=0)
    with torch.no_grad():
        emb.weight.mul_(torch.linspace(0.1, 3.0, 40)[:, None])  # rows of very different ranges
    layer = QEmbedding(emb, CFG.weight_spec(bits, per_channel))
    with torch.no_grad():
        layer.weight_quant.init_from(layer.weight)
    return layer, torch.randint(0, 40, (5, 7))


@pytest.mark.parametrize("bits, per_channel", [(8, True), (4, True), (2, True), (8, False), (4, False)])
def test_rows_are_codes_times_their_scale_float64(bits, per_channel):
    layer, ids = make(bits, per_channel)
    s = layer.weight_quant.qparams()[0].double().expand(40)[:, None]  # (V, 1)
    lo, hi = layer.weight_quant.qrange
    assert (lo, hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    codes = torch.clamp(torch.round(layer.weight.detach().double() / s), lo, hi)
    expected = (codes * s).float()[ids]  # exact product of float32 values, rounded once to float32
    layer.eval()
    got_eval = layer(ids)
    layer.train()
    got_train = layer(ids)
    assert torch.equal(got_eval, expected)
    assert torch.equal(got_train.detach(), expected)  # training looks rows up in the same fake-quantized table
    if per_channel:  # each row's range is its own: the widest row does not coarsen the narrowest
        assert float(s[1]) < float(s[39]) / 10


def test_gradients_reach_looked_up_rows_and_their_scales():
    layer, ids = make(4)
    layer.train()
    (layer(ids) * torch.randn(5, 7, 16)).sum().backward()
    used = torch.zeros(40, dtype=torch.bool)
    used[ids.unique()] = True
    used[0] = False  # padding_idx: no gradient, as nn.Embedding
    row_grad = layer.weight.grad.abs().sum(1)
    assert bool((row_grad[used] > 0).all()) and bool((row_grad[~used] == 0).all())
    scale_grad = layer.weight_quant.scale.grad.abs()
    assert bool((scale_grad[used] > 0).all()) and bool((scale_grad[~used] == 0).all())


def test_plain_embedding_options_only():
    with pytest.raises(ValueError, match=r"max_norm.*Fix"):
        QEmbedding(nn.Embedding(5, 4, max_norm=1.0), CFG.weight_spec(8, True))


@pytest.mark.parametrize("bits", [8, 4])
def test_token_transformer_file_onnxruntime_and_reference_agree(tmp_path, bits):
    """The embedding is the first layer (8 bits by default; here every layer at `bits`); the integer model file,
    ONNX Runtime (int64 ids in, int8 table gathered) and the integer reference compute the QAT model's outputs."""
    torch.manual_seed(1)
    model = TinyTransformer(3, vocab_size=60, max_len=10)
    ids = torch.randint(1, 60, (32, 10))
    ids[::2, 6:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = qatkit.prepare(model, QATConfig(weight_bits=bits, act_bits=bits, first_last_bits=None), ids)
    assert isinstance(qat.embed, QEmbedding) and int(qat.embed.weight_quant.bits) == bits
    qatkit.calibrate(qat, [(ids, None)], num_batches=1)
    qat.eval()
    expected = qat(ids)
    integer = qatkit.convert(qat)
    qatkit.save(integer, tmp_path / "m.safetensors")
    loaded = qatkit.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded(ids), expected)
    emb_node = next(n for n in loaded.nodes if n["op"] == "qembed")
    assert loaded.tensor(emb_node["weight"]["tensor"]).numel() == 60 * 64 * bits // 8  # packed codes
    notes = export_onnx(loaded, tmp_path / "m.onnx", ids[:1])
    sess = session(tmp_path / "m.onnx")
    assert sess.get_inputs()[0].type == "tensor(int64)"
    assert np.array_equal(run(sess, ids), expected.numpy())
    # the reference runs the float islands (attention, LayerNorm) in numpy float32: within one output step
    (step,) = output_steps(integer, ids)
    diff = np.abs(IntegerReference(tmp_path / "m.onnx").run(ids.numpy()) - expected.numpy()) / step
    assert diff.max() <= 1.0 + 1e-4
    assert (bits < 8) == any("embedding codes are stored as int8" in n for n in notes)
