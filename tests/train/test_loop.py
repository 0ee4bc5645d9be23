"""fit/evaluate on scikit-learn's 8x8 digits: float and QAT training, distillation, BN freezing,
divergence, and exact resume from last.ckpt."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qatkit.calibrate import calibrate
from qatkit.config import QATConfig, TrainConfig
from qatkit.errors import ConfigError, DataError, ModelFileError, QatkitError
from qatkit.models import SmallCNN, build_model
from qatkit.nn import QConvBn
from qatkit.prepare import prepare
from qatkit.quantizer import FakeQuantizer
from qatkit.train import evaluate, fit, load_checkpoint, save_checkpoint
from qatkit.config import train_config_from_dict
from qatkit.train.loop import (
    CHECKPOINT_NAME,
    build_optimizer,
    build_scheduler,
    compute_loss,
    quantizer_parameters,
    set_stage_bits,
    stage_bits,
)

try:
    from qatkit.data import BatchLoader, load_dataset
except ImportError:  # the data package is optional here: fall back to a DataLoader over sklearn's digits
    BatchLoader = load_dataset = None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and two threads on a busy 2-core machine spin-wait
    each other into a 20x slowdown."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """(x_train, y_train, x_test, y_test), x normalised float32 (N, 1, 8, 8)."""
    if load_dataset is not None:
        ds = load_dataset("digits")
        mean, std = ds.mean[0], ds.std[0]
        return (ds.train.x - mean) / std, ds.train.y, (ds.test.x - mean) / std, ds.test.y
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x, y = (x - x[:1437].mean()) / x[:1437].std(), torch.tensor(y)
    return x[:1437], y[:1437], x[1437:], y[1437:]


def loaders(digits, batch_size=64, limit=None):
    """Shuffled train loader (BatchLoader when there is one: it has set_epoch) and a test loader."""
    x_tr, y_tr, x_te, y_te = digits
    x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    if BatchLoader is not None:
        from qatkit.data import Split
        kw = {"mean": (0.0,), "std": (1.0,)}  # already normalised
        return (BatchLoader(Split(x_tr.contiguous(), y_tr), batch_size=batch_size, shuffle=True, **kw),
                BatchLoader(Split(x_te.contiguous(), y_te), batch_size=256, shuffle=False, **kw))
    return (DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x_te, y_te), batch_size=256))


def small_cnn(width=8, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, 10, width=width)


def qat_model(digits, width=8, seed=0):
    return prepare(small_cnn(width, seed), QATConfig(), digits[0][:64])


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "lr": 3e-3, "progress": False, **kw})


@pytest.fixture(scope="module")
def trained(digits):
    """The zoo's small CNN trained in float for 3 epochs: (model, history, test metrics before training)."""
    train, test = loaders(digits)
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    before = evaluate(model, test)
    history = fit(model, train, cfg(epochs=3, warmup_epochs=0.5, weight_decay=1e-4), val_loader=test)
    return model, history, before


def test_fit_float_small_cnn_learns_digits(digits, trained):
    model, history, before = trained
    after = evaluate(model, loaders(digits)[1])
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert list(history[0]) == ["epoch", "train_loss", "train_acc", "val_accuracy", "lr", "seconds"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9 and after["n"] == len(digits[3])
    assert history[-1]["val_accuracy"] == after["accuracy"]
    assert model.training  # evaluate restores the mode it found


def test_fit_qat_model_trains_and_moves_scales(digits, trained):
    train, test = loaders(digits)
    model = prepare(trained[0], QATConfig(weight_bits=4, act_bits=4), digits[0][:64])
    calibrate(model, train, num_batches=4)
    before = evaluate(model, test)
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".scale")}
    assert scales
    history = fit(model, train, cfg(epochs=2, lr=1e-4, scale_lr=1e-5))
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    changed = [n for n, p in model.named_parameters() if n in scales and not torch.equal(p, scales[n])]
    assert sorted(changed) == sorted(scales)
    after = evaluate(model, test)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.9


def test_progress_in_a_log_file_is_a_line_per_epoch(digits, capsys):
    """Not a terminal (a log file, CI): each epoch's line, no progress-bar redraws."""
    train, test = loaders(digits, batch_size=64, limit=128)
    fit(small_cnn(), train, cfg(epochs=2, lr=1e-3, progress=True), val_loader=test)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], lines
    assert "it/s" not in out.out + out.err and "\r" not in out.out + out.err


def test_optimizer_groups(digits):
    model = qat_model(digits)
    quant = quantizer_parameters(model)
    expected = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters(recurse=False)}
    assert {id(p) for p in quant} == expected and expected
    opt = build_optimizer(model, cfg(optimizer="sgd", lr=0.1, scale_lr=0.01, weight_decay=5e-4, momentum=0.8))
    assert isinstance(opt, torch.optim.SGD)
    groups = {g["name"]: g for g in opt.param_groups}
    assert {id(p) for p in groups["quantizers"]["params"]} == expected
    assert (groups["quantizers"]["lr"], groups["quantizers"]["weight_decay"]) == (0.01, 0.0)
    assert (groups["decay"]["lr"], groups["decay"]["weight_decay"]) == (0.1, 5e-4)
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in groups["no_decay"]["params"])
    assert all(g["momentum"] == 0.8 and not g["nesterov"] for g in opt.param_groups)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params
    adamw = build_optimizer(model, cfg(lr=0.1))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[2]["lr"] == pytest.approx(0.001)  # None: lr/100


def test_schedule_warmup_then_cosine_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg(epochs=3, warmup_epochs=1.0), steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay after warmup
    assert lrs[-1] > 0 and opt.param_groups[0]["lr"] == pytest.approx(0.0)


class _Interrupt(Exception):
    pass


class _Loader:
    """Wraps a loader; raises _Interrupt when asked to start epoch `stop_at` (a killed run)."""

    def __init__(self, inner, stop_at=None):
        self.inner, self.stop_at = inner, stop_at

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        return iter(self.inner)

    def set_epoch(self, epoch):
        if epoch == self.stop_at:
            raise _Interrupt
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


@pytest.mark.parametrize("kind", ["float-dataloader", "qat-batchloader", "qat-progressive", "qat-progressive-same"])
def test_resume_is_bit_exact(digits, tmp_path, kind):
    """3 epochs straight == 2 epochs, killed, then resume=True for the 3rd (1, killed, 2): every tensor equal, and the
    history (oscillation counts included). qat-progressive-same resumes the killed model itself, which holds the 4-bit
    stage's bit-widths (it finished at 8 bits: W8A8 instead of W2A2, and the 4-bit stage's oscillations went
    uncounted)."""
    train, test = loaders(digits, batch_size=32, limit=256)
    if kind == "float-dataloader":  # shuffled by the global RNG, which fit seeds per epoch
        train = DataLoader(TensorDataset(digits[0][:256], digits[1][:256]), batch_size=32, shuffle=True)
    def make(seed):
        if kind.startswith("qat-progressive"):  # W2A2, 8 -> 4 -> 2 bits: the resumed epoch starts a new stage
            return prepare(small_cnn(seed=seed), QATConfig(weight_bits=2, act_bits=2), digits[0][:64])
        return small_cnn(seed=seed) if kind.startswith("float") else qat_model(digits, seed=seed)

    config = cfg(epochs=3, warmup_epochs=0.5, weight_decay=1e-3, bn_freeze_epoch=1 if kind.startswith("qat") else None,
                 progressive_bits=(8, 4, 2) if kind.startswith("qat-progressive") else (),
                 track_oscillations=kind.startswith("qat"))

    full = make(0)
    full_history = fit(full, _Loader(train), config, val_loader=test, checkpoint_dir=tmp_path / "full")

    killed, stop = make(0), 1 if kind == "qat-progressive-same" else 2  # (1: in the 4-bit stage)
    with pytest.raises(_Interrupt):
        fit(killed, _Loader(train, stop_at=stop), config, val_loader=test, checkpoint_dir=tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)["epoch"] == stop
    resumed = killed if kind == "qat-progressive-same" else make(1)  # make: everything must come from the checkpoint
    torch.manual_seed(123)  # and nothing from the global RNG state
    history = fit(resumed, _Loader(train), dataclasses.replace(config, progress=True), val_loader=test,
                  checkpoint_dir=tmp_path / "resumed", resume=True)

    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(history) == strip(full_history) and len(history) == 3


def test_resume_refuses_changed_settings_and_missing_file(digits, tmp_path):
    train, _ = loaders(digits, batch_size=64, limit=128)
    fit(small_cnn(), train, cfg(epochs=2, lr=1e-3), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"resume: lr = 0\.002 differs from 0\.001 .*Fix: set lr back to 0\.001"):
        fit(small_cnn(), train, cfg(epochs=2, lr=2e-3), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"resume: error_penalty"):  # (a QAT model: a float one has no Δ to damp)
        fit(qat_model(digits), train, cfg(epochs=2, lr=1e-3), error_penalty={"*.weight": 1e-4},
            checkpoint_dir=tmp_path, resume=True)
    # progress and device may change; a finished run resumes to its saved history without training
    history = fit(small_cnn(), train, cfg(epochs=2, lr=1e-3, progress=True), checkpoint_dir=tmp_path, resume=True)
    assert [row["epoch"] for row in history] == [1, 2]
    with pytest.raises(ModelFileError, match=r"last\.ckpt' does not exist"):
        fit(small_cnn(), train, cfg(), checkpoint_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ModelFileError, match="does not fit this model"):
        fit(SmallCNN(1, 10, width=4), train, cfg(epochs=2, lr=1e-3), checkpoint_dir=tmp_path, resume=True)


def test_resume_checkpoint_from_before_a_config_field_existed(digits, tmp_path):
    """A field missing from an older checkpoint's config counts as its default, not as a change."""
    train, _ = loaders(digits, batch_size=64, limit=128)
    fit(small_cnn(), train, cfg(epochs=2, lr=1e-3), checkpoint_dir=tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    del state["config"]["progressive_bits"]  # as written before progressive precision existed
    save_checkpoint(path, state)
    history = fit(small_cnn(), train, cfg(epochs=2, lr=1e-3), checkpoint_dir=tmp_path, resume=True)
    assert [row["epoch"] for row in history] == [1, 2]
    with pytest.raises(ConfigError, match=r"resume: progressive_bits = \(8, 4\) differs from \(\)"):
        fit(small_cnn(), train, cfg(epochs=2, lr=1e-3, progressive_bits=(8, 4)), checkpoint_dir=tmp_path,
            resume=True)


def test_resume_refuses_other_run_info_and_accepts_a_checkpoint_without_it(digits, tmp_path):
    """run_info (what the run trains on) is saved in last.ckpt; a resume on other data is refused, as a resume with
    other settings is, and a checkpoint written before run_info existed resumes."""
    train, _ = loaders(digits, batch_size=64, limit=128)
    info = {"dataset": "digits", "data": None, "train_samples": 128}
    fit(small_cnn(), train, cfg(epochs=2), checkpoint_dir=tmp_path, run_info=info)
    path = tmp_path / CHECKPOINT_NAME
    assert load_checkpoint(path)["run_info"] == info
    with pytest.raises(ConfigError, match=r"resume: dataset = 'mnist' differs from 'digits' in checkpoint .*last\.ckpt"
                                          r".*Fix: set dataset back to 'digits', or start a new run without --resume"):
        fit(small_cnn(), train, cfg(epochs=2), checkpoint_dir=tmp_path, resume=True,
            run_info={**info, "dataset": "mnist"})
    with pytest.raises(ConfigError, match=r"resume: data = '/d' differs from None"):
        fit(small_cnn(), train, cfg(epochs=2), checkpoint_dir=tmp_path, resume=True, run_info={**info, "data": "/d"})
    assert len(fit(small_cnn(), train, cfg(epochs=2), checkpoint_dir=tmp_path, resume=True, run_info=info)) == 2
    state = load_checkpoint(path)
    del state["run_info"]  # as written before run_info was saved
    save_checkpoint(path, state)
    history = fit(small_cnn(), train, cfg(epochs=2), checkpoint_dir=tmp_path, resume=True,
                  run_info={**info, "dataset": "mnist"})
    assert [row["epoch"] for row in history] == [1, 2]


def test_distillation_runs_with_finite_loss(digits, trained):
    train, _ = loaders(digits, limit=512)
    teacher = copy.deepcopy(trained[0])
    teacher_state = copy.deepcopy(teacher.state_dict())
    student = qat_model(digits)
    history = fit(student, train, cfg(epochs=2, distill=0.7, temperature=4.0, scale_lr=1e-4), teacher=teacher,
                  error_penalty={"*.weight": 1e-3})
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert not teacher.training
    for name, value in teacher.state_dict().items():  # the teacher is never trained (nor its BN stats)
        assert torch.equal(value, teacher_state[name]), name
    with pytest.raises(ConfigError, match="distill = 0.5 is not allowed"):
        fit(student, train, cfg(distill=0.5))


def test_distillation_loss_formula():
    torch.manual_seed(0)
    student, teacher, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    config, t = cfg(distill=0.25, temperature=3.0), 3.0
    p_teacher = torch.softmax(teacher / t, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    expected = 0.75 * nn.functional.cross_entropy(student, y) + 0.25 * t * t * kl
    torch.testing.assert_close(compute_loss(nn.Identity(), student, y, teacher, config, {}), expected)
    same = compute_loss(nn.Identity(), student, y, student, cfg(distill=1.0), {})
    assert same.abs().item() < 1e-6  # KL of a distribution with itself


class _Recorder(_Loader):
    """Records the bn_frozen flags of the model's QConvBn layers when each epoch starts iterating."""

    def __init__(self, inner, model):
        super().__init__(inner)
        self.model, self.seen = model, []

    def __iter__(self):
        self.seen.append([bool(m.bn_frozen) for m in self.model.modules() if isinstance(m, QConvBn)])
        return iter(self.inner)


def test_bn_freeze_epoch(digits):
    train, _ = loaders(digits, limit=128)
    model = qat_model(digits)
    recorder = _Recorder(train, model)
    fit(model, recorder, cfg(epochs=3, bn_freeze_epoch=1))
    assert len(recorder.seen[0]) == 4
    assert [all(flags) for flags in recorder.seen] == [False, True, True]
    assert not any(any(flags) for flags in recorder.seen[:1])

    fit(unfrozen := qat_model(digits), train, cfg(epochs=1))
    assert not any(bool(m.bn_frozen) for m in unfrozen.modules() if isinstance(m, QConvBn))

    float_model = small_cnn()  # plain BatchNorm: eval mode, running statistics untouched
    bns = [m for m in float_model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bns]
    fit(float_model, train, cfg(epochs=1, bn_freeze_epoch=0))
    assert all(not m.training for m in bns)
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


@pytest.mark.parametrize("case", ["nan-model", "huge-lr"])
def test_divergence_names_epoch_and_step(digits, case):
    train, _ = loaders(digits, limit=256)
    model, config = (_NaNModel(), cfg(epochs=2)) if case == "nan-model" else (small_cnn(), cfg(epochs=2, lr=1e30))
    with pytest.raises(QatkitError, match=r"loss = nan at epoch 1/2, step \d+/4; .*Fix: lower lr \(now"):
        fit(model, train, config)


def test_plain_dataloader_and_list_of_batches(digits, tmp_path):
    x, y = digits[0][:128], digits[1][:128]
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    history = fit(small_cnn(), loader, cfg(epochs=2), checkpoint_dir=tmp_path)
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert {"model", "optimizer", "scheduler", "epoch", "history", "config"} <= state.keys()
    assert state["epoch"] == 2 and state["config"]["lr"] == 3e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    assert len(fit(small_cnn(), batches, cfg())) == 1
    with pytest.raises(DataError, match="train_loader = 'a list_iterator without len"):
        fit(small_cnn(), iter(batches), cfg())


# ---- progressive precision ----------------------------------------------------------------------
@pytest.mark.parametrize("epochs,stages,want", [
    (6, (8, 4, 2), [8, 8, 4, 4, None, None]), (4, (8, 4, 2), [8, 8, 4, None]), (2, (8, 4, 2), [8, None]),
    (3, (8, 4), [8, 8, None]),
])
def test_stage_bits_split_the_epochs(epochs, stages, want):
    """None: the last stage, at the model's own bit-widths; it always holds the last epoch."""
    config = cfg(epochs=epochs, progressive_bits=stages)
    assert [stage_bits(config, e) for e in range(epochs)] == want


@pytest.mark.parametrize("bad", [(4, 8), (9, 4), (8, 1), (8.0, 4), (True,), "842", (4,)])
def test_progressive_bits_refused(bad):
    with pytest.raises(ConfigError, match=r"progressive_bits.*highest first"):
        cfg(progressive_bits=bad)


@pytest.mark.parametrize("settings, message", [
    ({"bn_freeze_epoch": 2}, r"bn_freeze_epoch = 2 \(0-based\) is not below epochs = 2: BN is never frozen"),
    ({"progressive_bits": (8, 4, 2)}, r"has 3 stages but epochs = 2: only \[8, 2\] train"),
    ({"warmup_epochs": 2.5}, r"warmup_epochs = 2.5 is not below epochs = 2: the learning rate never reaches lr"),
])
def test_fit_warns_of_settings_the_epochs_leave_without_effect(digits, settings, message):
    train, _ = loaders(digits, batch_size=64, limit=64)
    with pytest.warns(UserWarning, match=message):
        fit(small_cnn(), train, cfg(epochs=2, **settings))


def test_fit_and_convert_refuse_a_qat_model_cast_to_bfloat16_after_prepare(digits):
    """fit failed inside a conv (float input, bfloat16 bias); convert converted it, 0.1 off the model's outputs."""
    from qatkit.convert import convert
    model = qat_model(digits).to(torch.bfloat16)
    train, _ = loaders(digits, batch_size=64, limit=64)
    for call in (lambda: fit(model, train, cfg(epochs=1)), lambda: convert(model)):
        with pytest.raises(ConfigError, match=r"dtype = 'bfloat16' is not allowed.+Fix: (fit|convert) "
                                              r"model\.float\(\)"):
            call()


def test_progressive_bits_from_yaml_list():
    assert train_config_from_dict({"progressive_bits": [8, 4, 2]}).progressive_bits == (8, 4, 2)


def test_fit_progressive_lowers_bits_per_stage(digits):
    """W2A2 with the first and last layers at 8 bits: the 2-bit quantizers train at 8, 4, then 2 bits;
    the 8-bit ones stay at 8."""
    train, _ = loaders(digits, batch_size=64, limit=128)
    model = prepare(small_cnn(), QATConfig(weight_bits=2, act_bits=2), digits[0][:64])
    calibrate(model, train, 1)
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizer)}
    targets = {name: int(q.bits) for name, q in quantizers.items()}
    assert sorted(set(targets.values())) == [2, 8]
    seen: dict[str, list[int]] = {name: [] for name in quantizers}
    for name, q in quantizers.items():
        q.register_forward_hook(lambda m, i, o, name=name: seen[name].append(int(m.bits)))
    fit(model, train, cfg(epochs=3, progressive_bits=(8, 4, 2)))
    per_epoch = len(train)
    for name, bits in seen.items():
        stages = [bits[0], bits[per_epoch], bits[2 * per_epoch]]
        assert stages == ([8, 4, 2] if targets[name] == 2 else [8, 8, 8]), name
        assert int(quantizers[name].bits) == targets[name]


def test_set_stage_bits_reinitialises_weights_and_keeps_activation_ranges(digits):
    model = prepare(small_cnn(), QATConfig(weight_bits=2, act_bits=2), digits[0][:64])
    calibrate(model, loaders(digits, limit=128)[0], 1)
    targets = {m: int(m.bits) for m in model.modules() if isinstance(m, FakeQuantizer)}
    layer = next(m for m in model.modules() if isinstance(m, QConvBn) and int(m.weight_quant.bits) == 2)
    act = next(q for q, bits in targets.items() if bits == 2 and q.kind == "act" and q.qrange[0] == 0)
    act_scale, (act_lo, act_hi) = act.qparams()[0].clone(), act.qrange
    set_stage_bits(model, 4, targets)
    assert int(layer.weight_quant.bits) == 4 and int(act.bits) == 4
    fresh = copy.deepcopy(layer.weight_quant)
    fresh.init_from(layer.folded()[0].detach())  # the weight's own 4-bit range (MSE), not the 2-bit one widened
    assert torch.equal(layer.weight_quant.scale, fresh.scale)
    lo, hi = act.qrange
    torch.testing.assert_close(act.qparams()[0], act_scale * (act_hi - act_lo) / (hi - lo))
    set_stage_bits(model, None, targets)  # the last stage: every quantizer back at its own width
    assert all(int(q.bits) == bits for q, bits in targets.items())


# ---- gradient clipping --------------------------------------------------------------------------
def test_grad_clip_scales_the_global_gradient_norm(digits):
    """One SGD step (no momentum): each parameter moves by -lr·g·c/‖g‖ (‖g‖ over every parameter, scales included),
    computed here in float64 from the gradients of the same step."""
    x, y = digits[0][:64], digits[1][:64]
    model = qat_model(digits)
    calibrate(model, [x])
    reference = copy.deepcopy(model).train()
    nn.functional.cross_entropy(reference(x), y).backward()
    grads = {n: p.grad.double() for n, p in reference.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
    clip = norm / 10
    config = cfg(optimizer="sgd", momentum=0.0, lr=0.05, grad_clip=clip)
    lrs = {id(p): group["lr"] for group in build_optimizer(model, config).param_groups for p in group["params"]}
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    fit(model, [(x, y)], config)
    for name, p in model.named_parameters():
        expected = before[name] - lrs[id(p)] * grads[name] * clip / (norm + 1e-6)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "1"])
def test_grad_clip_refused(bad):
    with pytest.raises(ConfigError, match=r"grad_clip = .* a positive finite number"):
        TrainConfig(grad_clip=bad)


def test_evaluating_a_model_without_ranges_and_calibrating_on_nothing_are_refused(digits):
    """evaluate of a never-calibrated QAT model returned logits all 0 (loss ln 10) without a word; calibrate on no
    batches returned 0 and left it so."""
    qat = prepare(small_cnn(), QATConfig(), digits[0][:4])
    with pytest.raises(QatkitError, match=r"^evaluate needs every quantizer's range, but these have none: .*Fix: run "
                                          r"qatkit\.calibrate\(model, batches\)"):
        evaluate(qat, [(digits[0][:32], digits[1][:32])])
    with pytest.raises(DataError, match=r"^calibration batches yielded none; allowed: at least one batch"):
        calibrate(qat, [])
    calibrate(qat, [digits[0][:64]])
    assert 0 <= evaluate(qat, [(digits[0][:32], digits[1][:32])])["accuracy"] <= 1


def test_a_loader_without_len_and_a_one_sample_batchnorm_batch_name_the_fix():
    """A DataLoader of an iterable dataset was refused as "'DataLoader' is not allowed; allowed: ... DataLoader";
    a last batch of one sample reached BatchNorm's bare ValueError."""
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.randn(4), 0)] * 8)

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(DataError, match=r"^train_loader = 'a DataLoader without len\(\)' is not allowed; .*fit counts "
                                        r"an epoch's steps for its schedule\. Fix: wrap the batches in a list"):
        fit(model, DataLoader(Stream(), batch_size=4), cfg(epochs=1))
    x, y = torch.randn(9, 4), torch.randint(0, 2, (9,))
    with pytest.raises(DataError, match=r"^batch 3/3 of epoch 1 has one sample, on which BatchNorm cannot compute "
                                        r"training statistics; .*Fix: drop the last, smaller batch"):
        fit(model, DataLoader(TensorDataset(x, y), batch_size=4), cfg(epochs=1))
    assert len(fit(model, DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True), cfg(epochs=1))) == 1
