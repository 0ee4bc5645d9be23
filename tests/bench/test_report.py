"""bench/report.py on synthetic suite results: tables, acceptance verdicts, plots and the CLI's missing-file error."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpu": "Test CPU", "threads": 2, "torch": "2.x", "onnxruntime": "1.x", "python": "3.x"}


def _row(task, method, bits, acc, std=0.0, seeds=(0,), schedule=None, latency=1.5, ratio=None, verify=None):
    row = {"task": task, "method": method, "weight_bits": bits[0], "act_bits": bits[1], "accuracy": acc,
           "accuracy_std": std, "seeds": list(seeds), "model_bytes": 300_000 if method == "float" else 80_000,
           "onnx_bytes": 90_000, "latency_ms": latency, "step_time_ratio": ratio, "train_seconds": 10.0,
           "verify": verify}
    if schedule is not None:
        row["schedule"] = schedule
    return row


GOOD_VERIFY = {"n": 10000, "top1_agreement": 0.9995, "within_one_step": 1.0, "max_step_diff": 1}
M, C = "mnist-small-cnn", "cifar10-resnet20"
MNIST = {
    "machine": MACHINE, "quick": False,
    "tasks": {M: {"dataset": "mnist", "model": "small-cnn", "train_samples": 60000, "test_samples": 10000,
                  "float_recipe": {}, "qat_recipe": {"epochs": 3, "lr": 1e-4}}},
    "step_times": {M: {"batch": 64, "threads": 2, "rounds": 5,
                       "median_ms": {"float": 10.0, "qat-w8a8": 14.0, "torch.ao-qat-w8a8": 17.0},
                       "ratio_to_float": {"float": 1.0, "qat-w8a8": 1.4, "torch.ao-qat-w8a8": 1.7}}},
    "runs": [],
    "rows": [  # deliberately shuffled: the report orders them
        {**_row(M, "qat", (4, 4), 0.9890, 0.0003, (0, 1, 2), "direct", ratio=1.4), "oscillating": 0.0123},  # -0.31 pp: fails
        _row(M, "torch.ao-qat", (8, 8), 0.9900, 0.0, (0, 1, 2), latency=None, ratio=1.7),
        {**_row(M, "qat", (2, 2), 0.9880, 0.0, (0,), "8-4-2", ratio=1.4), "oscillating": 0.0456},  # progressive only
        _row(M, "ptq-minmax", (8, 8), 0.9915, verify=GOOD_VERIFY),
        _row(M, "float", (32, 32), 0.9921, 0.0004, (0, 1, 2)),
        _row(M, "qat", (8, 8), 0.9915, 0.0002, (0, 1, 2), "direct", ratio=1.4, verify=GOOD_VERIFY),  # -0.06 pp
    ],
}
CIFAR = {
    "machine": MACHINE, "quick": False,
    "tasks": {C: {"dataset": "cifar10", "model": "resnet20", "train_samples": 50000, "test_samples": 10000}},
    "step_times": {C: {"batch": 64, "threads": 2, "rounds": 5,
                       "median_ms": {"float": 100.0, "qat-w8a8": 120.0, "qat-w4a4": 135.0, "torch.ao-qat-w8a8": 177.0},
                       "ratio_to_float": {"float": 1.0, "qat-w8a8": 1.2, "qat-w4a4": 1.35, "torch.ao-qat-w8a8": 1.77}}},
    "runs": [],
    "rows": [
        _row(C, "float", (32, 32), 0.915),
        _row(C, "ptq-minmax", (4, 4), 0.70),
        _row(C, "ptq-mse", (4, 4), 0.80),
        _row(C, "qat", (8, 8), 0.913, schedule="direct", verify=GOOD_VERIFY),  # exactly float - 0.002: passes
        _row(C, "qat", (4, 4), 0.910, schedule="direct"),
    ],
}


def _section(md: str, task: str) -> str:
    start = md.index(f"## {task}")
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else None]


def _check_line(section: str, name: str) -> str:
    lines = [ln for ln in section.splitlines() if ln.startswith("- ") and name in ln]
    assert len(lines) == 1, (name, lines)
    return lines[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_report")
    out = report.write_benchmarks([MNIST, CIFAR], tmp / "BENCHMARKS.md", tmp / "plots",
                                  commands=["python bench/suite.py --quick"])
    return out, tmp / "plots"


def test_markdown_tables(written):
    out, _ = written
    assert out.is_file()
    md = out.read_text(encoding="utf-8")
    assert "Test CPU, 2 threads" in md
    mnist = _section(md, M)
    assert "| float | — | 32/32 | 99.21 ± 0.04 | 3 (0, 1, 2) | — | 300,000 |" in mnist
    assert "| ptq-minmax | — | 8/8 | 99.15 | (1 seed) | -0.06 |" in mnist
    assert "| qat | direct | 4/4 | 98.90 ± 0.03 | 3 (0, 1, 2) | -0.31 |" in mnist
    assert "99.950% / 100.000% (n=10,000)" in mnist
    # order: float, ptq, qat (8/8 direct, 4/4 direct, then 2/2 progressive), torch.ao last
    table = [ln for ln in mnist.splitlines() if ln.startswith("| ") and "---" not in ln][1:7]
    assert [ln.split(" | ")[0][2:] + "/" + ln.split(" | ")[1] + "/" + ln.split(" | ")[2] for ln in table] == [
        "float/—/32/32", "ptq-minmax/—/8/8", "qat/direct/8/8", "qat/direct/4/4", "qat/8-4-2/2/2",
        "torch.ao-qat/—/8/8"]
    assert "| 91.50 | (1 seed) |" in _section(md, C)
    assert "not directly comparable" in md and "Esser et al. 2019" in md and "BitNetMCU" in md
    assert "MobileNetV2" not in md
    assert "python bench/suite.py --quick" in md
    assert "| torch.ao-qat-w8a8 | 177.00 | 1.77 |" in md
    assert "Nagel et al. 2022): qat (direct) W4A4 1.23%, qat (8-4-2) W2A2 4.56%." in mnist


def test_acceptance_verdicts(written):
    md = written[0].read_text(encoding="utf-8")
    mnist, cifar = _section(md, M), _section(md, C)
    assert _check_line(mnist, "float ≥ 99.20%").startswith("- ✔") and "99.21%" in _check_line(mnist, "float ≥")
    line = _check_line(mnist, "QAT W8A8 (direct)")
    assert line.startswith("- ✔") and "Δ -0.060 pp" in line
    line = _check_line(mnist, "QAT W4A4 (direct)")
    assert line.startswith("- ✘") and "98.90% vs float 99.21%" in line and "Δ -0.310 pp, limit -0.200 pp" in line
    line = _check_line(mnist, "QAT W2A2 (direct)")
    assert line.startswith("- ○") and "not measured" in line  # the progressive W2A2 row is not targeted
    line = _check_line(mnist, "below torch.ao")
    assert line.startswith("- ✔") and "1.40 (qat-w8a8) vs 1.70 (torch.ao-qat-w8a8)" in line
    assert _check_line(mnist, "ptq-minmax W8A8 deployment verify").startswith("- ✔")

    assert _check_line(cifar, "QAT W8A8 (direct)").startswith("- ✔")  # exactly at the limit, unrounded
    line = _check_line(cifar, "beats the best PTQ W4A4")
    assert line.startswith("- ✔") and "vs ptq-mse 80.00%" in line and "+11.000 pp" in line
    line = _check_line(cifar, "QAT step / float step ≤ 1.3")
    assert line.startswith("- ✘") and "1.35 (qat-w4a4" in line
    assert _check_line(cifar, "QAT W3A3 (direct)").startswith("- ○")
    assert "### Acceptance (6 met, 1 missed, 2 not measured)" in cifar
    checks = report.acceptance(C, report.merge(CIFAR)["rows"][C], CIFAR["step_times"][C])
    assert [c.name for c in checks if c.status == "fail"] == ["QAT step / float step ≤ 1.3"]


def test_plots_are_pngs(written):
    out, plots = written
    md = out.read_text(encoding="utf-8")
    for name in (f"accuracy_vs_bits_{M}.png", f"accuracy_vs_bits_{C}.png", "size_vs_latency.png"):
        png = plots / name
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{name})" in md


def test_later_file_replaces_same_row():
    newer = dict(CIFAR, rows=[_row(C, "float", (32, 32), 0.92)])
    rows = report.merge([CIFAR, newer])["rows"][C]
    assert [r["accuracy"] for r in rows if r["method"] == "float"] == [0.92]
    assert len(rows) == len(CIFAR["rows"])


def test_missing_results_file(tmp_path, capsys):
    missing = tmp_path / "suite.json"
    assert report.main([str(missing), "--out", str(tmp_path / "B.md")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "run python bench/suite.py first" in err
    assert not (tmp_path / "B.md").exists()


def _agreement_model(task, bits, recipe, e2e, kernels):
    per_kernel = {k: {"equal": v, "values": 1000, "max_steps": 0.0 if v == 1.0 else 1.0} for k, v in kernels.items()}
    return {"task": task, "key": "k", "recipe": recipe, "weight_bits": bits[0], "act_bits": bits[1],
            "qat_accuracy": 0.9190, "images": 2000, "ort_vs_float32": {"equal": 1.0, "values": 20000, "max_steps": 0.0},
            "fixed-point_vs_float32": {"end_to_end": {"equal": e2e, "values": 20000,
                                                      "max_steps": 0.0 if e2e == 1 else 2.0},
                                       "per_kernel": per_kernel},
            "fixed-point-gemmlowp_vs_float32": {"end_to_end": {"equal": 0.43, "values": 20000, "max_steps": 6.0},
                                                "per_kernel": per_kernel}}


def test_deploy_agreement_section(tmp_path):
    """One row per measured model: free, power-of-two scales or exact multipliers (from the experiment's overrides),
    the end-to-end fixed-point agreement with its largest step difference, and the kernel kind with the fewest equal
    outputs."""
    free = {"models": [_agreement_model(C, (8, 8), "qat-recipe-id", 0.99365, {"Conv": 0.99999985, "Add": 1.0})]}
    po2 = {"models": [_agreement_model(C, (4, 4), ["qat.power_of_two_scales=true"], 1.0, {"Conv": 1.0})]}
    exact = {"models": [_agreement_model(C, (8, 8), ["qat.exact_multipliers=true"], 0.9999, {"Add": 0.9999999})]}
    every = {"models": [_agreement_model(C, (8, 8), ["qat.exact_multipliers=true", "qat.exact_adds=true",
                                                     "qat.reduce_range=true"], 1.0, {"Conv": 1.0})]}
    md = report.write_benchmarks(CIFAR, tmp_path / "B.md", tmp_path / "plots",
                                 agreement=[free, po2, exact, every]).read_text()
    section = md.split("## Deploy: the integer-only reference against ONNX Runtime")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {C}")]
    assert len(rows) == 4
    assert "| W8A8 | exact multipliers + exact adds + reduce range |" in rows[3]
    assert "| W8A8 | free | 91.90 | 2,000 | 1 (0) | 0.99365 (2) | 0.99999985 (Conv) | 0.43 (6) |" in rows[0]
    assert "| W4A4 | power of two |" in rows[1] and "| 1 (0) | 1 (0) | 1 (every kernel) |" in rows[1]
    assert "| W8A8 | exact multipliers |" in rows[2] and "| 0.9999 (2) | 0.9999999 (Add) |" in rows[2]
    no_section = report.write_benchmarks(CIFAR, tmp_path / "C.md", tmp_path / "plots").read_text()
    assert "## Deploy" not in no_section


def test_gpu_section(tmp_path):
    """bench/gpu_steps.py's file: one row per (task, batch, variant), float first, its ratio a dash."""
    gpu = {"machine": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}, "rounds": 10, "step_times": {C: {
        "128": {"median_ms": {"qat-w8a8": 59.27, "float": 10.74}, "ratio_to_float": {"qat-w8a8": 5.376}},
        "512": {"median_ms": {"float": 20.55, "qat-w8a8": 57.33}, "ratio_to_float": {"qat-w8a8": 2.8}}}}}
    md = report.write_benchmarks(CIFAR, tmp_path / "B.md", tmp_path / "plots", gpu=gpu).read_text()
    section = md.split("## Training step on a GPU")[1].split("\n## ")[0]
    assert "NVIDIA H200" in section and "10 interleaved rounds" in section
    rows = [line for line in section.splitlines() if line.startswith(f"| {C}")]
    assert rows == [f"| {C} | 128 | float | 10.74 | — |", f"| {C} | 128 | qat-w8a8 | 59.27 | 5.38 |",
                    f"| {C} | 512 | float | 20.55 | — |", f"| {C} | 512 | qat-w8a8 | 57.33 | 2.80 |"]
    assert "## Training step on a GPU" not in report.write_benchmarks(CIFAR, tmp_path / "C.md", tmp_path / "p").read_text()


def test_qat_seeds_section(tmp_path):
    """bench/experiment.py --qat-seed rows beside the suite's row of their float seed: every fine-tune seed's accuracy,
    their mean ± std, the worst against the float row and the target; a row without its suite row is left out."""
    extra = [{"task": C, "method": "qat", "weight_bits": 4, "act_bits": 4, "seed": 0, "qat_seed": 1, "accuracy": 0.906},
             {"task": C, "method": "qat", "weight_bits": 3, "act_bits": 3, "seed": 0, "qat_seed": 1, "accuracy": 0.9}]
    md = report.write_benchmarks(CIFAR, tmp_path / "B.md", tmp_path / "plots", qat_seeds=extra).read_text()
    section = md.split("## QAT fine-tune seeds")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {C}")]
    assert rows == [f"| {C} | 4/4 | 0 | 0: 91.00, 1: 90.60 | 90.80 ± 0.28 | -0.90 | -0.80 |"]
    assert "## QAT fine-tune seeds" not in report.write_benchmarks(CIFAR, tmp_path / "C.md", tmp_path / "p").read_text()


def test_cpu_steps_section(tmp_path):
    """bench/step_times.py's file from another CPU: each task's table, and the ResNet-20 step-ratio limit judged there
    (the acceptance checks stay the suite's machine's)."""
    def steps(qat_ratio):
        return {"batch": 64, "threads": 2, "rounds": 21, "median_ms": {"float": 80.0, "qat-w4a4": 80.0 * qat_ratio},
                "ratio_to_float": {"qat-w4a4": qat_ratio, "torch.ao-qat-w8a8": 1.73}}
    files = [{"machine": {**MACHINE, "cpu": f"CPU {i}", "cpu_capability": "AVX512"}, "step_times": {C: steps(r)}}
             for i, r in enumerate((1.27, 1.34))]
    md = report.write_benchmarks(CIFAR, tmp_path / "B.md", tmp_path / "plots", cpu_steps=files).read_text()
    section = md.split("## Training step on other CPUs")[1].split("\n## ")[0]
    first, second = section.split("### CPU 0, AVX512 (torch 2.x)")[1].split("### CPU 1, AVX512 (torch 2.x)")
    assert "| qat-w4a4 | 101.60 | 1.27 |" in first and "| qat-w4a4 | 107.20 | 1.34 |" in second
    assert "Largest QAT ratio 1.27 (qat-w4a4; limit 1.30: met), torch.ao 1.73." in first
    assert "Largest QAT ratio 1.34 (qat-w4a4; limit 1.30: **missed**), torch.ao 1.73." in second
    assert "## Training step on other CPUs" not in report.write_benchmarks(CIFAR, tmp_path / "C.md", tmp_path / "p").read_text()


def test_missing_agreement_file(tmp_path, capsys):
    missing = tmp_path / "deploy_agreement.json"
    suite = tmp_path / "suite.json"
    suite.write_text(__import__("json").dumps(CIFAR))
    assert report.main([str(suite), "--agreement", str(missing), "--out", str(tmp_path / "B.md")]) == 2
    assert "run python bench/deploy_agreement.py first" in capsys.readouterr().err
    assert not (tmp_path / "B.md").exists()


def test_latency_section(tmp_path):
    """bench/latency.py's files: one row per (variant, batch) with the medians and the per-round ratio medians."""
    def file(batch32_int8: float, ratio: float, **options) -> dict:
        rows = [{"runtime": rt, "batch": 32, "median_ms": ms} for rt, ms in
                (("ort-fp32", 26.0), ("ort-int8-qatkit", batch32_int8), ("ort-int8-quantize_static", 15.9))]
        return {"machine": "Test CPU", "ort_version": "1.x", "threads": 2, "rounds": 61, "rows": rows,
                "ratios": [{"batch": 32, "qatkit_int8_vs_ort_fp32": ratio, "qatkit_int8_vs_quantize_static": 0.95}],
                **options}
    latency = [file(29.87, 1.131), file(15.04, 0.5649, reduce_range=True, exact_adds=True)]
    md = report.write_benchmarks(CIFAR, tmp_path / "B.md", tmp_path / "plots", latency=latency).read_text()
    section = md.split("## Deploy: ResNet-20 latency in ONNX Runtime")[1].split("\n## ")[0]
    assert "Test CPU" in section and "2 threads" in section
    assert [line for line in section.splitlines() if line.startswith("| defaults") or line.startswith("| reduce")] == [
        "| defaults | 32 | 29.87 | 26.00 | 15.90 | 1.131 | 0.950 | 61 |",
        "| reduce range + exact adds | 32 | 15.04 | 26.00 | 15.90 | 0.565 | 0.950 | 61 |"]
    assert "## Deploy: ResNet-20 latency" not in report.write_benchmarks(CIFAR, tmp_path / "C.md", tmp_path / "p").read_text()


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_a_missing_qat_step_ratio_is_not_measured_not_passed(bad):
    """A NaN or missing ratio was skipped, and the largest of the others passed the ≤ 1.3 target."""
    step_times = {"ratio_to_float": {"float": 1.0, "qat-w8a8": 1.2, "qat-w4a4": bad, "torch.ao-qat-w8a8": 1.77}}
    checks = {c.name: c for c in report.acceptance(C, report.merge(CIFAR)["rows"][C], step_times)}
    assert checks["QAT step / float step ≤ 1.3"].status == "not measured"
    assert checks["QAT step / float step below torch.ao's"].status == "not measured"
