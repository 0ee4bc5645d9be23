"""Every zoo model: prepare → one training step → convert → save → load gives the QAT model's outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import qatkit
from qatkit.data import BatchLoader, load_dataset
from qatkit.models import MODEL_NAMES, build_model


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_prepare_train_convert_reload(name, bits, tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model = build_model(name, num_classes=10, in_channels=1, image_size=8)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=bits, act_bits=bits, first_last_bits=None), x[:2])
    assert len(qat.qat_info.layers) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    qatkit.calibrate(qat, [x], num_batches=1)
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    scales = {n: p.detach().clone() for n, p in qat.named_parameters() if n.endswith(".scale")}
    F.cross_entropy(qat(x), y).backward()
    opt.step()
    assert any(not torch.equal(p, dict(qat.named_parameters())[n]) for n, p in scales.items())  # LSQ steps learn
    qat.eval()
    expected = qat(x)
    path = qatkit.save(qatkit.convert(qat), tmp_path / "m.safetensors")
    assert torch.equal(qatkit.load(path)(x), expected)  # the same integers, bit for bit


def test_digits_integer_model_matches_qat_on_whole_test_split(tmp_path):
    ds = load_dataset("digits")
    train = BatchLoader(ds.train, batch_size=64, mean=ds.mean, std=ds.std, shuffle=True)
    test_x = next(iter(BatchLoader(ds.test, batch_size=len(ds.test), mean=ds.mean, std=ds.std, shuffle=False)))[0]
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    qatkit.fit(model, train, qatkit.TrainConfig(epochs=2, progress=False))
    for bits in (8, 4):
        qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=bits, act_bits=bits), test_x[:2])
        qatkit.calibrate(qat, train, num_batches=4)
        qat.eval()
        want = qat(test_x)
        got = qatkit.load(qatkit.save(qatkit.convert(qat), tmp_path / f"w{bits}.safetensors"))(test_x)
        assert torch.equal(got.argmax(1), want.argmax(1))
        assert (got - want).abs().max() <= 1e-4 * (want.max() - want.min())


def test_resnet18_file_sizes(tmp_path):
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=32)
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000
    float_path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_path))
    x = torch.randn(2, 3, 32, 32)
    ratios = {}
    for bits in (8, 4):
        qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=bits, act_bits=bits), x)
        qatkit.calibrate(qat, [x], num_batches=1)
        path = qatkit.save(qatkit.convert(qat), tmp_path / f"int{bits}.safetensors")
        ratios[bits] = path.stat().st_size / float_path.stat().st_size
    assert ratios[8] <= 0.27 and ratios[4] <= 0.15, ratios
