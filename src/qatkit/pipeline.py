"""The whole chain with defaults, as `qatkit run` / `train` / `convert` / `eval` run it.

run: float training → PTQ (calibration only) and QAT per bit-width → integer model files →
results.json, report.md and a plot, written into a `.partial` folder that is renamed into place only
when everything succeeded, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qatkit.calibrate import calibrate
from qatkit.config import (
    LayerRule,
    QATConfig,
    TrainConfig,
    _check_number,
    qat_config_from_dict,
    to_dict,
)
from qatkit.convert import convert, load, save
from qatkit.data import TEXT_DATASETS, BatchLoader, ImageDataset, TextDataset, load_dataset
from qatkit.errors import ConfigError, DataError, ModelFileError, bad_value, error_detail
from qatkit.export import verify
from qatkit.fileio import atomic_file, file_above
from qatkit.models import build_model
from qatkit.prepare import check_rules, prepare
from qatkit.primitives.ranges import check_bits
from qatkit.report import describe, results_table, write_report
from qatkit.report.plots import plot_accuracy_vs_bits
from qatkit.sensitivity import sensitivity
from qatkit.train import distributed, evaluate, fit, load_checkpoint, save_checkpoint
from qatkit.train.loop import CHECKPOINT_NAME
from qatkit.train.signals import TrainingInterrupted

EVAL_BATCH = 256
FLOAT_FILE = "float.safetensors"  # the float weights of a run or train folder


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything `qatkit run` does; `train` is the QAT fine-tune, float training its own fields."""

    dataset: str = "digits"
    data: str | None = None
    model: str | None = None  # None: small-cnn for images, tiny-transformer for text
    weight_bits: tuple[int, ...] = (8, 4)
    act_bits: tuple[int, ...] = (8, 4)
    limit: int | None = None  # use only the first N samples of each split (quick runs)
    float_epochs: int = 30
    float_lr: float = 3e-3
    # below 8 bits, the N layers that lose most when quantized alone (qatkit.sensitivity on calibration batches)
    # are kept at 8 bits (LayerRules added to qat.rules; the recipe records them)
    keep_sensitive: int = 0
    qat: QATConfig = field(default_factory=QATConfig)
    # (the CLI sets bn_freeze_epoch to 2/3 of --epochs unless the YAML's train: gives it)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, lr=3e-4, distill=0.5, bn_freeze_epoch=8))

    def __post_init__(self) -> None:
        w, a = (tuple(check_bits(b, name) for b in (v if isinstance(v, (list, tuple)) else [v]))
                for name, v in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)))
        if not w:
            raise bad_value("weight_bits", list(w), "one or more bit-widths from 2 to 8", "give at least one (8 4)")
        if len(w) != len(a):
            raise bad_value("act_bits", list(a), f"one value per weight bit-width ({len(w)} values)",
                            "give as many activation bit-widths as weight bit-widths (--act-bits, or act_bits: in "
                            "the YAML)")
        if twice := next((p for i, p in enumerate(zip(w, a)) if p in list(zip(w, a))[:i]), None):
            raise bad_value("weight_bits/act_bits pair", f"W{twice[0]}A{twice[1]}", "each pair once (each is one "
                            "model, written to the same files)", "drop the repeated pair")
        _check_number("float_epochs", self.float_epochs, 0, integer=True)
        _check_number("float_lr", self.float_lr, 0.0)
        _check_number("keep_sensitive", self.keep_sensitive, 0, integer=True)
        if self.model is None:
            text = isinstance(self.dataset, str) and self.dataset in TEXT_DATASETS  # load_dataset checks the name
            object.__setattr__(self, "model", "tiny-transformer" if text else "small-cnn")
        object.__setattr__(self, "weight_bits", w)
        object.__setattr__(self, "act_bits", a)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise bad_value("limit", self.limit, "an integer >= 1", "pass --limit 1 or more")

    @property
    def float_train(self) -> TrainConfig:
        return dataclasses.replace(self.train, epochs=self.float_epochs, lr=self.float_lr, distill=0.0,
                                   bn_freeze_epoch=None, scale_lr=None, progressive_bits=(), track_oscillations=False)


def _recipe(config: RunConfig, ds: ImageDataset | TextDataset, qat: QATConfig | None) -> dict:
    """What it takes to rebuild the model and encode its inputs from plain data (stored in checkpoints and model
    files): image shape and normalisation, or a text model's vocabulary and sequence length."""
    return {"model": config.model, "dataset": ds.name, **_inputs(ds), "qat": None if qat is None else to_dict(qat)}


def _inputs(ds: ImageDataset | TextDataset) -> dict:
    if isinstance(ds, TextDataset):
        return {"num_classes": ds.num_classes, "vocab": list(ds.vocab), "max_len": ds.max_len}
    return {"num_classes": ds.num_classes, "in_channels": ds.in_channels, "image_size": ds.image_size,
            "mean": list(ds.mean), "std": list(ds.std), **({"classes": list(ds.classes)} if ds.classes else {})}


def build_for(model: str, ds: ImageDataset | TextDataset) -> nn.Module:
    """A fresh float zoo model `model` for the samples and classes of `ds`."""
    return model_from_recipe({"model": model, **_inputs(ds)})


def model_from_recipe(recipe: dict) -> nn.Module:
    """A fresh float model of the recipe's architecture and input shape."""
    shape = ({"vocab_size": len(recipe["vocab"]), "max_len": recipe["max_len"]} if "vocab" in recipe else
             {"in_channels": recipe["in_channels"], "image_size": recipe["image_size"]})
    return build_model(recipe["model"], num_classes=recipe["num_classes"], **shape)


def dataset_for(recipe: dict, name: str | None, path: str | None, limit: int | None = None):
    """Dataset `name` (default: the recipe's), text encoded with the recipe's vocabulary and length."""
    name = name or recipe.get("dataset")
    if name is None:
        raise bad_value("--dataset", None, "a dataset name", "pass --dataset (the model file does not name one)")
    ds = load_dataset(name, path, limit=limit, vocab=recipe.get("vocab"), max_len=recipe.get("max_len"))
    trained_on, found = recipe.get("classes"), list(getattr(ds, "classes", ()))
    if trained_on and found and found != trained_on:  # label i is another class: every accuracy would be wrong
        raise DataError(f"--data {str(path)!r} has the classes {found}, the model was trained on {trained_on}; "
                        "allowed: the same class folders (label i is the i-th name). Fix: evaluate on a folder "
                        "with the model's class subfolders (an empty test class folder is allowed)")
    return ds


def _run_info(config: RunConfig, ds: ImageDataset | TextDataset, qat: QATConfig | None = None) -> dict:
    """What a training trains on, saved in its checkpoints: a resume on other data or settings is refused."""
    return {"model": config.model, "dataset": ds.name, "data": None if config.data is None else
            str(Path(config.data).resolve()), "limit": config.limit, "train_samples": len(ds.train),
            "qat": None if qat is None else to_dict(qat)}


def _shard() -> tuple[int, int]:
    return distributed.rank(), distributed.world_size()


def _norm(ds: ImageDataset | TextDataset) -> dict:
    return {} if isinstance(ds, TextDataset) else dict(mean=ds.mean, std=ds.std)


def _loaders(ds: ImageDataset | TextDataset, train: TrainConfig):
    """Training, calibration and test batches. Under torchrun the training loader yields this rank's part of
    every batch; calibration and test see whole batches (every rank calibrates alike)."""
    common = _norm(ds)
    return (BatchLoader(ds.train, batch_size=train.batch_size, shuffle=True, seed=train.seed, augment=train.augment,
                        shard=_shard(), **common),
            BatchLoader(ds.train, batch_size=train.batch_size, shuffle=True, seed=train.seed + 1, **common),
            BatchLoader(ds.test, batch_size=EVAL_BATCH, shuffle=False, **common))


def _val_loader(ds: ImageDataset | TextDataset) -> BatchLoader:
    """The test batches fit evaluates after each epoch: under torchrun each rank its part (fit sums them)."""
    return BatchLoader(ds.test, batch_size=EVAL_BATCH, shuffle=False, shard=_shard(), **_norm(ds))


def train_float(config: RunConfig, ds: ImageDataset | TextDataset, out: Path, resume: bool = False) -> nn.Module:
    torch.manual_seed(config.train.seed)
    model = build_for(config.model, ds)
    check_rules(model, config.qat)  # (a rule naming no layer: before the float training, not after it)
    train_loader = _loaders(ds, config.train)[0]
    ckpt_dir = out / "checkpoints" / "float"
    fit(model, train_loader, config.float_train, val_loader=_val_loader(ds), checkpoint_dir=ckpt_dir,
        resume=resume and (ckpt_dir / CHECKPOINT_NAME).exists(), run_info=_run_info(config, ds))
    if distributed.is_main():
        with atomic_file(out / FLOAT_FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return model


def qat_config(config: RunConfig, ds: ImageDataset | TextDataset, float_model: nn.Module, weight_bits: int,
               act_bits: int) -> QATConfig:
    """config.qat at these bits; below 8 bits with keep_sensitive N, plus a rule keeping at 8 bits each of the N layers
    that lose most when quantized alone (qatkit.sensitivity of the float model on calibration batches)."""
    qcfg = dataclasses.replace(config.qat, weight_bits=weight_bits, act_bits=act_bits)
    if not config.keep_sensitive or min(weight_bits, act_bits) == 8:
        return qcfg
    _, calib_loader, test_loader = _loaders(ds, config.train)
    found = sensitivity(float_model, qcfg, next(iter(test_loader))[0][:2], calib_loader,
                        num_batches=min(4, config.train.calib_batches))
    top = qcfg.weight_spec(8, per_channel=True).bits  # (7 with reduce_range)
    kept = [row["layer"] for row in found["layers"]  # (an embedding's act_bits: None, it has no input quantizer)
            if row["weight_bits"] < top or (row["act_bits"] or 8) < 8]
    return dataclasses.replace(qcfg, rules=qcfg.rules + tuple(
        LayerRule(pattern=glob.escape(name), weight_bits=8, act_bits=8) for name in kept[:config.keep_sensitive]))


def quantize(config: RunConfig, ds: ImageDataset | TextDataset, float_model: nn.Module, weight_bits: int, act_bits: int,
             out: Path, *, train: bool, resume: bool = False, qcfg: QATConfig | None = None) -> nn.Module:
    """PTQ (train=False: calibration only) or QAT from the float model, at one bit-width (`qcfg`: qat_config's,
    where the caller has it)."""
    qcfg = qat_config(config, ds, float_model, weight_bits, act_bits) if qcfg is None else qcfg
    train_loader, calib_loader, test_loader = _loaders(ds, config.train)
    model = prepare(float_model, qcfg, next(iter(test_loader))[0][:2])
    calibrate(model, calib_loader, config.train.calib_batches)
    if train:
        name = f"qat_w{weight_bits}a{act_bits}"
        ckpt_dir = out / "checkpoints" / name
        fit(model, train_loader, config.train, val_loader=_val_loader(ds), teacher=float_model,
            error_penalty=qcfg.error_penalty, checkpoint_dir=ckpt_dir,
            resume=resume and (ckpt_dir / CHECKPOINT_NAME).exists(), run_info=_run_info(config, ds, qcfg))
        if distributed.is_main():
            save_checkpoint(out / f"{name}.ckpt", {"model": model.state_dict(), "recipe": _recipe(config, ds, qcfg)})
    return model


# What a recipe must hold, and of which type: a text model's vocabulary and length, or an image's shape.
_RECIPE_FIELDS = {"model": str, "num_classes": int}
_INPUT_FIELDS = ({"vocab": list, "max_len": int}, {"in_channels": int, "image_size": int})
MAX_SIZE = 65_536  # (a recipe's sizes above it are damage, and would allocate without bound)


def check_recipe(recipe: object, source: str) -> dict:
    """`recipe` (from a checkpoint or a model file: `source` names it) with the fields model_from_recipe and
    example_input read, of their types and sizes; else ModelFileError naming the first that is not."""
    if not isinstance(recipe, dict) or not recipe:
        raise ModelFileError(f"{source} has no recipe (the model and input shape qatkit run/train store). Fix: pass a "
                             "file qatkit train/run/convert wrote, or export it in Python: qatkit.export."
                             "export_onnx(model, path, example)")
    fields = {**_RECIPE_FIELDS, **(_INPUT_FIELDS[0] if "vocab" in recipe else _INPUT_FIELDS[1])}
    for key, kind in fields.items():
        value = recipe.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or kind is int and not 1 <= value <= MAX_SIZE:
            allowed = f"an integer 1..{MAX_SIZE}" if kind is int else f"a {kind.__name__}"
            raise ModelFileError(f"{source} has a recipe whose {key!r} is {value!r}; allowed: {allowed}. Fix: pass a "
                                 "file qatkit train/run/convert wrote, undamaged")
    return recipe


def qat_checkpoint(checkpoint: str | os.PathLike) -> tuple[dict, dict]:
    """(state, recipe) of a QAT checkpoint written by `quantize` (train=True), its recipe checked."""
    state = load_checkpoint(checkpoint)
    recipe = state.get("recipe")
    if not isinstance(recipe, dict) or recipe.get("qat") is None or not isinstance(state.get("model"), dict):
        raise ModelFileError(f"checkpoint {str(checkpoint)!r} has no QAT recipe and weights. Fix: pass a qat_*.ckpt "
                             "written by qatkit train/run")
    return state, check_recipe(recipe, f"checkpoint {str(checkpoint)!r}")


def rebuild_qat(checkpoint: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The QAT model saved by `quantize` (train=True), from its checkpoint's recipe and weights."""
    state, recipe = qat_checkpoint(checkpoint)
    qat = prepare(model_from_recipe(recipe), qat_config_from_dict(recipe["qat"]), example_input(recipe))  # as trained
    try:
        qat.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ModelFileError(f"checkpoint {str(checkpoint)!r} does not match its recipe ({error_detail(e)}). "
                             "Fix: use the checkpoint with the qatkit version that wrote it") from None
    return qat, recipe


def save_integer(model: nn.Module, recipe: dict, path: Path) -> int:
    integer = convert(model)
    integer.meta["recipe"] = recipe
    save(integer, path)
    return path.stat().st_size


def export_model(model: nn.Module, recipe: dict, path: Path) -> list[str]:
    """ONNX (QDQ) file of a QAT or integer model, traced with one input of the recipe's shape."""
    from qatkit.export import export_onnx

    return export_onnx(model, path, example_input(recipe))


def example_input(recipe: dict) -> torch.Tensor:
    """One input of the recipe's shape: a zero image, or a sequence of unknown-word ids (id 1, no padding)."""
    if "vocab" in recipe:
        return torch.ones(1, recipe["max_len"], dtype=torch.int64)
    return torch.zeros(1, recipe["in_channels"], recipe["image_size"], recipe["image_size"])


def _row(method: str, w: int, a: int, accuracy: float, path: Path, seconds: float, **extra) -> dict:
    return {"method": method, "weight_bits": w, "act_bits": a, "accuracy": accuracy,
            "model_bytes": path.stat().st_size, "file": path.name, "seconds": round(seconds, 2), **extra}


def check_out_folder(out: Path) -> None:
    """--out may be a folder or not exist; an existing file, or a path under a file, is refused."""
    under_file = file_above(out)
    if out.exists() and not out.is_dir() or under_file is not None:
        why = "exists and is not a folder" if under_file is None else f"is under the file {str(under_file)!r}"
        raise ConfigError(f"--out {str(out)!r} {why}; allowed: a new or empty folder. Fix: pass another --out")


def run(config: RunConfig, out: str | os.PathLike, *, log=print) -> dict:
    """The whole pipeline; returns results.json's content. `out` must not exist or be empty.
    Under torchrun every rank trains (data-parallel) and rank 0 alone does the rest and writes; the others
    return {}."""
    final = Path(out).resolve() if Path(out).is_symlink() else Path(out)  # (a link: the folder it names)
    if final.name in ("", ".", ".."):  # (run writes OUT.partial beside it, then renames it)
        raise ConfigError(f"--out {str(out)!r} names no folder of its own; allowed: a new or empty folder's name. "
                          "Fix: pass --out NAME")
    if not distributed.is_main():
        _train_only(config, final.with_name(final.name + ".partial"))
        return {}
    check_out_folder(final)
    if final.exists() and any(final.iterdir()):
        raise ConfigError(f"--out {str(final)!r} exists and is not empty; allowed: a new or empty folder. "
                          "Fix: pass another --out or remove the folder")
    work = final.with_name(final.name + ".partial")
    if work.exists() or work.is_symlink():  # (another run's work folder, or one a killed run left)
        raise ConfigError(f"{str(work)!r} exists: the work folder of a run into --out {str(out)!r} that is running "
                          "or was killed; allowed: none there. Fix: remove it once no run uses it, or pass another --out")
    work.mkdir(parents=True)
    try:
        results = _run(config, work, log)
        if final.exists():
            final.rmdir()
        work.rename(final)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, (TrainingInterrupted, KeyboardInterrupt)):  # (fit's fix names a checkpoint just removed)
            reason = str(e).split(";")[0].split(", before its first checkpoint")[0] or "Ctrl-C"
            message = (f"{reason}; a stopped run keeps nothing ({str(work)!r} was removed). Fix: run it again, or "
                       "train with qatkit train --out DIR, which --resume continues from its last checkpoint")
            raise (TrainingInterrupted(message, e.signum) if isinstance(e, TrainingInterrupted)
                   else KeyboardInterrupt(message)) from None
        raise
    return results


def _train_only(config: RunConfig, out: Path) -> None:
    """A rank other than 0 in `run`: its part of each training (float, then QAT per bit-width), nothing else."""
    ds = load_dataset(config.dataset, config.data, limit=config.limit)
    float_model = train_float(config, ds, out)
    for w, a in zip(config.weight_bits, config.act_bits):
        quantize(config, ds, float_model, w, a, out, train=True)


def _run(config: RunConfig, out: Path, log) -> dict:
    t_start = time.perf_counter()
    ds = load_dataset(config.dataset, config.data, limit=config.limit)
    _, _, test_loader = _loaders(ds, config.train)
    log(f"[qatkit] {config.model} on {ds.name}: {len(ds.train)} train / {len(ds.test)} test samples")
    t = time.perf_counter()
    float_model = train_float(config, ds, out)
    float_path = out / FLOAT_FILE
    rows = [_row("float", 32, 32, evaluate(float_model, test_loader)["accuracy"], float_path, time.perf_counter() - t)]
    tables = {}
    for w, a in zip(config.weight_bits, config.act_bits):
        qcfg = qat_config(config, ds, float_model, w, a)
        if len(qcfg.rules) > len(config.qat.rules):
            log(f"[qatkit] W{w}A{a}: kept at 8 bits, the layers that lose most alone: "
                + ", ".join(r.pattern for r in qcfg.rules[len(config.qat.rules):]))
        for method in ("ptq", "qat"):
            t = time.perf_counter()
            model = quantize(config, ds, float_model, w, a, out, train=method == "qat", qcfg=qcfg)
            accuracy = evaluate(model, test_loader)["accuracy"]
            path = out / f"{method}_w{w}a{a}.safetensors"
            save_integer(model, _recipe(config, ds, qcfg), path)
            integer = load(path)
            extra = {"integer_model_accuracy": evaluate(integer, test_loader)["accuracy"]}
            if method == "qat":  # the deployable form: ONNX for ONNX Runtime's int8 kernels, checked against qatkit
                onnx_path = path.with_suffix(".onnx")
                notes = export_model(integer, integer.meta["recipe"], onnx_path)
                check = verify(onnx_path, integer, test_loader)
                extra.update(onnx_bytes=onnx_path.stat().st_size, onnx_notes=notes,
                             verify={k: check[k] for k in ("n", "top1_agreement", "within_one_step", "max_step_diff")})
            rows.append(_row(method, w, a, accuracy, path, time.perf_counter() - t, **extra))
            tables.setdefault(f"W{w}A{a}", describe(model))
            log(f"[qatkit] {method} W{w}A{a}: accuracy {accuracy:.4f} (integer model file {extra['integer_model_accuracy']:.4f})")
    results = {"model": config.model, "dataset": ds.name, "test_samples": len(ds.test), "rows": rows,
               "seconds": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads(),
               "world_size": distributed.world_size(),
               "config": json.loads(json.dumps(to_dict(config), default=str))}
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    plot = plot_accuracy_vs_bits(rows, out / "accuracy_vs_bits.png", f"{config.model} / {ds.name}")
    write_report(out / "report.md", results=results, quant_tables=tables, plot=plot.name)
    log(results_table(rows))
    return results
