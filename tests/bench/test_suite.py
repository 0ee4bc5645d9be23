"""bench/suite.py --quick end to end on MNIST, CIFAR-10 and SST-2 subsets (the pipeline, not the accuracy): every
planned row with the documented fields, W8A8 exports that ONNX Runtime runs as qatkit computes, timing
sections, a second call that resumes without redoing a run, and BENCHMARKS.md written from the results."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_data

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import report  # noqa: E402
import suite  # noqa: E402

FIELDS = {"task", "method", "weight_bits", "act_bits", "accuracy", "accuracy_std", "seeds", "model_bytes",
          "step_time_ratio", "schedule", "onnx_bytes", "latency_ms", "train_seconds", "verify"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    data = shared_data("mnist").parent
    shared_data("cifar10")
    shared_data("sst2")
    work = tmp_path_factory.mktemp("suite")
    out = work / "quick.json"
    threads = torch.get_num_threads()
    try:
        assert suite.main(["--quick", "--data", str(data), "--work", str(work), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return work, out, json.loads(out.read_text())


def test_every_planned_row_is_there(quick):
    _, _, results = quick
    assert results["quick"] is True
    for task in suite.TASKS:
        rows = [r for r in results["rows"] if r["task"] == task]
        want = {(m, w, a, s) for m, w, a, s, _ in suite.planned_runs(suite.TASKS[task], [0])}
        assert {(r["method"], r["weight_bits"], r["act_bits"], r["schedule"]) for r in rows} == want
        for r in rows:
            assert FIELDS <= set(r), r
            assert 0.0 <= r["accuracy"] <= 1.0 and r["seeds"] == [0] and r["accuracy_std"] == 0.0
            assert r["model_bytes"] > 0
            if r["method"] not in ("torch.ao-qat",):
                assert r["latency_ms"] > 0 and r["onnx_bytes"] > 0
            if r["method"] in ("qat", "torch.ao-qat"):
                assert r["step_time_ratio"] > 0 and r["train_seconds"] > 0
            else:
                assert r["step_time_ratio"] is None
            if r["method"] == "qat" and r["weight_bits"] < 8:  # the recipe tracks oscillating weights
                assert 0.0 <= r["oscillating"] <= 1.0, r
            else:
                assert r["oscillating"] is None, r
        by = {(r["method"], r["weight_bits"], r["act_bits"]): r for r in rows if r["schedule"] in (None, "direct")}
        # integer models shrink with the bit-width; the float row is the float safetensors file
        sizes = [by[("qat", b, b)]["model_bytes"] for b in (2, 4, 8) if ("qat", b, b) in by]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes) and sizes[-1] < by[("float", 32, 32)]["model_bytes"]
    text = {(r["method"], r["weight_bits"]) for r in results["rows"] if r["task"] == "sst2-transformer"}
    assert text == {("float", 32)} | {(m, b) for m in ("ptq-minmax", "ptq-mse", "qat") for b in (8, 4)}


def test_planned_runs_train_the_targeted_rows_of_every_seed_first():
    runs = suite.planned_runs(suite.TASKS["mnist-small-cnn"], [0, 1, 2])
    assert len(runs) == len(set(runs)) == 3 * (1 + 2 * len(suite.PAIRS) + len(suite.QAT_ORDER) + 1
                                               + len(suite.PROGRESSIVE))
    trained = [r for r in runs if r[0] in ("qat", "torch.ao-qat")]
    assert all(r[0] not in ("qat", "torch.ao-qat") for r in runs[:len(runs) - len(trained)])  # float and PTQ first
    # every seed's W4A4, W8A8 and W2A2 (the rows both tasks target) before any other training run
    assert {(r[1], r[2], r[4]) for r in trained[:9]} == {(b, b, s) for b in (4, 8, 2) for s in (0, 1, 2)}
    assert [r[4] for r in trained[:3]] == [0, 1, 2]


def test_qat_and_w8a8_exports_compute_what_qatkit_computes(quick):
    """Every QAT row (2 to 8 bits) and every W8A8 row: ONNX Runtime computes qatkit's integers. The transformer's
    float softmax, LayerNorm and GELU may round a value differently in ONNX Runtime (its integer kernels are exact:
    tests/export/test_integer_reference.py); a quantized attention weight one step off then moves an output by up to
    two steps, on a few of its 512 output values at most."""
    _, _, results = quick
    verified = [r for r in results["rows"] if r["method"] == "qat"
                or ((r["weight_bits"], r["act_bits"]) == (8, 8) and r["method"] != "torch.ao-qat")]
    assert len(verified) == sum(len(suite.pairs_of(t)) + len(suite.PROGRESSIVE) * t.baselines + 2 for t in suite.TASKS.values())
    for r in verified:
        assert r["verify"]["n"] == suite.QUICK["test"]
        text = r["task"] == "sst2-transformer"
        assert r["verify"]["top1_agreement"] == 1.0 and r["verify"]["within_one_step"] >= (0.99 if text else 1.0), r
        assert r["verify"]["max_step_diff"] <= (2.0 if text else 0.0), r


def test_timing_sections(quick):
    _, _, results = quick
    for task in suite.TASKS:
        steps = results["step_times"][task]
        assert steps["batch"] == 64 and steps["threads"] == 2
        baseline = {"torch.ao-qat-w8a8"} if suite.TASKS[task].baselines else set()
        assert set(steps["ratio_to_float"]) == {f"qat-w{w}a{a}" for w, a in suite.pairs_of(suite.TASKS[task])} | baseline
        assert all(ms > 0 for ms in steps["median_ms"].values())
        assert len(results["latency_ms"][task]) == len([r for r in results["rows"] if r["task"] == task and r["onnx_bytes"]])


def test_second_call_resumes_without_rerunning(quick, capsys):
    work, out, results = quick
    assert suite.main(["--quick", "--tasks", "mnist-small-cnn", "--no-timing", "--data", str(shared_data("mnist").parent),
                       "--work", str(work), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["runs"] == results["runs"]
    assert "accuracy" not in capsys.readouterr().out  # no run was logged: all came from the file


def test_timing_only_measures_and_runs_nothing(quick, monkeypatch, capsys):
    """--timing-only: the timing sections measured again, the runs left as they are (also those of a changed recipe)."""
    work, out, results = quick
    task = suite.TASKS["mnist-small-cnn"]
    monkeypatch.setitem(suite.TASKS, task.name, dataclasses.replace(task, qat_train_at={"w4a4": {"lr": 3e-4}}))
    assert suite.main(["--quick", "--tasks", task.name, "--timing-only", "--data", str(shared_data("mnist").parent),
                       "--work", str(work), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["runs"] == results["runs"] and "accuracy" not in capsys.readouterr().out
    assert again["tasks"] == results["tasks"]  # the recipes of the runs, not the changed one
    for section in ("latency_ms", "step_times"):  # measured again: new figures, the same models
        assert again[section][task.name] != results[section][task.name]
    assert again["latency_ms"][task.name].keys() == results["latency_ms"][task.name].keys()


def test_recipe_changed_at_some_bits_reruns_only_their_qat_rows(quick, monkeypatch, capsys):
    """A fine-tune changed at W2A2 (Task.qat_train_at) reruns the W2A2 QAT rows, direct and progressive, only."""
    work, out, results = quick
    task = suite.TASKS["mnist-small-cnn"]
    changed = dataclasses.replace(task, qat_train_at={"w2a2": {"lr": 2e-4}})
    assert changed.qat_recipe(2, 2).lr == 2e-4 and changed.qat_recipe(4, 4) == task.qat_train
    monkeypatch.setitem(suite.TASKS, task.name, changed)
    assert suite.main(["--quick", "--tasks", task.name, "--no-timing", "--data", str(shared_data("mnist").parent),
                       "--work", str(work), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    before = {r["key"]: r for r in results["runs"] if r["task"] == task.name}
    after = {r["key"]: r for r in again["runs"] if r["task"] == task.name}
    rerun = {k for k in after if after[k]["recipe"] != before[k]["recipe"]}
    assert rerun == {"qat-w2a2-s0", "qat-w2a2-8-4-2-s0"}
    assert capsys.readouterr().out.count("accuracy") == len(rerun)
    assert all(after[k] == before[k] for k in after.keys() - rerun)
    assert again["tasks"][task.name]["qat_recipe_at"] == {"w2a2": {"lr": 2e-4}}


def test_changed_recipe_runs_again(quick, monkeypatch, capsys):
    """Runs made with another recipe are stale: dropped and run again (and their QAT checkpoints not resumed)."""
    work, out, results = quick
    task = suite.TASKS["mnist-small-cnn"]
    monkeypatch.setitem(suite.TASKS, task.name, dataclasses.replace(task, qat_train=dataclasses.replace(task.qat_train, lr=1e-4)))
    assert suite.main(["--quick", "--tasks", task.name, "--no-timing", "--data", str(shared_data("mnist").parent),
                       "--work", str(work), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    new = {r["key"] for r in again["runs"] if r["task"] == task.name}
    old = {r["key"] for r in results["runs"] if r["task"] == task.name}
    assert new == old and capsys.readouterr().out.count("accuracy") == len(old)
    changed = suite.TASKS[task.name]
    assert all(r["recipe"] == suite.recipe_id(changed, r["method"], r["weight_bits"], r["act_bits"])
               for r in again["runs"] if r["task"] == task.name)
    assert len({r["recipe"] for r in again["runs"] if r["task"] == task.name}) == 1  # no per-bits changes here


def test_quick_and_full_results_do_not_mix(quick):
    work, out, _ = quick
    with pytest.raises(SystemExit) as e:
        suite.main(["--tasks", "mnist-small-cnn", "--work", str(work), "--out", str(out)])
    assert e.value.code == 2


def test_report_from_quick_results(quick):
    work, out, _ = quick
    md = report.write_benchmarks(json.loads(out.read_text()), work / "BENCHMARKS.md", work / "plots")
    text = md.read_text()
    assert "Quick smoke run" in text and "## cifar10-resnet20" in text and "## mnist-small-cnn" in text
    assert (work / "plots" / "size_vs_latency.png").stat().st_size > 1000


def test_rows_follow_the_runs_of_a_suite_cut_off(tmp_path, monkeypatch):
    """After each run the results file holds the rows aggregated from the runs so far."""
    done = []

    def fake_run(task, spec, *_):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(spec)
        method, w, a, schedule, seed = spec
        return {"task": task.name, "method": method, "schedule": schedule, "weight_bits": w, "act_bits": a,
                "seed": seed, "accuracy": 0.5, "model_bytes": 1, "onnx_bytes": 1, "onnx": None, "train_seconds": None,
                "verify": None}

    monkeypatch.setattr(suite, "run_one", fake_run)
    monkeypatch.setattr(suite, "float_model", lambda *_: (None, None))
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--quick", "--tasks", "mnist-small-cnn", "--no-timing", "--data", str(shared_data("mnist").parent),
                    "--work", str(tmp_path), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["weight_bits"], r["act_bits"]) for r in rows] == [(m, w, a) for m, w, a, _, _ in done]


def test_committed_runs_stay_current_though_config_fields_were_added_since():
    """Every committed run counted as stale (a field added to TrainConfig/QATConfig since changed every recipe id,
    at its default), so resuming the suite on bench/results would have thrown the runs away and run hours again."""
    results_dir = Path(suite.__file__).parent / "results"
    for name in ("suite.json", "suite_sst2.json"):
        results = json.loads((results_dir / name).read_text())
        assert results["runs"] and all(suite.is_current(r, suite.TASKS[r["task"]], results["tasks"][r["task"]])
                                       for r in results["runs"])
    results = json.loads((results_dir / "suite.json").read_text())
    run = next(r for r in results["runs"] if r["method"] == "qat")
    task = suite.TASKS[run["task"]]
    clipped = dataclasses.replace(task, qat_train=dataclasses.replace(task.qat_train, grad_clip=1.0))
    assert not suite.is_current(run, clipped, results["tasks"][run["task"]])  # a new field off its default: stale
    assert not suite.is_current(run, task, None)  # (no entry to read the recipe from)


@pytest.mark.parametrize("content, message", [("{broken", "is not a results file"),
                                              ("[]", "holds a list, not a results")])
def test_a_results_file_that_is_not_one_is_refused(content, message, tmp_path, capsys):
    """A truncated file gave a raw JSONDecodeError, a list a TypeError."""
    out = tmp_path / "r.json"
    out.write_text(content)
    with pytest.raises(SystemExit) as stop:
        suite.main(["--quick", "--no-timing", "--out", str(out), "--work", str(tmp_path)])
    assert stop.value.code == 2 and message in capsys.readouterr().err and out.read_text() == content
