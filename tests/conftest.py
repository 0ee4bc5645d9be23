"""Shared test helpers: where the project's data sets lie (../shared/data beside the checkout)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("QATKIT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data. Missing data fails the test in CI (CI=true) and skips elsewhere."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI must run with ../shared/data beside the checkout")
        pytest.skip(f"{path} not found (set QATKIT_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests time nothing; with one intra-op thread small ops stay fast even when the 2-core machine is busy
    (torch's thread pool contending with another process slows them down a hundredfold)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prepares_whole(model, example, config=None):
    """qatkit.prepare of a model as its authors wrote it: one graph of the whole model (traced by fx or along the
    example; no module swap) and no op that convert will refuse. The QAT model."""
    import warnings

    from torch import fx

    import qatkit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = qatkit.prepare(model, config or qatkit.QATConfig(), example)
    assert not [str(w.message) for w in caught if "will refuse" in str(w.message)]
    assert isinstance(qat, fx.GraphModule) and not qat.qat_info.untraced, qat.qat_info.untraced
    return qat


def learns_next_token(qat, vocab: int, x, y, lr: float) -> None:
    """QAT of a language model on a next-token rule (y = x shifted): its loss falls below 0.5 in 60 AdamW steps, and
    the integer model predicts as the QAT model does, bit for bit, and right."""
    import torch
    import torch.nn.functional as F

    import qatkit

    qatkit.calibrate(qat, [x])
    qat.train()
    opt = torch.optim.AdamW(qat.parameters(), lr=lr)
    for _ in range(60):
        loss = F.cross_entropy(qat(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    qat.eval()
    integer = qatkit.convert(qat)
    with torch.no_grad():
        assert torch.equal(integer(x), qat(x))
        assert (integer(x).argmax(-1) == y).float().mean() > 0.95


def converts_exactly(qat, model, x, tolerance: float):
    """The calibrated QAT model in eval mode: its outputs within `tolerance` of the float model's, and the integer model
    (returned) computes them bit for bit. x: the input, or a tuple of the inputs."""
    import torch

    import qatkit

    integer = qatkit.convert(qat)
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        expected = qat.eval()(*inputs)
        assert (expected - model(*inputs)).abs().max() < tolerance
        assert torch.equal(integer(*inputs), expected)
    return integer


def runs_in_onnx_runtime(integer, x, path, *, top1: bool = True, float_output: bool = False) -> dict:
    """Export the integer model (example: x's first sample; x a tensor, a tuple or a dict of the model's inputs) and
    run it in ONNX Runtime on x: every output value within one output step of the integer model's (its float islands,
    softmax, norms, may round a value to the next step), the same top-1 (top1); the integer-only reference computes
    ONNX Runtime's outputs exactly, or to float32 rounding where the output is a float op (float_output). verify's
    result."""
    import numpy as np

    from qatkit.export import export_onnx, ort, verify
    from qatkit.export.integer_reference import IntegerReference
    from qatkit.inputs import first

    export_onnx(integer, path, first(x))
    result = verify(path, integer, [(x,)])
    assert result["within_one_step"] == 1.0 and (not top1 or result["top1_agreement"] == 1.0), result
    arrays = ({k: t.numpy() for k, t in x.items()} if isinstance(x, dict)  # the model's inputs by name
              else tuple(t.numpy() for t in x) if isinstance(x, tuple) else x.numpy())
    reference = IntegerReference(path, requant="float32").run(arrays)
    runtime = ort.run(ort.session(path, threads=1), x)
    if float_output:
        np.testing.assert_allclose(reference, runtime, rtol=1e-5, atol=1e-5)
    else:
        assert np.array_equal(reference, runtime)
    return result


def optional_mask():
    """A model whose forward takes an optional mask (`y if mask is None else y.masked_fill(mask, 0)`): fx traces it
    without an example taking the masked way (`mask is None` is False for a placeholder)."""
    from torch import nn

    class OptionalMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None):
            y = self.fc(x)
            return y if mask is None else y.masked_fill(mask, 0.0)

    return OptionalMask()
