"""qatkit.export.bench on a tiny model: the report's shape, not its speeds (those belong in benchmarks)."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
import torch  # noqa: E402

import qatkit  # noqa: E402
from qatkit.export.bench import RUNTIMES, bench, format_table  # noqa: E402
from qatkit.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 1, 8, 8, generator=gen) for _ in range(3)]
    qat = qatkit.prepare(model, qatkit.QATConfig(), calib[0])
    qatkit.calibrate(qat, calib)
    qat.eval()
    workdir = tmp_path_factory.mktemp("bench")
    out = bench(model, qat, calib[0], calib, batches=(1, 4), threads=1, rounds=3, warmup=1, workdir=workdir)
    out["workdir"] = workdir
    return out


def test_rows_cover_every_runtime_and_batch(result):
    assert {(r["runtime"], r["batch"]) for r in result["rows"]} == {(n, b) for n in RUNTIMES for b in (1, 4)}
    assert len(result["rows"]) == len(RUNTIMES) * 2
    for r in result["rows"]:
        assert r["median_ms"] > 0 and r["p10_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["model_bytes"] > 0


def test_ratios_per_batch(result):
    assert [r["batch"] for r in result["ratios"]] == [1, 4]
    for r in result["ratios"]:
        assert len(r["per_round"]) == 3
        assert r["qatkit_int8_vs_ort_fp32"] > 0 and r["qatkit_int8_vs_quantize_static"] > 0
    assert result["rounds"] == 3 and result["threads"] == 1
    assert result["machine"] and result["ort_version"] and result["torch_version"]


def test_int8_file_is_smaller_than_float(result):
    size = {r["runtime"]: r["model_bytes"] for r in result["rows"]}
    assert size["ort-int8-qatkit"] < size["ort-fp32"]


def test_temporary_files_removed(result):
    assert list(result["workdir"].iterdir()) == []


def test_format_table_names_every_runtime(result):
    table = format_table(result)
    for name in RUNTIMES:
        assert name in table


def test_agreement_is_over_every_calibration_sample():
    """It was over one sample (0.0 or 1.0; 0.000 printed where 256 samples agree at 0.781)."""
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 1, 8, 8, generator=gen) for _ in range(3)]
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=2, act_bits=2), calib[0])
    qatkit.calibrate(qat, calib)
    out = bench(model, qat.eval(), calib[0], calib, batches=(1,), threads=1, rounds=1, warmup=0)
    x = torch.cat(calib)
    with torch.no_grad():
        expected = float((qatkit.convert(qat)(x).argmax(1) == model(x).argmax(1)).double().mean())
    assert out["top1_agreement_vs_torch_fp32"]["ort-int8-qatkit"] == pytest.approx(expected, abs=1 / 24)
    assert all(abs(v * 24 - round(v * 24)) < 1e-9 for v in out["top1_agreement_vs_torch_fp32"].values())  # of 24
