"""QAT on a GPU (TrainConfig.device / `--device cuda`): the same numbers as on the CPU, and the whole pipeline.

These run only where torch sees a CUDA device (CI has none: they are reported as skipped there, not passed).
Checked on an NVIDIA H200 with `python -m pytest tests/device -q`; the closing note of that session gives the figures.
"""
from __future__ import annotations

import dataclasses
import json
import signal

import numpy as np
import pytest
import torch

from qatkit import QATConfig, calibrate, convert, prepare
from qatkit.cli import main
from qatkit.config import TrainConfig
from qatkit.data import BatchLoader, load_dataset
from qatkit.kernels import exact_multiplier_scale
from qatkit.models import build_model
from qatkit.primitives import fake_quantize, qrange
from qatkit.primitives.reference import ref_fake_quantize, ref_lsq_grads
from qatkit.train import evaluate, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", [None, 0])
def test_fake_quantize_on_cuda_matches_float64_reference(bits, axis):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(16, 33)) * 3
    x[0, :4] = [0.5, 1.5, -2.5, 0.0]  # ties at scale 1
    channels = 1 if axis is None else x.shape[axis]
    scale = np.exp(rng.uniform(-3, 1, size=channels))
    scale[0] = 1.0
    zp = rng.integers(-2, 2, size=channels).astype(np.float64)
    qmin, qmax = qrange(bits, True, False)
    if axis is None:
        scale, zp = scale[0], zp[0]
    g = rng.normal(size=x.shape)
    xt, st, zt = (torch.tensor(np.asarray(a), dtype=torch.float64, device=CUDA, requires_grad=True)
                  for a in (x, scale, zp))
    out = fake_quantize(xt, st, zt, qmin, qmax, axis)
    out.backward(torch.from_numpy(g).to(CUDA))
    assert torch.equal(out.cpu(), torch.from_numpy(ref_fake_quantize(x, scale, zp, qmin, qmax, axis)))
    for got, want in zip((xt.grad, st.grad, zt.grad), ref_lsq_grads(x, scale, zp, qmin, qmax, axis, g, 1.0)):
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-12, atol=1e-12)


def test_exact_multiplier_scale_same_on_cuda_and_cpu():
    gen = torch.Generator().manual_seed(0)
    s_w = torch.exp(torch.empty(512).uniform_(-9, -3, generator=gen))
    s_in, s_out = torch.tensor(0.0173), torch.tensor(0.0411)
    for bits in (8, 4, 2):
        cpu = exact_multiplier_scale(s_in, s_w, s_out, bits)
        gpu = exact_multiplier_scale(s_in.to(CUDA), s_w.to(CUDA), s_out.to(CUDA), bits)
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def loaders(ds, batch_size=64):
    """(train, test) batches, normalised as `qatkit run` does; on the CPU, moved to the GPU by fit/evaluate."""
    common = dict(mean=ds.mean, std=ds.std)
    return (BatchLoader(ds.train, batch_size=batch_size, shuffle=True, seed=0, **common),
            BatchLoader(ds.test, batch_size=256, shuffle=False, **common))


@pytest.mark.parametrize("qat_options", [{}, {"exact_multipliers": True}, {"power_of_two_scales": True}],
                         ids=["free", "exact", "po2"])
def test_qat_trains_on_cuda_and_its_integer_model_equals_it(digits, qat_options):
    torch.manual_seed(0)
    float_model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8).to(CUDA)
    train = TrainConfig(epochs=2, batch_size=64, device="cuda", progress=False)
    train_batches, test_batches = loaders(digits)
    fit(float_model, train_batches, dataclasses.replace(train, epochs=6))
    qat = prepare(float_model, QATConfig(weight_bits=4, act_bits=4, **qat_options), next(iter(test_batches))[0][:2])
    host = {f"{name}.{b}" for name, m in qat.named_modules() for b in getattr(m, "host_buffers", ())}
    assert host and {p.device.type for p in qat.parameters()} == {"cuda"}
    assert all(b.device.type == ("cpu" if name in host else "cuda") for name, b in qat.named_buffers())
    calibrate(qat, train_batches)  # on the model's device
    history = fit(qat, train_batches, train)
    assert np.isfinite(history[-1]["train_loss"])
    accuracy = evaluate(qat, test_batches)["accuracy"]
    assert accuracy > 0.8
    integer = convert(qat)  # a CPU model; the QAT model stays on the GPU
    assert next(qat.parameters()).device.type == "cuda"
    x = next(iter(test_batches))[0]
    qat.eval()
    with torch.no_grad():
        on_gpu = qat(x.to(CUDA)).cpu()
    assert torch.equal(integer(x), on_gpu)  # the integers the GPU's eval forward computes are the deployed ones
    assert evaluate(integer, test_batches)["accuracy"] == accuracy


@pytest.mark.parametrize("qat_options", [{}, {"power_of_two_scales": True}], ids=["free", "po2"])
def test_qat_training_step_never_waits_for_the_gpu(qat_options):
    """No host-device synchronisation in a QAT step's forward and backward: the host queues kernels ahead of
    the GPU (the training loop reads the loss once per step, as a float step does)."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32).to(CUDA)
    x, y = torch.randn(64, 3, 32, 32, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    qat = prepare(model, QATConfig(weight_bits=4, act_bits=4, **qat_options), x[:2])
    calibrate(qat, [x])
    qat.train()
    torch.nn.functional.cross_entropy(qat(x), y).backward()  # first step: lazy CUDA initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.nn.functional.cross_entropy(qat(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cli_run_on_cuda_exports_and_verifies(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--device", "cuda", "--limit", "256", "--float-epochs", "1", "--epochs", "1",
                 "--weight-bits", "8", "--act-bits", "8", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["train"]["device"] == "cuda"
    qat = next(r for r in results["rows"] if r["method"] == "qat")
    assert qat["integer_model_accuracy"] == qat["accuracy"]
    assert qat["verify"]["top1_agreement"] == 1.0 and qat["verify"]["max_step_diff"] == 0


class StopInSecondEpoch:
    """Train batches that send SIGINT as the second epoch starts: fit stops after that step with last.ckpt
    holding epoch 1, as a run stopped by Ctrl-C does."""

    def __init__(self, batches):
        self.batches, self.epochs = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.epochs += 1
        if self.epochs == 2:
            signal.raise_signal(signal.SIGINT)
        return iter(self.batches)


def test_run_stopped_on_cpu_resumes_on_cuda(tmp_path, digits):
    train = TrainConfig(epochs=2, batch_size=64, progress=False)
    train_batches, test_batches = loaders(digits)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(build_model("small-cnn", num_classes=10, in_channels=1, image_size=8), StopInSecondEpoch(train_batches),
            train, checkpoint_dir=tmp_path)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    history = fit(model, train_batches, dataclasses.replace(train, device="cuda"), checkpoint_dir=tmp_path, resume=True)
    assert [row["epoch"] for row in history] == [1, 2]
    assert next(model.parameters()).device.type == "cuda"
    assert evaluate(model, test_batches)["accuracy"] > 0.5
