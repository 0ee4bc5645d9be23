"""The training loop: `fit` trains a float or QAT model; `evaluate` measures accuracy and loss.

One optimizer with three parameter groups (weights with decay; biases/norms without; quantizer
scales and zero points at their own lr, without decay), a per-step warmup + cosine schedule,
cross-entropy plus optional distillation from a float teacher and the quantization-error penalty.
Each epoch e starts from torch.manual_seed(seed + e) and loader.set_epoch(e), and `last.ckpt` holds
everything else that carries over, so a run resumed at epoch k ends bit for bit where an
uninterrupted one does. Epoch indices are 0-based (set_epoch, bn_freeze_epoch); the history and
messages count epochs from 1 ("epoch 2/10" is index 1).

Faults: a NaN/Inf loss or gradient raises QatkitError naming the epoch, the step and the first parameter
with a non-finite gradient (config.nonfinite = "stop"), or drops the batch (nonfinite = "skip": no
optimizer step, BN statistics and other buffers put back, the schedule still advances; more than half an
epoch dropped still raises). SIGINT/SIGTERM finish the current step, leave last.ckpt as the last
finished epoch wrote it, and raise KeyboardInterrupt / TrainingInterrupted saying how to resume.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qatkit import inputs
from qatkit.config import TrainConfig, error_penalty_pairs, to_dict
from qatkit.convert.runtime import IntegerModel
from qatkit.devices import check_available, check_dtype, module_device
from qatkit.errors import ConfigError, DataError, ModelFileError, QatkitError, bad_value, error_detail
from qatkit.modes import evaluating
from qatkit.nn import FoldedBn, QLayer
from qatkit.quantizer import FakeQuantizer, check_ranges
from qatkit.regularize import check_penalty_globs, quantization_error_penalty
from qatkit.train import distributed
from qatkit.train.checkpoint import load_checkpoint, save_checkpoint
from qatkit.train.oscillation import OscillationTracker
from qatkit.train.signals import StopOnSignal, TrainingInterrupted, signal_name  # noqa: F401 (re-exported)

CHECKPOINT_NAME = "last.ckpt"
IGNORE_INDEX = -100  # a target that counts nowhere: PyTorch's cross-entropy default, Hugging Face's padding label
# Default quantizer-parameter lr relative to the weights' lr. Adam moves every parameter by about lr per
# step whatever its gradient, and step sizes (~1e-3..1e-1) are far smaller than the unit scale of weights.
SCALE_LR_RATIO = 0.01
# The only TrainConfig fields that may change on resume: nonfinite too, so that a run stopped by a NaN
# can go on from its last checkpoint with nonfinite = "skip".
RESUME_FREE_FIELDS = ("progress", "device", "nonfinite")
_DIVERGED_FIX = ("lower lr (now {lr:g}) or scale_lr, add warmup_epochs (TrainConfig; under train: in qatkit's "
                 "--config YAML), or check the inputs for NaN/Inf")


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device | None = None) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of `model` over (x, y) batches (or dicts of named inputs and "labels"), in
    eval mode without grad, on `device` (default: where the model's weights are); n: the targets counted (samples,
    or positions of sequences and dense predictions, those labelled -100 left out: per_target)."""
    check_ranges(model, "evaluate")
    if device is not None:
        check_available(device)
    correct, loss_sum, n = _eval_sums(model, loader, module_device(model) if device is None else device)
    return _eval_result(correct, loss_sum, n)


@torch.no_grad()
def _eval_sums(model: nn.Module, loader: Iterable, device: str | torch.device) -> tuple[int, float, int]:
    """(correct, summed cross-entropy, samples) over the loader's batches."""
    correct, loss_sum, n = 0, 0.0, 0
    with evaluating(model):
        for batch in loader:
            x, y = inputs.labelled(batch)
            x, y = inputs.to_device(x, device), y.to(device)
            logits, y = per_target(logits_of(inputs.call(model, x)), y)
            loss_sum += F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX).item()
            hits, counted = count_hits(logits, y)
            correct, n = correct + hits, n + counted
    return correct, loss_sum, n


def _eval_result(correct: float, loss_sum: float, n: float) -> dict[str, Any]:
    if n == 0:
        raise DataError("evaluation counted no targets (no batches, or every target -100); allowed: at least one "
                        "(x, y) batch with a target. Fix: check the test split, its labels and --limit")
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": int(n)}


# ---- optimizer and schedule ---------------------------------------------------------------------
def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable scales and zero points of every FakeQuantizer (found by type, not by name)."""
    params = {id(p): p for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters(recurse=False)}
    return list(params.values())


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Groups: weights (decay), 0/1-d params like biases and norms (no decay), quantizers (scale_lr, no decay)."""
    quant = {id(p) for p in quantizer_parameters(model)}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "quantizers": []}
    for p in model.parameters():
        if p.requires_grad:
            groups["quantizers" if id(p) in quant else "decay" if p.ndim >= 2 else "no_decay"].append(p)
    scale_lr = config.lr * SCALE_LR_RATIO if config.scale_lr is None else config.scale_lr
    param_groups = [
        {"name": "decay", "params": groups["decay"], "lr": config.lr, "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "lr": config.lr, "weight_decay": 0.0},
        {"name": "quantizers", "params": groups["quantizers"], "lr": scale_lr, "weight_decay": 0.0},
    ]
    # foreach: one multi-tensor op per update step instead of a Python loop over ~200 small tensors (a QAT model's
    # scales); torch picks it on CUDA only. The same values bit for bit.
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=False, foreach=True)
    return torch.optim.AdamW(param_groups, lr=config.lr, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """Per-step factor on each group's lr: linear warmup, then cosine down to 0 after the last step."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return min(1.0, (step + 1) / warmup)
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- progressive precision ----------------------------------------------------------------------
def _target_bits(model: nn.Module) -> dict[FakeQuantizer, int]:
    """Each quantizer's bit-width to train at (a progressive schedule's last stage): the one it holds, or, while a
    run of fit on this model is unfinished (interrupted; fit again or resume on the same model), the one it held when
    that run began, kept on the model as qatkit_target_bits (a stage's bits are not the target)."""
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizer)}
    kept = getattr(model, "qatkit_target_bits", None)
    if not isinstance(kept, dict) or set(kept) != set(quantizers):
        kept = {name: int(m.bits) for name, m in quantizers.items()}
    model.qatkit_target_bits = kept
    return {quantizers[name]: bits for name, bits in kept.items()}


def stage_bits(config: TrainConfig, epoch: int) -> int | None:
    """Progressive precision: the bit-width of epoch index `epoch`'s stage, or None in the last stage, which
    trains every quantizer at its own bit-width (and always holds the last epoch)."""
    stages, epochs = config.progressive_bits, config.epochs
    stage = len(stages) - 1 if epoch >= epochs - 1 else min(len(stages) - 1, epoch * len(stages) // epochs)
    return None if stage == len(stages) - 1 else stages[stage]


def set_stage_bits(model: nn.Module, bits: int | None, targets: Mapping[FakeQuantizer, int]) -> None:
    """Every quantizer to max(bits, its target bit-width) (bits None: the target). A weight quantizer whose width changes is
    initialised again from its weight (the best range at 4 bits is not the 8-bit one, clipped); an activation
    quantizer keeps its range and learns from there."""
    weights = {m.weight_quant: m for m in model.modules() if isinstance(m, QLayer)}
    for quantizer, target in targets.items():
        want = target if bits is None else max(bits, target)
        if int(quantizer.bits) == want:
            continue
        quantizer.set_bits(want)
        if quantizer in weights and bool(quantizer.initialized):
            quantizer.init_from(weights[quantizer].folded()[0].detach())


# ---- one epoch ----------------------------------------------------------------------------------
def freeze_bn(model: nn.Module) -> None:
    """BN from now on uses running statistics: a folded conv trains its folded form, plain BN stays in eval."""
    for m in model.modules():
        if isinstance(m, FoldedBn):
            m.bn_frozen.fill_(True)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def logits_of(output) -> torch.Tensor:
    """The logits a model returns: its output, the first of a tuple, or a dict's "logits" (Hugging Face's
    `return_dict=False` and model outputs)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, Mapping) and "logits" in output:
        output = output["logits"]
    if not isinstance(output, torch.Tensor):
        shown = f"a dict of {list(output)}" if isinstance(output, Mapping) else type(output).__name__
        raise bad_value("the model's output", shown, "a logits tensor, a tuple whose first item is one, or a dict with "
                        "one under 'logits'", "return the logits (first), or under 'logits'", QatkitError)
    return output


def per_target(logits: torch.Tensor, y: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets as F.cross_entropy takes them: one target per sample, (N, C) and (N,); one per position of
    a sequence, (B, T, C) and (B, T), classes last as sequence models give them (token classification, language
    modelling), flattened to (B·T, C) and (B·T,); dense predictions with classes on axis 1, (B, C, H, W) and
    (B, H, W), as they are. Targets of IGNORE_INDEX (-100: Hugging Face's padding and special tokens) count nowhere.
    Class indices of any integer dtype are taken as int64; float targets of the logits' shape are class
    probabilities (one-hot, smoothed or mixed labels). Other targets are refused, naming the fix (check=False: the
    targets were checked already, by compute_loss in the same step)."""
    soft = y.is_floating_point() and y.shape == logits.shape
    classes = logits.shape[-1] if logits.dim() == 3 else logits.shape[1] if logits.dim() > 1 else None
    expected = (logits.shape[:-1] if logits.dim() == 3 else logits.shape[:1] + logits.shape[2:]) if classes else None
    if not soft and (expected is None or y.shape != expected or y.is_floating_point() or y.dtype == torch.bool):
        what = f"{'float' if y.is_floating_point() else str(y.dtype).replace('torch.', '')} targets of shape " \
               f"{tuple(y.shape)}"
        allowed = (f"class indices (integers) of shape {tuple(expected)}, or class probabilities of the logits' shape "
                   f"{tuple(logits.shape)}" if expected is not None else "logits with a class axis")
        raise bad_value("targets", what, f"{allowed} (-100: no target)", "give integer class indices (y.long()) one "
                        "per sample or position, or probabilities of the logits' shape", DataError)
    if not soft:
        y = y.long()
        if check and (valid := y[y != IGNORE_INDEX]).numel():
            low, high = (int(v) for v in torch.aminmax(valid))
            if low < 0 or high >= classes:
                raise bad_value("a target class", low if low < 0 else high,
                                f"0 .. {classes - 1} for the model's {classes} classes, or -100 (no target)",
                                "check the labels against the model's number of classes", DataError)
    if logits.dim() == 3:
        return logits.reshape(-1, classes), y.reshape(-1, classes) if soft else y.reshape(-1)
    return logits, y


def count_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(right predictions, targets counted) of per_target's logits and targets (probabilities: their top class)."""
    if y.is_floating_point():
        return int((logits.argmax(1) == y.argmax(1)).sum()), logits.numel() // logits.shape[1]
    counted = y != IGNORE_INDEX
    return int(((logits.argmax(1) == y) & counted).sum()), int(counted.sum())


def compute_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                 config: TrainConfig, error_penalty: Mapping[str, float]) -> torch.Tensor:
    """Cross-entropy (per sample, or per position: per_target; dense predictions one row per pixel, as a sequence's
    positions), distillation, the quantization-error penalty; targets of -100 count in neither (a batch with none to
    count: 0, with the penalty's gradient still)."""
    logits, y = per_target(logits, y)
    if teacher_logits is not None and teacher_logits.numel() != logits.numel():
        raise bad_value("the teacher's logits", f"of shape {tuple(teacher_logits.shape)}", "the shape of the model's "
                        "logits (the same classes)", "pass the float model the QAT model was prepared from")
    teacher = None if teacher_logits is None else teacher_logits.reshape(logits.shape)
    if logits.dim() > 2:  # (B, C, H, W) as (B·H·W, C) rows
        def rows(t):
            return t.movedim(1, -1).reshape(-1, t.shape[1])
        logits, teacher = rows(logits), None if teacher is None else rows(teacher)
        y = rows(y) if y.is_floating_point() else y.reshape(-1)
    if not y.is_floating_point() and not bool((counted := y != IGNORE_INDEX).all()):
        logits, y, teacher = logits[counted], y[counted], None if teacher is None else teacher[counted]
    loss = F.cross_entropy(logits, y) if len(logits) else logits.sum() * 0.0
    if teacher is not None and len(logits):  # Hinton et al. 2015: (1-d)·CE + d·T²·KL(p_teacher || p_student)
        t = config.temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                      log_target=True)
        loss = (1.0 - config.distill) * loss + config.distill * t * t * kl
    if error_penalty:
        loss = loss + quantization_error_penalty(model, error_penalty).to(loss.device)
    return loss


def _first_nonfinite_grad(model: nn.Module) -> str:
    """"'name' (NaN|Inf)" of the first parameter, in model order, whose gradient is not finite."""
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"{name!r} ({'NaN' if bool(torch.isnan(p.grad).any()) else 'Inf'})"
    return "a parameter outside the model"  # the optimizer holds one that named_parameters() does not list


def _grads_finite(params: list[nn.Parameter]) -> bool:
    """One check for all gradients: the max-abs norm of each (no copy, no overflow), stacked, isfinite."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, ord=math.inf))).all())


def penalty_scale(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The factor on the error penalty's λ at a step: 1, or the cosine ramp from 0 (first step) to 1 (last)."""
    if config.penalty_schedule == "constant":
        return 1.0
    t = min((epoch * steps + step) / max(config.epochs * steps - 1, 1), 1.0)
    return 0.5 * (1.0 - math.cos(math.pi * t))


def train_epoch(model: nn.Module, loader: Iterable, optimizer, scheduler, config: TrainConfig, epoch: int,
                steps: int, teacher: nn.Module | None, error_penalty: Mapping[str, float],
                on_step: Callable[[int], None] | None = None,
                tracker: OscillationTracker | None = None, net: nn.Module | None = None) -> dict[str, float]:
    """One epoch; on_step(k) runs after the k-th step (1-based) is complete, skipped or not. `net` runs the
    forward pass when it is not `model` itself (DistributedDataParallel around it)."""
    net = model if net is None else net
    model.train()
    if config.bn_freeze_epoch is not None and epoch >= config.bn_freeze_epoch:
        freeze_bn(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    skip = config.nonfinite == "skip"
    collective = distributed.is_distributed()
    where = lambda step: f"epoch {epoch + 1}/{config.epochs}, step {step + 1}/{steps}"
    # (disable=None: a bar on a terminal only; a log file gets the epochs' lines, not every redraw of the bar)
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=None if config.progress else True, leave=False, dynamic_ncols=True)
    loss_sum, correct, n, skipped, lr = 0.0, 0, 0, 0, optimizer.param_groups[0]["lr"]
    try:
        for step, batch in enumerate(bar):
            x, y = inputs.labelled(batch)
            x, y = inputs.to_device(x, config.device), y.to(config.device)
            buffers = [b.detach().clone() for b in model.buffers()] if skip else None  # BN stats, put back on a skip
            try:
                logits = logits_of(inputs.call(net, x))
            except ValueError as e:  # (PyTorch's BatchNorm on one sample in training)
                if "Expected more than 1 value per channel" not in str(e):
                    raise
                raise DataError(f"batch {step + 1}/{steps} of epoch {epoch + 1} has one sample, on which BatchNorm "
                                "cannot compute training statistics; allowed: batches of 2 or more samples. Fix: "
                                "drop the last, smaller batch (DataLoader(..., drop_last=True))") from None
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = logits_of(inputs.call(teacher, x))
            scale = penalty_scale(config, epoch, step, steps)
            loss = compute_loss(model, logits, y, teacher_logits, config,
                                {glob: lam * scale for glob, lam in error_penalty.items()})
            loss_value = loss.item()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            fault = allowed = None
            finite = math.isfinite(loss_value)
            hits, counted = count_hits(*per_target(logits.detach(), y, check=False))
            if collective:  # every rank skips the batch, or none: backward is collective
                bad, total = distributed.all_sum([float(not finite), float(counted)], y.device)
                finite = bad == 0
                if total > 0:  # DDP averages the ranks' gradients: each rank's mean weighted by its share of the
                    loss = loss * (counted * distributed.world_size() / total)  # targets, the whole batch's mean
            if not finite:
                fault = f"loss = {loss_value}" if not math.isfinite(loss_value) else "a non-finite loss on another rank"
                allowed = "a finite loss"
            else:
                loss.backward()
                if not _grads_finite(params):
                    fault, allowed = f"gradient of {_first_nonfinite_grad(model)} is not finite", "finite gradients"
                elif config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, config.grad_clip)
            if fault is None:
                optimizer.step()
                if tracker is not None:
                    tracker.update()
                loss_sum, correct, n = loss_sum + loss_value * counted, correct + hits, n + counted
            elif not skip:
                raise QatkitError(f"training diverged: {fault} at {where(step)}; allowed: {allowed}. "
                                  f"Fix: {_DIVERGED_FIX.format(lr=config.lr)}, or set train.nonfinite: skip "
                                  "to drop such batches")
            else:
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, saved in zip(model.buffers(), buffers):
                        b.copy_(saved)
                if 2 * skipped > steps:
                    raise QatkitError(f"training diverged: {skipped} of {steps} batches skipped in epoch "
                                      f"{epoch + 1}/{config.epochs} (the last: {fault} at step {step + 1}/{steps}); "
                                      "allowed: at most half of an epoch's batches with nonfinite = 'skip'. "
                                      f"Fix: {_DIVERGED_FIX.format(lr=config.lr)}")
            if fault is None:
                scheduler.step()
            else:  # a skipped batch still advances the schedule, so a resumed run stays exact
                with warnings.catch_warnings():  # torch warns when the very first step is a skipped one
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    scheduler.step()
            if fault is None:
                bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{correct / max(n, 1):.3f}", lr=f"{lr:.2e}",
                                refresh=False)
            if on_step is not None:
                on_step(step + 1)
    finally:
        bar.close()
    loss_sum, correct, n = distributed.all_sum([loss_sum, correct, n], torch.device(config.device))
    if n + skipped == 0:
        raise DataError(f"train_loader yielded no batches in epoch {epoch + 1}; allowed: at least one (x, y) batch. "
                        "Fix: check the training split and --limit")
    row = {"train_loss": loss_sum / n if n else math.nan, "train_acc": correct / n if n else math.nan}
    if skip:
        row["skipped"] = skipped
    return {**row, **(tracker.epoch_stats() if tracker is not None else {}), "lr": lr}


def _stop_message(signum: int, epoch: int, step: int, steps: int, config: TrainConfig, ckpt_path: Path | None,
                  saved_epoch: int | None) -> str:
    """Where a run stopped on a signal, what its last checkpoint holds and how to go on."""
    if step:
        at = f"at epoch {epoch + 1}/{config.epochs}, after step {step}/{steps}"
    else:
        at = f"after epoch {epoch}/{config.epochs}" if epoch else f"before epoch 1/{config.epochs} began"
    if ckpt_path is None:
        return (f"training interrupted by {signal_name(signum)} {at}; nothing was saved (no checkpoint_dir). "
                "Fix: pass checkpoint_dir=... to fit to make the run resumable, and run it again")
    if saved_epoch is None:
        return (f"training interrupted by {signal_name(signum)} {at}, before its first checkpoint {str(ckpt_path)!r}. "
                "Fix: run it again; with --resume it starts this stage from the beginning")
    return (f"training interrupted by {signal_name(signum)} {at}; {str(ckpt_path)!r} holds epoch "
            f"{saved_epoch}/{config.epochs} (later steps are redone). Fix: resume with --resume (fit(..., resume=True))")


# ---- checkpoints --------------------------------------------------------------------------------
def _run_settings(config: TrainConfig, error_penalty: Mapping[str, float], steps: int) -> dict[str, Any]:
    """What must be equal for a resumed run to continue the saved one exactly."""
    settings = {k: v for k, v in to_dict(config).items() if k not in RESUME_FREE_FIELDS}
    return {**settings, "error_penalty": dict(error_penalty), "steps_per_epoch": steps}


def _restore(path: Path, model: nn.Module, optimizer, scheduler, settings: dict[str, Any],
             run_info: dict[str, Any], tracker: OscillationTracker | None) -> tuple[list[dict], int]:
    """Load `path` into model, optimizer, scheduler (and tracker); return (history, next epoch index)."""
    state = load_checkpoint(path)
    # a field added to TrainConfig after the checkpoint was written holds its default there; a checkpoint
    # written before run_info was saved is not checked against it
    saved_info = state.get("run_info") or {}
    saved = {**to_dict(TrainConfig()), **state.get("config", {}), "error_penalty": state.get("error_penalty"),
             "steps_per_epoch": state.get("steps_per_epoch"), **saved_info}
    for key, value in {**settings, **{k: v for k, v in run_info.items() if k in saved_info}}.items():
        if saved.get(key) != value:
            raise ConfigError(f"resume: {key} = {value!r} differs from {saved.get(key)!r} in checkpoint {str(path)!r}; "
                              f"allowed: the checkpoint's value (only {' and '.join(RESUME_FREE_FIELDS)} may change). "
                              f"Fix: set {key} back to {saved.get(key)!r}"
                              + (" (it follows the training split's size, --limit, and the batch size)"
                                 if key == "steps_per_epoch" else " (train: in qatkit's --config YAML)"
                                 if key in settings and key != "error_penalty" else "")
                              + ", or start a new run without --resume")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if tracker is not None and "oscillations" in state:
            tracker.load_state_dict(state["oscillations"])
        return list(state["history"]), int(state["epoch"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"checkpoint {str(path)!r} does not fit this model ({error_detail(e)}); allowed: a "
                             "checkpoint of the same model and QAT settings. Fix: resume with the same --model and "
                             "QAT config, or start without --resume") from None


def _check_distributed(model: nn.Module, steps: int, device: torch.device) -> None:
    """Before a data-parallel fit: equal batches per epoch on every rank (else a rank would wait forever for the
    others' gradients), and no activation range left to be set from a rank's own first batch."""
    total = distributed.all_sum([steps], device)[0]
    if total != steps * distributed.world_size():
        raise DataError(f"train_loader has {steps} batches per epoch on rank {distributed.rank()} but "
                        f"{total:g} over {distributed.world_size()} ranks; allowed: the same number on every rank. "
                        "Fix: give each rank its part of every batch (BatchLoader(..., shard=(rank, world_size)) or a "
                        "DistributedSampler with drop_last=True)")
    weights = {id(m.weight_quant) for m in model.modules() if isinstance(m, QLayer)}
    unset = [name for name, m in model.named_modules() if isinstance(m, FakeQuantizer) and id(m) not in weights
             and bool(m.enabled) and not bool(m.initialized)]
    if unset:
        raise ConfigError(f"activation quantizer {unset[0]!r} has no range yet ({len(unset)} such); allowed in a "
                          "distributed fit: calibrated ranges (each rank would set its own from its first batch). "
                          "Fix: run qatkit.calibrate(model, batches) before fit")


def _steps_per_epoch(loader: Iterable) -> int:
    try:
        steps = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise bad_value("train_loader", f"a {type(loader).__name__} without len()", "a re-iterable loader with "
                        "len() (BatchLoader, a DataLoader of a map-style dataset, a list of batches): fit counts an "
                        "epoch's steps for its schedule", "wrap the batches in a list, use qatkit.data.BatchLoader, "
                        "or give an iterable dataset __len__", DataError) from None
    if steps < 1:
        raise DataError("train_loader has 0 batches per epoch; allowed: at least one. Fix: check the training split")
    return steps


def _settings_without_effect(config: TrainConfig) -> list[str]:
    """TrainConfig settings that config.epochs leaves without effect (a shortened run of a longer recipe)."""
    epochs, stages, unused = config.epochs, config.progressive_bits, []
    if epochs and config.bn_freeze_epoch is not None and config.bn_freeze_epoch >= epochs:
        unused.append(f"bn_freeze_epoch = {config.bn_freeze_epoch} (0-based) is not below epochs = {epochs}: BN is "
                      f"never frozen. Fix: set bn_freeze_epoch below {epochs}, or None")
    if epochs and len(stages) > epochs:
        trained = sorted({stages[-1] if (b := stage_bits(config, e)) is None else b for e in range(epochs)},
                         reverse=True)
        unused.append(f"progressive_bits = {list(stages)} has {len(stages)} stages but epochs = {epochs}: only "
                      f"{trained} train. Fix: at least {len(stages)} epochs, or fewer stages")
    if epochs and config.warmup_epochs >= epochs:
        unused.append(f"warmup_epochs = {config.warmup_epochs:g} is not below epochs = {epochs}: the learning rate "
                      f"never reaches lr and never decays. Fix: a warmup shorter than the run")
    return unused


# ---- fit ----------------------------------------------------------------------------------------
def fit(model: nn.Module, train_loader: Iterable, config: TrainConfig, *, val_loader: Iterable | None = None,
        teacher: nn.Module | None = None, error_penalty: Mapping[str, float] | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = False,
        run_info: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train `model` (float or QAT) in place for config.epochs; return the per-epoch history.

    train_loader: re-iterable (x, y) batches (or dicts of the model's named inputs and "labels") with len(); its
    set_epoch(e) is called when it has one.
    teacher: float model for distillation, used when config.distill > 0 (eval mode, no grad).
    error_penalty: {parameter glob: λ} for qatkit.regularize.quantization_error_penalty (over training as
    config.penalty_schedule says); None: the QATConfig.error_penalty the model was prepared with. A glob that
    matches no quantized weight or bias is refused.
    checkpoint_dir: `last.ckpt` is written there after every epoch; resume=True continues from it.
    run_info: plain data naming what the run trains (the dataset, its path and size, the model): saved in last.ckpt,
    and a resume whose run_info differs from the checkpoint's is refused, like one with other TrainConfig settings.

    A NaN/Inf loss or gradient raises QatkitError (config.nonfinite = "stop") or drops the batch ("skip",
    counted in the history's `skipped`). SIGINT/SIGTERM (main thread) stop after the current step with
    KeyboardInterrupt / TrainingInterrupted; last.ckpt then holds the last finished epoch.

    In a process group (torchrun; qatkit.train.distributed) the model trains data-parallel: each rank's loaders
    yield that rank's part of every batch (BatchLoader(..., shard=(rank, world_size))), the same number of
    batches on every rank; ranges must be calibrated first; config.device "cuda" is the rank's LOCAL_RANK GPU.
    Rank 0 writes last.ckpt and prints; the history's losses and accuracies are over all ranks.
    """
    if not isinstance(config, TrainConfig):
        raise bad_value("config", type(config).__name__, "a qatkit.config.TrainConfig",
                        "build one with TrainConfig(...)")
    if config.distill > 0 and teacher is None:
        raise bad_value("distill", config.distill, "0 without a teacher model", "pass teacher=... or set distill to 0")
    if resume and checkpoint_dir is None:
        raise bad_value("resume", resume, "True only with checkpoint_dir", "pass checkpoint_dir=... or resume=False")
    if not isinstance(model, nn.Module) or isinstance(model, IntegerModel):
        raise bad_value("the model fit trains", type(model).__name__, "a float or QAT torch model (an integer model "
                        "computes fixed integers: it has nothing to train)", "fit the QAT model, then convert it")
    if teacher is not None and (teacher is model or not isinstance(teacher, nn.Module)):
        raise bad_value("teacher", "the model itself" if teacher is model else type(teacher).__name__,
                        "the float model (a torch module) the QAT model was prepared from",
                        "pass teacher=float_model")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise bad_value("checkpoint_dir", str(checkpoint_dir), "a folder (new or existing)", "pass a folder path")
    check_dtype(model, "fit")
    for unused in _settings_without_effect(config):
        warnings.warn(f"qatkit: {unused}", stacklevel=2)
    if error_penalty is None:
        error_penalty = getattr(getattr(model, "qat_info", None), "error_penalty", ())
    error_penalty = dict(error_penalty_pairs(error_penalty))
    check_penalty_globs(model, error_penalty)
    steps = _steps_per_epoch(train_loader)
    if config.augment != "none" and getattr(train_loader, "augment", None) != config.augment:
        warnings.warn(f"qatkit: TrainConfig.augment = {config.augment!r} is not applied by fit, which trains on "
                      "train_loader's batches as they are; qatkit.data.BatchLoader(..., augment=...) applies it (as "
                      "qatkit run/train do)", stacklevel=2)
    config = dataclasses.replace(config, device=str(distributed.local_device(config.device)),
                                 progress=config.progress and distributed.is_main())
    model.to(config.device)
    if distributed.is_distributed():
        _check_distributed(model, steps, torch.device(config.device))
    if teacher is not None and config.distill > 0:
        teacher.to(config.device).eval()
    else:
        teacher = None
    targets = _target_bits(model)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    settings = _run_settings(config, error_penalty, steps)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    run_info = dict(run_info or {})
    tracker = OscillationTracker(model, targets) if config.track_oscillations else None
    history, start = (_restore(ckpt_path, model, optimizer, scheduler, settings, run_info, tracker) if resume
                      else ([], 0))
    net = distributed.wrap(model, torch.device(config.device)) if distributed.is_distributed() else model
    saved_epoch = start if resume else None  # the epoch last.ckpt holds, once this run has one
    at = {"epoch": start, "step": 0}  # epoch index, steps done in it (0: at the epoch boundary)

    with StopOnSignal() as stop:
        stop.describe = lambda signum: _stop_message(signum, at["epoch"], at["step"], steps, config, ckpt_path,
                                                     saved_epoch)

        def after_step(done: int) -> None:
            at["step"] = done
            if stop.requested:
                raise stop.exception()

        for epoch in range(start, config.epochs):
            at.update(epoch=epoch, step=0)
            t0 = time.perf_counter()
            torch.manual_seed(config.seed + epoch)
            set_stage_bits(model, stage_bits(config, epoch) if config.progressive_bits else None, targets)
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch + 1}
            row.update(train_epoch(model, train_loader, optimizer, scheduler, config, epoch, steps, teacher,
                                   error_penalty, on_step=after_step, tracker=tracker, net=net))
            distributed.average_bn_statistics(model)
            if val_loader is not None:  # each rank its part of the batches, summed
                sums = distributed.all_sum(list(_eval_sums(model, val_loader, config.device)), torch.device(config.device))
                row["val_accuracy"] = _eval_result(*sums)["accuracy"]
            row["lr"] = row.pop("lr")  # keep the documented key order
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            if config.progress:
                val = f", val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
                skipped = f", {row['skipped']} batches skipped" if row.get("skipped") else ""
                osc = f", {row['oscillating']:.2%} of weights oscillated" if "oscillating" in row else ""
                tqdm.write(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}, "
                           f"train acc {row['train_acc']:.4f}{val}{skipped}{osc}, lr {row['lr']:.2e}, {row['seconds']:.1f}s")
            if ckpt_path is not None:  # a signal meanwhile only sets the flag: the write always completes
                if distributed.is_main():  # one writer; on resume every rank reads it
                    save_checkpoint(ckpt_path, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "steps_per_epoch": steps,
                        "history": history, "config": to_dict(config), "error_penalty": error_penalty,
                        "run_info": run_info, **({"oscillations": tracker.state_dict()} if tracker else {}),
                    })
                saved_epoch = epoch + 1
            at.update(epoch=epoch + 1, step=0)
            if stop.requested:
                raise stop.exception()
    del model.qatkit_target_bits  # (the run is done: the model holds them)
    return history
