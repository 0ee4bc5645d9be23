"""The command line: help, usage errors (one line, exit 2, nothing written) and the subcommand chain."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import shared_data
from safetensors.torch import load_file, save_file

import qatkit
from qatkit.cli import main
from qatkit.convert import load
from qatkit.data import load_dataset
from qatkit.export import export_onnx
from qatkit.models import build_model
from qatkit.train import load_checkpoint, save_checkpoint
from qatkit.pipeline import (FLOAT_FILE, RunConfig, _loaders, build_for, example_input, model_from_recipe, qat_checkpoint,
                             qat_config, rebuild_qat)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["run", "train", "convert", "export", "verify", "bench", "sensitivity", "eval"])
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: qatkit " + command in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["run", "--weight-bits", "9"], r"weight_bits = 9 is not allowed; allowed: an integer from 2 to 8"),
    (["run", "--act-bits", "1"], r"= 1 is not allowed; allowed: an integer from 2 to 8"),
    (["run", "--weight-bits", "8", "4", "--act-bits", "8"], r"act_bits = \[8\] is not allowed; allowed: one value per weight bit-width"),
    (["run", "--dataset", "imagenet"], r"'imagenet' is not allowed; allowed: digits, mnist, cifar10, folder"),
    (["run", "--model", "resnet-20"], r"model name = 'resnet-20' is not allowed.*did you mean 'resnet20'"),
    (["run", "--dataset", "mnist", "--data", "/nonexistent/mnist"], r"/nonexistent/mnist"),
    (["run", "--dataset", "mnist"], r"--data"),
    (["run", "--epochs", "-1"], r"epochs = -1 is not allowed"),
    (["run", "--device", "tpu"], r"device = 'tpu' is not allowed; allowed: 'cpu', 'cuda' or 'cuda:N'"),
    (["run", "--config", "/nonexistent.yaml"], r"--config = '/nonexistent.yaml' is not allowed; allowed: an existing YAML file"),
    (["convert", "/nonexistent.ckpt"], r"/nonexistent.ckpt"),
    (["eval", "/nonexistent.safetensors"], r"model file '/nonexistent.safetensors' does not exist"),
    (["run", "--act-bits", "9"], r"act_bits = 9 is not allowed; allowed: an integer from 2 to 8"),  # (not weight_bits)
    (["eval", "/"], r"model file '/' is a folder"), (["convert", "/"], r"checkpoint '/' is a folder"),
    (["verify", "/"], r"ONNX file '/' is a folder"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    out_dir = tmp_path / "out"
    extra = ["--out", str(out_dir)] if argv[0] == "run" else []
    code, _, err = run_cli(capsys, *argv, *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pytest.importorskip("re").search(message, lines[0]), lines[0]
    assert not out_dir.exists() and not (tmp_path / "out.partial").exists()  # nothing half-written


def test_bad_yaml_key_and_value(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    code, _, err = run_cli(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "train key = 'epoch' is not allowed; allowed: epochs," in err
    cfg.write_text("qat:\n  rules:\n    - pattern: 'nomatch*'\n      weight_bits: 2\n")
    code, _, err = run_cli(capsys, "run", "--config", str(cfg), "--limit", "64", "--float-epochs", "1", "--epochs", "1",
                           "--quiet", "--out", str(tmp_path / "o"))
    assert code == 2 and "rule pattern = 'nomatch*' is not allowed; allowed: a glob matching a layer name" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "run", "--out", str(tmp_path / "o"))
    assert code == 2 and "exists and is not empty" in err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_run_into_a_symlinked_folder_and_beside_a_work_folder_in_use(tmp_path, capsys):
    """--out a link to an empty folder: the run trained, then failed to rename its work folder onto the link and kept
    nothing (raw NotADirectoryError). OUT.partial already there (another run's into the same --out, or a folder of the
    user's): it was deleted without a word; now refused (a file of that name gave a raw FileExistsError)."""
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    code, _, err = run_cli(capsys, "run", "--limit", "64", "--float-epochs", "1", "--epochs", "1", "--weight-bits", "8",
                           "--quiet", "--out", str(link))
    assert code == 0, err
    assert link.is_symlink() and (target / "results.json").is_file() and not (tmp_path / "target.partial").exists()
    busy = tmp_path / "o.partial"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "run", "--limit", "64", "--quiet", "--out", str(tmp_path / "o"))
    assert code == 2 and f"{str(busy)!r} exists: the work folder of a run into --out" in err, err
    assert (busy / "keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_argparse_errors_exit_2():
    proc = subprocess.run([sys.executable, "-m", "qatkit.cli", "run", "--weight-bits", "eight"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid int value: 'eight'" in proc.stderr


def test_keep_sensitive_keeps_the_layers_that_lose_most_alone_at_8_bits(tmp_path, capsys):
    out = tmp_path / "k"
    code, printed, err = run_cli(capsys, "run", "--weight-bits", "2", "--act-bits", "2", "--keep-sensitive", "1",
                                 "--float-epochs", "4", "--epochs", "1", "--limit", "600", "--quiet", "--out", str(out))
    assert code == 0, err
    qat, recipe = rebuild_qat(out / "qat_w2a2.ckpt")
    rules = recipe["qat"]["rules"]
    assert len(rules) == 1 and rules[0]["weight_bits"] == rules[0]["act_bits"] == 8
    assert f"kept at 8 bits, the layers that lose most alone: {rules[0]['pattern']}" in printed
    kept = next(r for r in qat.qat_info.layers if r["name"] == rules[0]["pattern"])
    assert (kept["weight_bits"], kept["act_bits"]) == (8, 8)
    # the layer qatkit.sensitivity ranks first on the run's float model and calibration batches
    config = RunConfig(weight_bits=2, act_bits=2, limit=600)
    ds = load_dataset("digits", None, limit=600)
    float_model = build_for("small-cnn", ds)
    float_model.load_state_dict(load_file(str(out / FLOAT_FILE)))
    found = qatkit.sensitivity(float_model.eval(), dataclasses.replace(config.qat, weight_bits=2, act_bits=2),
                               example_input(recipe), _loaders(ds, config.train)[1], num_batches=4)
    assert next(r["layer"] for r in found["layers"] if min(r["weight_bits"], r["act_bits"]) < 8) == rules[0]["pattern"]
    code, _, err = run_cli(capsys, "run", "--keep-sensitive", "-1", "--out", str(tmp_path / "x"))
    assert code == 2 and "keep_sensitive = -1 is not allowed" in err


def test_train_convert_eval_chain(tmp_path, capsys):
    out = tmp_path / "t"
    code, _, err = run_cli(capsys, "train", "--model", "small-cnn", "--weight-bits", "4", "--act-bits", "4", "--epochs", "1",
                           "--float-epochs", "4", "--limit", "600", "--quiet", "--out", str(out))
    assert code == 0, err
    ckpt = out / "qat_w4a4.ckpt"
    assert ckpt.is_file() and (out / "checkpoints" / "float" / "last.ckpt").is_file()
    code, printed, err = run_cli(capsys, "convert", str(ckpt), "--out", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    code, printed, _ = run_cli(capsys, "eval", str(tmp_path / "m.safetensors"), "--json")
    from_file = json.loads(printed)
    code, printed, _ = run_cli(capsys, "eval", str(ckpt), "--json")
    assert from_file == json.loads(printed)  # integer file and QAT checkpoint agree on the whole test split
    assert from_file["n"] == 360 and from_file["accuracy"] > 0.5
    code, printed, err = run_cli(capsys, "export", str(tmp_path / "m.safetensors"))
    assert code == 0 and (tmp_path / "m.onnx").is_file(), err
    assert "note: 4-bit weights are stored as int8" in printed
    assert "inputs: x (batch, 1, x_2, x_3)" in printed  # the CNN's graph follows the image size
    code, printed, err = run_cli(capsys, "verify", str(tmp_path / "m.onnx"), "--json")
    assert code == 0, err
    check = json.loads(printed)
    assert check["n"] == 360 and check["top1_agreement"] >= 0.999 and check["within_one_step"] >= 0.999
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "missing.onnx"))
    assert code == 2 and "ONNX file" in err and "does not exist" in err
    code, printed, err = run_cli(capsys, "bench", str(ckpt), "--batches", "1", "2", "--rounds", "2", "--threads", "1", "--json")
    assert code == 0, err
    rows = json.loads(printed)["rows"]
    assert {(r["runtime"], r["batch"]) for r in rows} == {(rt, b) for rt in ("torch-fp32", "ort-fp32", "ort-int8-qatkit",
                                                                            "ort-int8-quantize_static") for b in (1, 2)}
    assert all(r["median_ms"] > 0 and r["model_bytes"] > 0 for r in rows)
    code, _, err = run_cli(capsys, "bench", str(ckpt), "--rounds", "0")
    assert code == 2 and "--rounds = 0 is not allowed" in err
    code, printed, err = run_cli(capsys, "sensitivity", str(ckpt), "--batches", "1", "--json")
    assert code == 0, err
    found = json.loads(printed)
    assert found["samples"] == 256 and [r["sqnr_db"] for r in found["layers"]] == sorted(r["sqnr_db"] for r in found["layers"])
    assert {(r["layer"], r["weight_bits"]) for r in found["layers"]} == {
        ("features.0.0", 8), ("features.1.0", 4), ("features.3.0", 4), ("features.5.0", 4), ("fc", 8)}
    code, printed, err = run_cli(capsys, "sensitivity", str(ckpt))
    assert code == 0 and printed.splitlines()[-1].startswith(
        f"To keep the most sensitive layer at 8 bits: --config with qat: {{rules: [{{pattern: '{found['layers'][0]['layer']}'")
    code, _, err = run_cli(capsys, "sensitivity", str(ckpt), "--batches", "0")
    assert code == 2 and "--batches = 0 is not allowed" in err
    other = tmp_path / "resnet20.safetensors"  # another architecture's float weights: which keys do not fit
    save_file(build_model("resnet20", num_classes=10, in_channels=1, image_size=8).state_dict(), str(other))
    code, _, err = run_cli(capsys, "sensitivity", str(ckpt), "--float", str(other))
    assert code == 2 and f"float weights {str(other)!r} cannot be loaded (Missing key(s) in state_dict: " \
        '"features.0.0.weight"' in err and '; Unexpected key(s) in state_dict: "' in err, err


def test_eval_mnist_path_from_shared_data(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--dataset", "mnist", "--data", str(shared_data("mnist")), "--limit", "256",
                           "--float-epochs", "1", "--epochs", "1", "--weight-bits", "8", "--quiet", "--out", str(tmp_path / "m"))
    assert code == 0, err
    rows = json.loads((tmp_path / "m" / "results.json").read_text())["rows"]
    assert [(r["method"], r["weight_bits"], r["act_bits"]) for r in rows] == [("float", 32, 32), ("ptq", 8, 8), ("qat", 8, 8)]
    assert all(r["integer_model_accuracy"] == r["accuracy"] for r in rows[1:])
    check = rows[2]["verify"]  # the QAT model, exported and run by ONNX Runtime on the (limited) test split
    assert check["n"] == 256 and check["top1_agreement"] == 1.0 and check["within_one_step"] == 1.0


@pytest.mark.parametrize("key", ["power_of_two_scales", "exact_multipliers", "exact_adds", "reduce_range"])
def test_qat_switch_flags_and_yaml(key, tmp_path):
    """--power-of-two-scales / --exact-multipliers / --exact-adds / --reduce-range (or YAML qat: {KEY: true}) reach the
    QAT config;
    off by default."""
    from qatkit.cli import _parser, run_config_from
    assert not getattr(run_config_from(_parser().parse_args(["run"])).qat, key)
    flagged = _parser().parse_args(["train", f"--{key.replace('_', '-')}", "--out", "o"])
    assert getattr(run_config_from(flagged).qat, key)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"qat:\n  {key}: true\n")
    assert getattr(run_config_from(_parser().parse_args(["run", "--config", str(cfg)])).qat, key)
    flagged = _parser().parse_args(["train", "--power-of-two-scales", "--out", "o"])
    assert run_config_from(flagged).qat.power_of_two_scales
    cfg = tmp_path / "run.yaml"
    cfg.write_text("qat:\n  power_of_two_scales: true\n")
    assert run_config_from(_parser().parse_args(["run", "--config", str(cfg)])).qat.power_of_two_scales


def test_bn_freeze_epoch_follows_epochs_unless_the_yaml_sets_it(tmp_path):
    """The default recipe freezes BN for the last third of its 12 epochs (from epoch 8); with --epochs 2 it froze
    nothing, without a word."""
    from qatkit.cli import _parser, run_config_from
    freeze = lambda *argv: run_config_from(_parser().parse_args(["run", *argv])).train.bn_freeze_epoch  # noqa: E731
    assert (freeze(), freeze("--epochs", "2"), freeze("--epochs", "30")) == (8, 1, 20)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  epochs: 6\n")
    assert freeze("--config", str(cfg)) == 4
    cfg.write_text("train:\n  bn_freeze_epoch: null\n")
    assert freeze("--config", str(cfg), "--epochs", "2") is None


def test_float_pretraining_leaves_out_the_qat_only_settings():
    """The float stage inherited progressive_bits (warning 'only [2] train' about a float model) and oscillation
    tracking."""
    train = qatkit.TrainConfig(epochs=3, progressive_bits=(8, 4, 2), track_oscillations=True, bn_freeze_epoch=2)
    float_train = RunConfig(float_epochs=1, train=train).float_train
    assert (float_train.epochs, float_train.progressive_bits, float_train.track_oscillations,
            float_train.bn_freeze_epoch) == (1, (), False, None)


def _sentiment_tsv(n: int, seed: int) -> str:
    """Texts of 2..9 words; label 1 when they hold more 'good' words than 'bad' ones."""
    import random

    rng = random.Random(seed)
    good, bad, neutral = ["fine", "great", "moving", "fun"], ["dull", "awful", "flat", "tired"], [f"w{i}" for i in range(20)]
    lines = ["text\tlabel"]
    for _ in range(n):
        words = rng.choices(good + bad + neutral, k=rng.randint(2, 9))
        score = sum(w in good for w in words) - sum(w in bad for w in words)
        words += rng.choices(good if score >= 0 else bad, k=1) if score == 0 else []
        lines.append(f"{' '.join(words)}\t{int(sum(w in good for w in words) > sum(w in bad for w in words))}")
    return "\n".join(lines) + "\n"


def test_text_run_eval_verify_chain(tmp_path, capsys):
    """`--dataset tsv`: the tiny transformer by default, an int8 embedding table, the vocabulary in the model files."""
    data = tmp_path / "text"
    data.mkdir()
    (data / "train.tsv").write_text(_sentiment_tsv(600, 0), encoding="utf-8")
    (data / "test.tsv").write_text(_sentiment_tsv(200, 1), encoding="utf-8")
    code, _, err = run_cli(capsys, "run", "--dataset", "tsv", "--data", str(data), "--float-epochs", "8", "--epochs", "2",
                           "--weight-bits", "8", "--quiet", "--out", str(tmp_path / "r"))
    assert code == 0, err
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["model"] == "tiny-transformer" and results["dataset"] == "tsv"
    float_row, ptq, qat = results["rows"]
    assert float_row["accuracy"] >= 0.85  # learnt the rule, so the checks below compare a working model
    assert all(r["integer_model_accuracy"] == r["accuracy"] for r in (ptq, qat))
    assert qat["accuracy"] >= float_row["accuracy"] - 0.03
    assert qat["verify"]["top1_agreement"] == 1.0 and qat["verify"]["within_one_step"] == 1.0
    model_file = tmp_path / "r" / "qat_w8a8.safetensors"
    integer = load(model_file)
    table = next(n for n in integer.nodes if n["op"] == "qembed")
    assert integer.tensor(table["weight"]["tensor"]).dtype == torch.int8  # the embedding table too
    assert qat["model_bytes"] < 0.4 * float_row["model_bytes"]  # 1 byte per weight; the graph and vocabulary beside
    code, printed, err = run_cli(capsys, "eval", str(model_file), "--data", str(data), "--json")
    assert code == 0, err
    assert json.loads(printed)["accuracy"] == qat["accuracy"]  # test text encoded with the model's vocabulary
    code, printed, err = run_cli(capsys, "verify", str(model_file.with_suffix(".onnx")), "--data", str(data), "--json")
    assert code == 0 and json.loads(printed)["top1_agreement"] == 1.0, err
    code, printed, err = run_cli(capsys, "bench", str(tmp_path / "r" / "qat_w8a8.ckpt"), "--data", str(data),
                                 "--batches", "2", "--rounds", "2", "--threads", "1", "--json")
    assert code == 0, err  # token ids (int64) through every runtime, quantize_static's calibration included
    assert {r["runtime"] for r in json.loads(printed)["rows"]} == {"torch-fp32", "ort-fp32", "ort-int8-qatkit",
                                                                  "ort-int8-quantize_static"}
    code, _, err = run_cli(capsys, "run", "--dataset", "tsv", "--data", str(data), "--model", "small-cnn",
                           "--out", str(tmp_path / "x"))
    assert code == 2 and "model for a text dataset = 'small-cnn' is not allowed; allowed: tiny-transformer" in err
    # --keep-sensitive on a model with an embedding (its sensitivity row has no act_bits: a TypeError in min())
    _, recipe = qat_checkpoint(tmp_path / "r" / "qat_w8a8.ckpt")
    float_model = model_from_recipe(recipe)
    float_model.load_state_dict(load_file(str(tmp_path / "r" / FLOAT_FILE)))
    ds = load_dataset("tsv", str(data), vocab=recipe["vocab"], max_len=recipe["max_len"])
    rules = qat_config(RunConfig(dataset="tsv", data=str(data), keep_sensitive=2), ds, float_model.eval(), 4, 4).rules
    assert len(rules) == 2 and all(r.weight_bits == r.act_bits == 8 for r in rules)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: cuda is a valid device")
@pytest.mark.parametrize("command", ["run", "train"])
def test_cuda_without_a_gpu_is_a_usage_error_before_anything_is_written(command, capsys, tmp_path):
    code, _, err = run_cli(capsys, command, "--device", "cuda", "--limit", "16", "--out", str(tmp_path / "o"))
    assert code == 2 and "Traceback" not in err
    assert "device = 'cuda' is not available here" in err and "Fix: pass --device cpu" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_out_paths_that_cannot_be_written_are_usage_errors(capsys, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for argv, message in ((["run", "--out", "afile/sub"], "--out 'afile/sub' is under the file 'afile'"),
                          (["train", "--out", "afile/sub"], "--out 'afile/sub' is under the file 'afile'"),
                          (["run", "--out", "."], "--out '.' names no folder of its own"),
                          (["run", "--out", ""], "--out '' names no folder of its own"),
                          (["train", "--dataset", "mnist", "--out", "new"], "--data is not set")):
        code, _, err = run_cli(capsys, *argv, "--limit", "16", "--float-epochs", "1", "--epochs", "1", "--quiet")
        assert code == 2 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # train's failed --out folder is not left behind


def test_a_rule_naming_no_layer_stops_run_before_the_float_training(capsys, tmp_path, monkeypatch):
    import qatkit.pipeline

    monkeypatch.setattr(qatkit.pipeline, "fit", lambda *a, **k: pytest.fail("trained before checking the rules"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("qat:\n  rules:\n    - pattern: 'nomatch*'\n      weight_bits: 2\n")
    code, _, err = run_cli(capsys, "run", "--config", str(cfg), "--limit", "64", "--quiet", "--out",
                           str(tmp_path / "o"))
    assert code == 2 and "rule pattern = 'nomatch*' is not allowed" in err


def test_convert_and_export_refuse_to_write_over_their_input_or_a_folder(capsys, tmp_path):
    out = tmp_path / "t"
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--float-epochs", "1", "--limit", "64", "--quiet",
                           "--out", str(out))
    assert code == 0, err
    ckpt = out / "qat_w8a8.ckpt"
    before = ckpt.read_bytes()
    (tmp_path / "afile").write_text("mine")
    for argv, why in (([str(ckpt), "--out", str(ckpt)], "it is the input file"),
                      ([str(ckpt), "--out", str(tmp_path)], "it is a folder"),
                      ([str(ckpt), "--out", str(tmp_path / "afile" / "m.safetensors")], "it is under a file")):
        code, _, err = run_cli(capsys, "convert", *argv)
        assert code == 2 and f"Fix: {why}" in err and "Traceback" not in err, err
    assert ckpt.read_bytes() == before
    model = tmp_path / "new" / "m.safetensors"  # a new folder is made, for convert and export alike
    assert run_cli(capsys, "convert", str(ckpt), "--out", str(model))[0] == 0
    code, _, err = run_cli(capsys, "export", str(model), "--out", str(model))
    assert code == 2 and "Fix: it is the input file" in err
    assert run_cli(capsys, "export", str(model), "--out", str(tmp_path / "onnx" / "m.onnx"))[0] == 0
    assert (tmp_path / "onnx" / "m.onnx").is_file() and qatkit.load(model) is not None


@pytest.mark.parametrize("yaml_text, message", [
    ("epochs: 3\n", r"--config key = 'epochs' is not allowed.*Fix: move it under train: \(a train option\)"),
    ("exact_adds: true\n", r"--config key = 'exact_adds' is not allowed.*Fix: move it under qat: \(a qat option\)"),
    ("weight_bits: []\n", r"weight_bits = \[\] is not allowed; allowed: one or more bit-widths from 2 to 8"),
    ("qat:\n  rules: fc\n", r"rules = 'fc' is not allowed; allowed: a list of layer rules"),
    ("act_bits: [8, 4]\n", r"act_bits = \[8, 4\] is not allowed.*\(--act-bits, or act_bits: in the YAML\)"),
])
def test_bad_yaml_bit_widths_and_rules_name_what_is_wrong(yaml_text, message, capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    code, _, err = run_cli(capsys, "run", "--weight-bits", "8", "--config", str(cfg), "--out", str(tmp_path / "o")) \
        if "act_bits" in yaml_text else run_cli(capsys, "run", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and pytest.importorskip("re").search(message, err), err


def test_train_resume_on_other_data_is_refused(capsys, tmp_path):
    """train --resume with another --dataset (same --limit, shapes that fit the saved weights) used to go on with
    the digits model's checkpoint as if it had been trained on MNIST."""
    out = tmp_path / "t"
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--float-epochs", "1", "--limit", "64", "--quiet",
                           "--out", str(out))
    assert code == 0, err
    before = (out / "qat_w8a8.ckpt").read_bytes()
    mnist = str(shared_data("mnist"))
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--float-epochs", "1", "--limit", "64", "--quiet",
                           "--dataset", "mnist", "--data", mnist, "--resume", "--out", str(out))
    assert code == 2 and "resume: dataset = 'mnist' differs from 'digits' in checkpoint" in err, err
    assert (out / "qat_w8a8.ckpt").read_bytes() == before


def test_messages_about_other_files_name_the_fix(capsys, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not checked: no integer model beside it")
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "m.onnx"))
    assert code == 2 and "no integer model" in err and "Fix: pass --reference" in err
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "m.onnx"))
    assert code == 2 and "Fix: pass a checkpoint qatkit wrote (the qat_*.ckpt of qatkit train or run)" in err


def test_eval_with_run_limit_reproduces_results_json_and_resume_of_nothing_says_so(capsys, tmp_path):
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "run", "--weight-bits", "4", "--act-bits", "4", "--epochs", "1", "--float-epochs",
                           "1", "--limit", "96", "--quiet", "--out", str(out))
    assert code == 0, err
    row = next(r for r in json.loads((out / "results.json").read_text())["rows"] if r["method"] == "qat")
    code, printed, _ = run_cli(capsys, "eval", str(out / "qat_w4a4.safetensors"), "--limit", "96", "--json")
    result = json.loads(printed)
    assert code == 0 and (result["accuracy"], result["n"]) == (row["integer_model_accuracy"], 96)
    code, printed, err = run_cli(capsys, "train", "--epochs", "1", "--float-epochs", "1", "--limit", "32", "--quiet",
                                 "--resume", "--out", str(tmp_path / "t"))
    assert code == 0, err
    assert printed.startswith(f"[qatkit] --resume: nothing to resume in {str(tmp_path / 't')!r} (new or empty); "
                              "training from the start")


def test_files_that_do_not_fit_are_refused_and_a_failed_export_keeps_the_old_file(capsys, tmp_path):
    """Found by a hunt over the files the CLI reads and writes: each of these gave a raw traceback (exit 1), or an ONNX
    file truncated over the good one."""
    import resource

    out = tmp_path / "t"
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--float-epochs", "1", "--limit", "64", "--quiet",
                           "--out", str(out))
    assert code == 0, err
    ckpt, model_file = out / "qat_w8a8.ckpt", tmp_path / "m.safetensors"
    assert run_cli(capsys, "convert", str(ckpt), "--out", str(model_file))[0] == 0
    assert run_cli(capsys, "export", str(model_file))[0] == 0
    onnx_file, good = tmp_path / "m.onnx", (tmp_path / "m.onnx").read_bytes()

    # a write that fails (a full disk: here a file-size limit) says so, and leaves the file that was there
    limited = subprocess.run([sys.executable, "-m", "qatkit", "export", str(model_file)], capture_output=True,
                             text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    assert limited.returncode == 2 and "cannot be written (File too large)" in limited.stderr, limited.stderr
    assert onnx_file.read_bytes() == good and not list(tmp_path.glob(".m.onnx.*"))

    # an ONNX file of another model (5 classes) verified against this one: its outputs do not fit the reference's
    five = qatkit.prepare(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)), qatkit.QATConfig(),
                          torch.randn(2, 1, 8, 8))
    qatkit.calibrate(five, [torch.randn(8, 1, 8, 8)])
    export_onnx(qatkit.convert(five.eval()), tmp_path / "five.onnx", torch.randn(1, 1, 8, 8))
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "five.onnx"), "--reference", str(model_file))
    assert code == 2 and "the ONNX model does not run on its reference model's inputs as the reference does (outputs " \
        "of shapes [(" in err and "Fix: pass --reference with the model file" in err, err
    # a checkpoint whose checksum holds but whose content is not a QAT model's
    save_checkpoint(tmp_path / "no_model.ckpt", {"recipe": load_checkpoint(ckpt)["recipe"]})
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "no_model.ckpt"))
    assert code == 2 and "has no QAT recipe and weights" in err, err
    broken = load_checkpoint(ckpt)
    del broken["recipe"]["in_channels"]
    save_checkpoint(tmp_path / "no_shape.ckpt", broken)
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "no_shape.ckpt"))
    assert code == 2 and "has a recipe whose 'in_channels' is None; allowed: an integer 1..65536" in err, err
    # a model file saved from Python has no recipe: the CLI cannot know its input shape
    bare = qatkit.load(model_file)
    bare.meta = {}
    qatkit.save(bare, tmp_path / "bare.safetensors")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "bare.safetensors"))
    assert code == 2 and "has no recipe (the model and input shape qatkit run/train store)" in err, err
