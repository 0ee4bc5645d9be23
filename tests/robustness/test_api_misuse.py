"""Mistakes made with the Python API: each a one-line qatkit error naming the value, what is allowed and the fix (they
were raw tracebacks, or silent: a batch-0 example traced the model's empty-batch branch, calibrate of a float model
calibrated nothing, convert of a traced float model returned an unquantized 'integer' model, verify of no batches
reported agreement 0.0)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qatkit
from qatkit.data import BatchLoader, load_dataset
from qatkit.errors import ConfigError, DataError
from qatkit.export import export_onnx, verify


class EarlyExit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[0] == 0:
            return x.new_zeros(0, 3)
        return self.fc(x)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    qat = qatkit.prepare(float_model, qatkit.QATConfig(), torch.randn(2, 6))
    qatkit.calibrate(qat, [torch.randn(16, 6)])
    return float_model, qat, qatkit.convert(qat)


TRAIN, TRAIN_DISTILL = qatkit.TrainConfig(epochs=1), qatkit.TrainConfig(epochs=1, distill=0.5)


def _batches():
    return [(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))]


CASES = {
    "prepare a batch-0 example": (lambda f, q, i, tmp: qatkit.prepare(EarlyExit(), None, torch.zeros(0, 6)), DataError,
                                  r"^example input 'x' = 'a batch of 0 \(\(0, 6\)\)' is not allowed"),
    "prepare a QAT model": (lambda f, q, i, tmp: qatkit.prepare(q, qatkit.QATConfig(), torch.randn(2, 6)),
                            ConfigError, r"^model = \"a QAT model \(qatkit\.prepare's already\)\" is not allowed"),
    "calibrate a float model": (lambda f, q, i, tmp: qatkit.calibrate(f, [torch.randn(4, 6)]), ConfigError,
                                r"^the model calibrate takes = 'a Sequential without quantizers' is not allowed"),
    "calibrate an integer model": (lambda f, q, i, tmp: qatkit.calibrate(i, [torch.randn(4, 6)]), ConfigError,
                                   r"^the model calibrate takes = \"an integer model \(qatkit\.convert's\)\""),
    "convert a traced float model": (lambda f, q, i, tmp: qatkit.convert(torch.fx.symbolic_trace(f)), ConfigError,
                                     r"^the model convert takes = 'a Sequential without quantizers'"),
    "save a QAT model": (lambda f, q, i, tmp: qatkit.save(q, tmp / "m.safetensors"), ConfigError,
                         r"^save writes integer models, not a Sequential; .+Fix: qatkit\.save\(qatkit\.convert"),
    "save to a folder": (lambda f, q, i, tmp: qatkit.save(i, tmp), ConfigError, r"is a folder; allowed: a file path"),
    "save to a path ending in /": (lambda f, q, i, tmp: qatkit.save(i, f"{tmp}/new/"), ConfigError,
                                   r"names no file; allowed: a file path"),
    "export under a file": (lambda f, q, i, tmp: export_onnx(i, tmp / "m.safetensors" / "m.onnx", torch.randn(1, 6)),
                            ConfigError, r"is under the file .+m\.safetensors'"),
    "fit an integer model": (lambda f, q, i, tmp: qatkit.fit(i, _batches(), qatkit.TrainConfig(epochs=1)), ConfigError,
                             r"^the model fit trains = 'IntegerModel' is not allowed"),
    "fit with itself as teacher": (lambda f, q, i, tmp: qatkit.fit(q, _batches(), TRAIN_DISTILL, teacher=q),
                                   ConfigError, r"^teacher = 'the model itself' is not allowed"),
    "fit with a teacher of other classes": (lambda f, q, i, tmp: qatkit.fit(q, _batches(), TRAIN_DISTILL,
                                                                             teacher=nn.Linear(6, 5)),
                                            ConfigError, r"^the teacher's logits = 'of shape \(4, 5\)' is not allowed"),
    "fit into a checkpoint_dir that is a file": (
        lambda f, q, i, tmp: qatkit.fit(q, _batches(), TRAIN, checkpoint_dir=tmp / "m.safetensors"),
        ConfigError, r"^checkpoint_dir = .+ is not allowed; allowed: a folder"),
    "verify no batches": (lambda f, q, i, tmp: verify(tmp / "m.onnx", i, []), DataError, r"^verify got no batches"),
    "evaluate on device 'gpu'": (lambda f, q, i, tmp: qatkit.evaluate(q, _batches(), device="gpu"), ConfigError,
                                 r"^device = 'gpu' is not allowed; allowed: 'cpu', 'cuda' or 'cuda:N'"),
    "a 5000-digit bit-width": (lambda f, q, i, tmp: qatkit.QATConfig(weight_bits=10 ** 5000), ConfigError,
                               r"= an integer of about 5001 digits is not allowed"),
}


@pytest.mark.parametrize("case", CASES)
def test_api_mistakes_are_refused_with_the_fix(case, models, tmp_path):
    call, cls, pattern = CASES[case]
    qatkit.save(models[2], tmp_path / "m.safetensors")
    export_onnx(models[2], tmp_path / "m.onnx", torch.randn(1, 6))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(cls, match=pattern):
        call(*models, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("kwargs, pattern", [
    ({"std": [float("nan")]}, r"expected 1 finite numbers each, std > 0"),
    ({"shuffle": "no"}, r"^shuffle = 'no' is not allowed; allowed: True or False"),
    ({"batch_size": True}, r"^batch_size = True is not allowed"),
    ({"mean": 0.5, "std": 0.2}, r"^mean 0\.5 / std 0\.2 do not fit 1-channel images"),
])
def test_batch_loader_arguments_are_checked(kwargs, pattern):
    """A NaN std made every batch NaN; shuffle='no' shuffled; True counted as a batch size of 1."""
    ds = load_dataset("digits")
    with pytest.raises(ConfigError, match=pattern):
        BatchLoader(ds.train, **{"batch_size": 4, "mean": ds.mean, "std": ds.std, "shuffle": False, **kwargs})
    with pytest.raises(ConfigError, match=r"^split = 'ImageDataset' is not allowed; .+Fix: pass ds\.train"):
        BatchLoader(ds, batch_size=4, mean=ds.mean, std=ds.std, shuffle=False)


def test_inputs_of_another_kind_than_the_example_are_refused(models, tmp_path):
    """uint8 pixels went into a QAT model prepared on float images (the float model refuses them: the input quantizer
    took them as they were), and an integer example made export write an INT64 input for an image model."""
    _, qat, integer = models
    pixels = torch.randint(0, 255, (4, 6), dtype=torch.uint8)
    for model in (qat, integer):
        with pytest.raises(DataError, match=r"^input '.+' holds uint8 values; this model takes float values .+Fix: "
                                            r"convert and normalise"):
            model(pixels)
    with pytest.raises(DataError, match=r"holds int64 values; this model takes float values"):
        export_onnx(integer, tmp_path / "m.onnx", torch.zeros(1, 6, dtype=torch.long))
    assert not (tmp_path / "m.onnx").exists()
    ids_model = qatkit.prepare(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)), None,
                               torch.randint(0, 10, (2, 3)))
    with pytest.raises(DataError, match=r"holds float32 values; this model takes integer values .+Fix: pass the "):
        ids_model(torch.rand(2, 3))
    reloaded = qatkit.load(qatkit.save(integer, tmp_path / "m.safetensors"))
    assert next(n for n in reloaded.nodes if n["op"] == "input")["kind"] == "float"
