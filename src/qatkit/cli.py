"""`qatkit` command line: run | train | convert | export | verify | bench | sensitivity | eval.

Flags override a `--config file.yaml` (read with yaml.safe_load), which overrides the defaults.
Usage errors (bad flags, values, paths, files) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from qatkit.config import (
    QATConfig,
    TrainConfig,
    load_yaml,
    qat_config_from_dict,
    to_dict,
    train_config_from_dict,
)
from qatkit.devices import check_available
from qatkit.errors import ConfigError, DataError, ModelFileError, QatkitError, bad_value, error_detail
from qatkit.primitives.ranges import check_bits
from qatkit.train.signals import TrainingInterrupted

_RUN_KEYS = ("dataset", "data", "model", "weight_bits", "act_bits", "limit", "float_epochs", "float_lr", "keep_sensitive",
             "qat", "train")


class _Parser(argparse.ArgumentParser):
    """argparse's own usage errors in qatkit's form: one line, exit code 2."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message}. Fix: see {self.prog} --help\n")


def _common(p: argparse.ArgumentParser, *, many_bits: bool) -> None:
    nargs = "+" if many_bits else None
    p.add_argument("--config", help="YAML file with run options (keys: %s)" % ", ".join(_RUN_KEYS))
    p.add_argument("--dataset", help="digits (default, embedded) | mnist | cifar10 | folder (images) | "
                   "sst2 | tsv (text: train.tsv and test.tsv, 'text<TAB>label' lines)")
    p.add_argument("--data", help="path of the dataset (mnist, cifar10, folder, sst2, tsv)")
    p.add_argument("--model", help="small-cnn (default for images) | seed-mlp | resnet20 | resnet18 | mobilenetv2 | "
                   "tiny-transformer (default for text)")
    p.add_argument("--weight-bits", type=int, nargs=nargs,
                   help="weight bit-widths, 2..8 (one per model)" if many_bits else "weight bit-width, 2..8")
    p.add_argument("--act-bits", type=int, nargs=nargs, help="activation bit-widths, 2..8, one per weight bit-width"
                   if many_bits else "activation bit-width, 2..8")
    p.add_argument("--epochs", type=int, help="QAT epochs")
    p.add_argument("--float-epochs", type=int, help="float training epochs")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu (default) | cuda | cuda:N")
    p.add_argument("--limit", type=int, help="use only the first N samples of each split")
    p.add_argument("--keep-sensitive", type=int, metavar="N",
                   help="below 8 bits, keep at 8 bits the N layers that lose most when quantized alone (what "
                        "`qatkit sensitivity` measures, here on calibration batches); default 0")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--power-of-two-scales", action="store_true",
                   help="every scale a power of two: requantization by shifts, the same integers on fixed-point "
                        "hardware as on ONNX Runtime (YAML: qat: {power_of_two_scales: true})")
    p.add_argument("--exact-multipliers", action="store_true",
                   help="free scales, each weight scale nudged so that every conv/linear requantization multiplier "
                        "is exact: the same integers on fixed-point hardware as on ONNX Runtime there "
                        "(YAML: qat: {exact_multipliers: true})")
    p.add_argument("--exact-adds", action="store_true",
                   help="each residual add and global average pool shares one quantizer with its inputs, so they "
                        "requantize exactly; with --exact-multipliers fixed-point hardware computes ONNX Runtime's "
                        "integers end to end (YAML: qat: {exact_adds: true})")
    p.add_argument("--reduce-range", action="store_true",
                   help="8-bit weights at 7 bits, so that ONNX Runtime runs its fast u8*s8 kernels exactly on x86 "
                        "CPUs without VNNI (YAML: qat: {reduce_range: true})")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qatkit", description="Quantization-aware training to a packed integer model.")
    sub = parser.add_subparsers(dest="command", metavar="{run,train,convert,export,verify,bench,sensitivity,eval}",
                                parser_class=_Parser)
    p = sub.add_parser("run", help="float → PTQ and QAT per bit-width → integer models, results.json, report.md")
    _common(p, many_bits=True)
    p.add_argument("--out", help="output folder (default: runs/<time>-<model>-<dataset>); must be new or empty")
    p = sub.add_parser("train", help="train float, then QAT at one bit-width; writes float.safetensors and qat_*.ckpt")
    _common(p, many_bits=False)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the QAT run in --out from its last checkpoint")
    p = sub.add_parser("convert", help="QAT checkpoint (qat_*.ckpt) → integer model file (.safetensors)")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="output file (default: the checkpoint's name with .safetensors)")
    p = sub.add_parser("export", help="integer model file or QAT checkpoint → ONNX (QDQ) for ONNX Runtime's int8 kernels")
    p.add_argument("model_file")
    p.add_argument("--out", help="output file (default: the model file's name with .onnx)")
    p = sub.add_parser("verify", help="ONNX Runtime vs qatkit's model on a test split: agreement, steps, per-layer SQNR")
    p.add_argument("onnx_file")
    p.add_argument("--reference", help="qatkit model (.safetensors or .ckpt); default: the .onnx file's name with .safetensors")
    p.add_argument("--dataset", help="default: the one the model was trained on")
    p.add_argument("--data", help="path of the dataset")
    p.add_argument("--limit", type=int, help="use only the first N test samples")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("bench", help="latency: float PyTorch, float ORT, qatkit int8 ORT, ORT quantize_static int8")
    p.add_argument("checkpoint", help="QAT checkpoint (qat_*.ckpt) of a qatkit run or train")
    p.add_argument("--float", dest="float_weights", help="float weights (.safetensors); default: float.safetensors beside the checkpoint")
    p.add_argument("--data", help="path of the dataset (its training images calibrate quantize_static)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default 2)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("sensitivity", help="each layer quantized alone as a QAT checkpoint's config quantizes it: "
                                           "SQNR and top-1 agreement against the float model; the layers to keep "
                                           "at more bits first")
    p.add_argument("checkpoint", help="QAT checkpoint (qat_*.ckpt) of a qatkit run or train")
    p.add_argument("--float", dest="float_weights",
                   help="float weights (.safetensors); default: float.safetensors beside the checkpoint")
    p.add_argument("--dataset", help="default: the one the model was trained on")
    p.add_argument("--data", help="path of the dataset")
    p.add_argument("--batches", type=int, default=4, help="test batches of 256 to calibrate and compare on (default 4)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("eval", help="accuracy of an integer model file or a QAT checkpoint on a test split")
    p.add_argument("model_file")
    p.add_argument("--dataset", help="default: the one the model was trained on")
    p.add_argument("--data", help="path of the dataset")
    p.add_argument("--limit", type=int, help="use only the first N test samples (run's --limit: its results.json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def run_config_from(args: argparse.Namespace, default_bits: tuple[int, ...] | None = None):
    """Defaults ← YAML ← flags, validated into a RunConfig; `default_bits` replaces RunConfig's default
    bit-widths when neither the flags nor the YAML give any."""
    from qatkit.pipeline import RunConfig

    data = load_yaml(args.config) if args.config else {}
    unknown = sorted(set(data) - set(_RUN_KEYS), key=str)
    if unknown:
        section = next((name for name, fields in (("train", to_dict(TrainConfig())), ("qat", to_dict(QATConfig())))
                        if unknown[0] in fields), None)  # (a train: or qat: option written at the top level)
        raise bad_value("--config key", unknown[0], ", ".join(_RUN_KEYS), f"move it under {section}: (a {section} "
                        "option)" if section else "remove or correct the key")
    for key in ("train", "qat"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise bad_value(f"--config {key}", data[key], f"a mapping of {key} options", f"write {key}: as key: value pairs")
    if misplaced := [k for k in ("weight_bits", "act_bits") if k in (data.get("qat") or {})]:
        raise bad_value("--config qat key", misplaced[0], "QATConfig's keys but weight_bits and act_bits, which are "
                        "top-level keys (one model per weight_bits/act_bits pair)", f"move {misplaced[0]}: to the top "
                        f"level, or pass --{misplaced[0].replace('_', '-')}")
    default = RunConfig()
    train = {**to_dict(default.train), **(data.get("train") or {})}
    qat = {**to_dict(default.qat), **(data.get("qat") or {})}
    for flag, key in (("epochs", "epochs"), ("seed", "seed"), ("device", "device")):
        if getattr(args, flag) is not None:
            train[key] = getattr(args, flag)
    if "bn_freeze_epoch" not in (data.get("train") or {}) and type(train["epochs"]) is int:
        train["bn_freeze_epoch"] = train["epochs"] * 2 // 3  # the default recipe's: BN frozen for the last third
    if args.quiet:
        train["progress"] = False
    for flag in ("power_of_two_scales", "exact_multipliers", "exact_adds", "reduce_range"):
        if getattr(args, flag):
            qat[flag] = True
    top = {k: data[k] for k in _RUN_KEYS if k in data and k not in ("qat", "train")}
    for flag in ("dataset", "data", "model", "limit", "float_epochs", "keep_sensitive"):
        if getattr(args, flag) is not None:
            top[flag] = getattr(args, flag)
    for flag in ("weight_bits", "act_bits"):
        value = getattr(args, flag)
        if value is not None:
            top[flag] = value if isinstance(value, list) else [value]
        elif flag in top and isinstance(top[flag], int):
            top[flag] = [top[flag]]
    for flag in ("weight_bits", "act_bits"):  # each under its own name before one stands in for the other
        for bits in top[flag] if isinstance(top.get(flag), list) else []:
            check_bits(bits, flag)
    if default_bits is not None and "weight_bits" not in top and "act_bits" not in top:
        top["weight_bits"] = top["act_bits"] = list(default_bits)
    if "weight_bits" in top and "act_bits" not in top:
        top["act_bits"] = top["weight_bits"]
    if "act_bits" in top and "weight_bits" not in top:
        top["weight_bits"] = top["act_bits"]
    return RunConfig(**top, qat=qat_config_from_dict(qat), train=train_config_from_dict(train))


def _cmd_run(args) -> int:
    from qatkit.pipeline import run
    from qatkit.train import distributed

    config = run_config_from(args)
    check_available(config.train.device)
    if distributed.launched_by_torchrun() and args.out is None:
        raise bad_value("--out", None, "a folder name under torchrun", "pass --out (the ranks' clocks may differ)")
    out = args.out if args.out is not None else f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{config.dataset}"
    with distributed.process_group(config.train.device):
        results = run(config, out)
        main = distributed.is_main()
    if main:
        print(f"[qatkit] wrote {out}/results.json, report.md and the model files ({results['seconds']} s)")
    return 0


def _cmd_train(args) -> int:
    from qatkit.data import load_dataset
    from qatkit.pipeline import check_out_folder, quantize, train_float
    from qatkit.train import distributed

    config = run_config_from(args, default_bits=(8,))
    if len(config.weight_bits) != 1:
        raise bad_value("--weight-bits", list(config.weight_bits), "one bit-width for train", "pass one value, or use qatkit run")
    check_available(config.train.device)
    out = Path(args.out)
    with distributed.process_group(config.train.device):
        main, new = distributed.is_main(), False
        if main:  # the other ranks write nothing (and would see rank 0's files)
            check_out_folder(out)
            new = not (out.exists() and any(out.iterdir()))
            if not new and not args.resume:
                raise ConfigError(f"--out {str(out)!r} exists and is not empty; allowed: a new folder, or --resume. "
                                  "Fix: pass another --out or add --resume")
            if new and args.resume:
                print(f"[qatkit] --resume: nothing to resume in {str(out)!r} (new or empty); training from the start")
            out.mkdir(parents=True, exist_ok=True)
        try:
            ds = load_dataset(config.dataset, config.data, limit=config.limit)
            float_model = train_float(config, ds, out, resume=args.resume)
            quantize(config, ds, float_model, config.weight_bits[0], config.act_bits[0], out, train=True,
                     resume=args.resume)
        except BaseException:
            if new and out.is_dir() and not any(out.iterdir()):  # failed before writing anything: no empty folder
                out.rmdir()
            raise
    if main:
        print(f"[qatkit] wrote {out}/qat_w{config.weight_bits[0]}a{config.act_bits[0]}.ckpt")
    return 0


def _output_file(out: Path, source: Path) -> Path:
    """--out of convert/export: a regular file (new or replaced), not the command's own input; its folder made."""
    what = ("the input file" if out.exists() and source.exists() and out.resolve() == source.resolve()
            else "a folder" if out.is_dir() else "not a regular file" if out.exists() and not out.is_file() else None)
    if what is None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            what = "under a file, not a folder"
    if what is not None:
        raise bad_value("--out", str(out), "a new file, or a regular file to replace", f"it is {what}: pass "
                        "another file name")
    return out


def _cmd_convert(args) -> int:
    from qatkit.pipeline import rebuild_qat, save_integer

    model, recipe = rebuild_qat(args.checkpoint)
    out = _output_file(Path(args.out or Path(args.checkpoint).with_suffix(".safetensors")), Path(args.checkpoint))
    size = save_integer(model, recipe, out)
    print(f"[qatkit] wrote {out} ({size:,} bytes)")
    return 0


def _load_model(path: Path, shape: bool = False):
    """An integer model file or a QAT checkpoint, with the recipe it was made by (`shape`: a recipe that gives the
    input shape, which export needs; eval and verify of a model saved from Python take --dataset instead)."""
    from qatkit.convert import load
    from qatkit.pipeline import check_recipe, rebuild_qat

    if path.suffix == ".ckpt":
        return rebuild_qat(path)
    model = load(path)
    recipe = model.meta.get("recipe") or {}
    return model, check_recipe(recipe, f"model file {str(path)!r}") if shape else recipe


def _test_loader(args, recipe: dict, limit: int | None = None):
    from qatkit.data import BatchLoader, TextDataset
    from qatkit.pipeline import dataset_for

    ds = dataset_for(recipe, args.dataset, args.data, limit)
    norm = {} if isinstance(ds, TextDataset) else {"mean": recipe.get("mean", ds.mean), "std": recipe.get("std", ds.std)}
    return ds.name, BatchLoader(ds.test, batch_size=256, shuffle=False, **norm)


def _cmd_eval(args) -> int:
    from qatkit.train import evaluate

    path = Path(args.model_file)
    model, recipe = _load_model(path)
    dataset, loader = _test_loader(args, recipe, args.limit)
    result = evaluate(model, loader)
    print(json.dumps(result) if args.json else f"[qatkit] {path.name} on {dataset} test: accuracy {result['accuracy']:.4f} (n={result['n']})")
    return 0


def _cmd_export(args) -> int:
    import onnx

    from qatkit.pipeline import export_model

    path = Path(args.model_file)
    model, recipe = _load_model(path, shape=True)
    out = _output_file(Path(args.out or path.with_suffix(".onnx")), path)
    notes = export_model(model, recipe, out)
    print(f"[qatkit] wrote {out} ({out.stat().st_size:,} bytes)")
    inputs = onnx.load(str(out)).graph.input  # named sizes are free: the batch, and those the model's graph follows
    dims = {i.name: [d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim] for i in inputs}
    print("[qatkit] inputs: " + "; ".join(f"{name} ({', '.join(d)})" for name, d in dims.items()))
    for note in notes:
        print(f"[qatkit] note: {note}")
    return 0


def _cmd_verify(args) -> int:
    from qatkit.export import verify

    onnx_path = Path(args.onnx_file)
    if not onnx_path.is_file():
        what = "is a folder" if onnx_path.is_dir() else "does not exist"
        raise ModelFileError(f"ONNX file {str(onnx_path)!r} {what}. Fix: pass a file written by qatkit export")
    reference = Path(args.reference) if args.reference else onnx_path.with_suffix(".safetensors")
    if not args.reference and not reference.is_file():
        raise ModelFileError(f"no integer model {str(reference)!r} beside {str(onnx_path)!r} to compare with. Fix: "
                             "pass --reference with the model file (or QAT checkpoint) it was exported from")
    model, recipe = _load_model(reference)
    _, loader = _test_loader(args, recipe, args.limit)
    result = verify(onnx_path, model, loader)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"[qatkit] {onnx_path.name}: n={result['n']} top1_agreement={result['top1_agreement']:.4f} "
              f"within_one_step={result['within_one_step']:.4f} max_step_diff={result['max_step_diff']}")
        for row in result["per_layer"]:
            print(f"[qatkit]   {row['node']}: {row['differing']:.4%} differ, up to {row['max_steps']} steps, SQNR {row['sqnr_db']} dB")
    return 0


def _float_model(args, recipe: dict):
    """The run's float model: the recipe's architecture with --float's weights (default: float.safetensors beside
    the checkpoint)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from qatkit.pipeline import FLOAT_FILE, model_from_recipe

    float_path = Path(args.float_weights or Path(args.checkpoint).with_name(FLOAT_FILE))
    model = model_from_recipe(recipe)
    try:
        model.load_state_dict(load_file(str(float_path)))
    except (OSError, SafetensorError, RuntimeError) as e:
        raise ModelFileError(f"float weights {str(float_path)!r} cannot be loaded ({error_detail(e)}). "
                             "Fix: pass --float with the run's float.safetensors") from None
    return model.eval()


def _cmd_sensitivity(args) -> int:
    from qatkit.config import qat_config_from_dict
    from qatkit.pipeline import example_input, qat_checkpoint
    from qatkit.sensitivity import sensitivity

    if args.batches < 1:
        raise bad_value("--batches", args.batches, "an integer >= 1", "pass --batches 1 or more")
    _, recipe = qat_checkpoint(args.checkpoint)
    config = qat_config_from_dict(recipe["qat"])
    dataset, loader = _test_loader(args, recipe)
    result = sensitivity(_float_model(args, recipe), config, example_input(recipe), loader, num_batches=args.batches)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"[qatkit] each layer quantized alone as {Path(args.checkpoint).name} quantizes it, against the float model "
          f"on {result['samples']} {dataset} test samples; the most sensitive first")
    header = f"{'layer':<28} {'type':<16} {'W/A':>5} {'SQNR dB':>8} {'top-1 agree':>11} {'accuracy':>9}"
    print(header)

    def line(name: str, kind: str, bits: str, row: dict) -> str:
        accuracy = f"{row['accuracy']:.4f}" if "accuracy" in row else "—"
        return f"{name:<28} {kind:<16} {bits:>5} {row['sqnr_db']:>8.2f} {row['top1_agreement']:>11.4f} {accuracy:>9}"

    for row in result["layers"]:
        print(line(row["layer"], row["type"], f"{row['weight_bits']}/{row['act_bits'] or '-'}", row))
    print(line("every layer", "", "", result["model"]))
    if "float_accuracy" in result:
        print(f"float model accuracy {result['float_accuracy']:.4f}")
    if result["layers"]:
        worst = result["layers"][0]["layer"]
        print(f"To keep the most sensitive layer at 8 bits: --config with qat: {{rules: [{{pattern: '{worst}', "
              f"weight_bits: 8, act_bits: 8}}]}} (Python: LayerRule(pattern='{worst}', weight_bits=8, act_bits=8))")
    return 0


def _cmd_bench(args) -> int:
    from qatkit.data import BatchLoader
    from qatkit.export.bench import bench, check_batches, format_table
    from qatkit.pipeline import dataset_for, rebuild_qat

    for what in ("threads", "rounds"):
        if getattr(args, what) < 1:
            raise bad_value(f"--{what}", getattr(args, what), "an integer >= 1", f"pass --{what} 1 or more")
    check_batches(args.batches, "--batches")
    qat, recipe = rebuild_qat(args.checkpoint)
    float_model = _float_model(args, recipe)
    ds = dataset_for(recipe, None, args.data)
    loader = BatchLoader(ds.train, batch_size=32, mean=recipe.get("mean"), std=recipe.get("std"), shuffle=False)
    calib = [x for x, _ in zip((b[0] for b in loader), range(8))]
    result = bench(float_model.eval(), qat.eval(), calib[0][:1], calib, batches=tuple(args.batches),
                   threads=args.threads, rounds=args.rounds)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"run": _cmd_run, "train": _cmd_train, "convert": _cmd_convert, "export": _cmd_export,
               "verify": _cmd_verify, "bench": _cmd_bench, "sensitivity": _cmd_sensitivity, "eval": _cmd_eval}[args.command]
    in_main = threading.current_thread() is threading.main_thread()
    # SIGTERM outside training (which stops gracefully itself) unwinds like Ctrl-C: `run` removes its .partial folder
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        return handler(args)
    except (ConfigError, DataError, ModelFileError) as e:
        print(f"qatkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # stopped by a signal: 128 + its number, as a shell reports it (SIGINT: 130)
        print(f"qatkit {args.command}: error: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    except QatkitError as e:
        print(f"qatkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"qatkit {args.command}: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
