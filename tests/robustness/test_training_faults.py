"""fit under faults: NaN/Inf losses and gradients (stop or skip), SIGTERM/SIGINT during training.

Tiny model and data (SmallCNN on 64 random 8x8 images, 4 batches an epoch): every test takes well under
a second. Batches come from a fixed list, so "step k of epoch e" is the same batch in every run.
"""
from __future__ import annotations

import math
import os
import re
import signal
import threading
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from qatkit.config import TrainConfig, train_config_from_dict
from qatkit.errors import ConfigError, QatkitError
from qatkit.models import SmallCNN
from qatkit.train import fit, load_checkpoint
from qatkit.train import loop as loop_module
from qatkit.train.loop import CHECKPOINT_NAME
from qatkit.train.signals import StopOnSignal, TrainingInterrupted

STEPS = 4  # batches per epoch
EPOCHS = 3


class Batches:
    """A fixed list of (x, y) batches with len() and set_epoch(); hooks run as epochs start and batches go out.

    later: batches for the epochs from index 1 on (the first epoch uses `batches`)."""

    def __init__(self, batches, on_batch=None, on_epoch=None, later=None):
        self.batches, self.on_batch, self.on_epoch, self.later, self.epoch = batches, on_batch, on_epoch, later, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        batches = self.later if self.later is not None and self.epoch > 0 else self.batches
        for i, batch in enumerate(batches):
            if self.on_batch is not None:
                self.on_batch(self.epoch, i)  # epoch index (0-based), batch index (0-based)
            yield batch


def make_batches(poison=()):
    """4 batches of 16; batch indices in `poison` hold a NaN input (NaN loss, NaN BN statistics)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    batches = [(x[i:i + 16].clone(), y[i:i + 16]) for i in range(0, 64, 16)]
    for i in poison:
        batches[i][0][3, 0, 2, 2] = math.nan
    return batches


def model():
    torch.manual_seed(0)
    return SmallCNN(1, 10, width=8)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": EPOCHS, "lr": 3e-3, "batch_size": 16, "progress": False, **kw})


def snapshot_after_epoch(ckpt: os.PathLike, epoch: int, store: dict):
    """on_epoch hook: the bytes of last.ckpt when epoch index `epoch` starts (what the previous one wrote)."""
    def hook(e):
        if e == epoch:
            store["bytes"] = Path(ckpt).read_bytes()
    return hook


def assert_equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


class NaNAt(torch.nn.Module):
    """SmallCNN whose forward returns NaN logits on the k-th training forward (1-based, over all epochs)."""

    def __init__(self, k: int):
        super().__init__()
        self.net, self.k, self.calls = model(), k, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.k:
                out = out * math.nan
        return out


def poison_grad(param: torch.nn.Parameter, at_backward: set[int], value: float):
    """Tensor hook: the gradient of `param` becomes `value` everywhere at the given backward passes (1-based)."""
    count = {"n": 0}

    def hook(grad):
        count["n"] += 1
        return torch.full_like(grad, value) if count["n"] in at_backward else grad
    return param.register_hook(hook)


# ---- stop on non-finite values ----------------------------------------------------------------------
def test_nan_loss_names_epoch_and_step_and_keeps_last_checkpoint(tmp_path):
    net, store = NaNAt(k=STEPS + 2), {}  # step 2 of epoch 2
    loader = Batches(make_batches(), on_epoch=snapshot_after_epoch(tmp_path / CHECKPOINT_NAME, 1, store))
    with pytest.raises(QatkitError, match=r"^training diverged: loss = nan at epoch 2/3, step 2/4; allowed: a finite "
                                          r"loss\. Fix: lower lr .*nonfinite: skip"):
        fit(net, loader, cfg(), checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == store["bytes"]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temporary file left


@pytest.mark.parametrize("value, kind", [(math.inf, "Inf"), (-math.inf, "Inf"), (math.nan, "NaN")])
def test_nonfinite_gradient_names_the_first_parameter(tmp_path, value, kind):
    net, store = model(), {}
    params = dict(net.named_parameters())
    # the loss stays finite; two parameters get a bad gradient in step 3 of epoch 2, the earlier one is named
    handles = [poison_grad(params[name], {STEPS + 3}, value) for name in ("fc.weight", "features.1.0.weight")
               if name in params]
    assert len(handles) == 2, sorted(params)
    loader = Batches(make_batches(), on_epoch=snapshot_after_epoch(tmp_path / CHECKPOINT_NAME, 1, store))
    with pytest.raises(QatkitError, match=rf"^training diverged: gradient of 'features\.1\.0\.weight' \({kind}\) is "
                                          r"not finite at epoch 2/3, step 3/4; allowed: finite gradients\. Fix: "):
        fit(net, loader, cfg(), checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == store["bytes"]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1
    for h in handles:
        h.remove()


def test_gradient_check_has_no_false_alarm_on_huge_finite_gradients():
    """The check is a max-abs norm: finite gradients near float32's limit do not overflow into a false alarm."""
    net = model()
    h = poison_grad(dict(net.named_parameters())["features.0.0.weight"], {1}, 3e38)
    history = fit(net, Batches(make_batches()), cfg(epochs=1, optimizer="sgd", lr=0.0))
    assert len(history) == 1
    h.remove()


# ---- skip -------------------------------------------------------------------------------------------
def _count_optimizer_steps():
    count = {"n": 0}

    def hook(optimizer, args, kwargs):
        count["n"] += 1
    return count, register_optimizer_step_post_hook(hook)


def test_skip_drops_exactly_the_poisoned_batches(tmp_path):
    net = model()
    # batch 1 has a NaN input in every epoch (NaN loss, and NaN BN statistics unless they are put back);
    # on top, an Inf gradient at step 3 of epoch 3 (its 8th backward pass: a NaN loss has none, so 3 an epoch)
    h = poison_grad(dict(net.named_parameters())["features.0.0.weight"], {2 * 3 + 2}, math.inf)
    count, handle = _count_optimizer_steps()
    try:
        history = fit(net, Batches(make_batches(poison=(1,))), cfg(nonfinite="skip"), checkpoint_dir=tmp_path)
    finally:
        handle.remove()
        h.remove()
    assert [row["skipped"] for row in history] == [1, 1, 2]
    assert list(history[0]) == ["epoch", "train_loss", "train_acc", "skipped", "lr", "seconds"]
    assert count["n"] == EPOCHS * STEPS - 4  # no optimizer step for a skipped batch
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["scheduler"]["last_epoch"] == EPOCHS * STEPS  # ... but the schedule advanced
    assert all(math.isfinite(row["train_loss"]) for row in history)
    for name, t in net.state_dict().items():  # BN running statistics were put back after the NaN forward
        assert not t.is_floating_point() or bool(torch.isfinite(t).all()), name


def test_skip_at_exactly_half_finishes_and_above_half_stops(tmp_path):
    history = fit(model(), Batches(make_batches(poison=(0, 2))), cfg(epochs=1, nonfinite="skip"))
    assert history[0]["skipped"] == 2
    net, store = model(), {}  # a clean first epoch, then 3 of 4 batches poisoned
    loader = Batches(make_batches(), on_epoch=snapshot_after_epoch(tmp_path / CHECKPOINT_NAME, 1, store),
                     later=make_batches(poison=(0, 1, 3)))
    with pytest.raises(QatkitError, match=r"^training diverged: 3 of 4 batches skipped in epoch 2/3 \(the last: "
                                          r"loss = nan at step 4/4\); allowed: at most half .*Fix: lower lr \(now"):
        fit(net, loader, cfg(nonfinite="skip"), checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == store["bytes"]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1


def test_stop_is_the_default_and_history_keys_stay_the_same():
    assert TrainConfig().nonfinite == "stop"
    history = fit(model(), Batches(make_batches()), cfg(epochs=1))
    assert list(history[0]) == ["epoch", "train_loss", "train_acc", "lr", "seconds"]


@pytest.mark.parametrize("value", ["ignore", "Skip", "", None, 1])
def test_bad_nonfinite_value_is_a_config_error_naming_it(value):
    with pytest.raises(ConfigError, match=rf"^nonfinite = {re.escape(repr(value))} is not allowed; allowed: stop, skip\."):
        TrainConfig(nonfinite=value)
    with pytest.raises(ConfigError, match=r"nonfinite"):
        train_config_from_dict({"nonfinite": value})


def test_nonfinite_may_change_on_resume(tmp_path):
    """A run stopped by a NaN goes on from its last checkpoint with nonfinite = 'skip'."""
    with pytest.raises(QatkitError, match="loss = nan at epoch 2/3, step 1/4"):
        fit(NaNAt(k=STEPS + 1), Batches(make_batches()), cfg(), checkpoint_dir=tmp_path)
    history = fit(NaNAt(k=1), Batches(make_batches()), cfg(nonfinite="skip"), checkpoint_dir=tmp_path, resume=True)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert "skipped" not in history[0] and [row["skipped"] for row in history[1:]] == [1, 0]


# ---- signals ----------------------------------------------------------------------------------------
@pytest.fixture
def sentinel_handlers():
    """A recording handler for SIGTERM and SIGINT while the test runs (so a missed signal cannot kill pytest)."""
    calls = []
    record = lambda signum, frame: calls.append(signum)
    before = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield record, calls
    for sig, handler in before.items():
        signal.signal(sig, handler)


def send_at(signum, epoch: int, batch: int, times: int = 1):
    """on_batch hook: the process signals itself as batch `batch` of epoch `epoch` (0-based) goes out."""
    def hook(e, i):
        if (e, i) == (epoch, batch):
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return hook


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_sigterm_stops_after_the_step_and_resume_is_exact(tmp_path, sentinel_handlers, nonfinite):
    record, calls = sentinel_handlers
    straight = model()
    straight_history = fit(straight, Batches(make_batches(poison=(3,) if nonfinite == "skip" else ())),
                           cfg(nonfinite=nonfinite), checkpoint_dir=tmp_path / "straight")

    net, store = model(), {}
    ckpt = tmp_path / "killed" / CHECKPOINT_NAME
    loader = Batches(make_batches(poison=(3,) if nonfinite == "skip" else ()), on_batch=send_at(signal.SIGTERM, 1, 1),
                     on_epoch=snapshot_after_epoch(ckpt, 1, store))
    with pytest.raises(TrainingInterrupted) as info:
        fit(net, loader, cfg(nonfinite=nonfinite), checkpoint_dir=ckpt.parent)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("training interrupted by SIGTERM at epoch 2/3, after step 2/4; ")  # the step finished
    assert f"{str(ckpt)!r} holds epoch 1/3" in message and message.endswith("Fix: resume with --resume (fit(..., resume=True))")
    assert isinstance(info.value, QatkitError) and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is record and signal.getsignal(signal.SIGINT) is record  # restored
    assert calls == []  # the signal went to fit, not to the previous handler
    assert ckpt.read_bytes() == store["bytes"] and load_checkpoint(ckpt)["epoch"] == 1

    resumed = model()
    history = fit(resumed, Batches(make_batches(poison=(3,) if nonfinite == "skip" else ())), cfg(nonfinite=nonfinite),
                  checkpoint_dir=ckpt.parent, resume=True)
    assert_equal_models(straight, resumed)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(history) == strip(straight_history)


def test_sigint_raises_keyboard_interrupt_with_resume_hint(tmp_path, sentinel_handlers):
    record, calls = sentinel_handlers
    loader = Batches(make_batches(), on_batch=send_at(signal.SIGINT, 0, 0))
    with pytest.raises(KeyboardInterrupt, match=r"SIGINT at epoch 1/3, after step 1/4, before its first checkpoint .*"
                                                r"with --resume it starts this stage from the beginning"):
        fit(model(), loader, cfg(), checkpoint_dir=tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    assert signal.getsignal(signal.SIGINT) is record and calls == []


def test_signal_during_checkpoint_write_lets_the_write_finish(tmp_path, sentinel_handlers, monkeypatch):
    real_save = loop_module.save_checkpoint

    def save_with_signal(path, state):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once, between bytecodes of the write below
        return real_save(path, state)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_with_signal)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM after epoch 1/3; .* holds epoch 1/3 .*resume with --resume"):
        fit(model(), Batches(make_batches()), cfg(), checkpoint_dir=tmp_path)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_second_signal_stops_at_once(tmp_path, sentinel_handlers):
    loader = Batches(make_batches(), on_batch=send_at(signal.SIGTERM, 0, 2, times=2))
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at epoch 1/3, after step 2/4"):  # batch 3 never trained
        fit(model(), loader, cfg(), checkpoint_dir=tmp_path)
    assert signal.getsignal(signal.SIGTERM) is sentinel_handlers[0]


def test_without_checkpoint_dir_the_message_says_nothing_was_saved(sentinel_handlers):
    loader = Batches(make_batches(), on_batch=send_at(signal.SIGTERM, 0, 1))
    with pytest.raises(TrainingInterrupted, match=r"after step 2/4; nothing was saved \(no checkpoint_dir\)"):
        fit(model(), loader, cfg())


def test_stop_on_signal_context_manager(sentinel_handlers):
    record, calls = sentinel_handlers
    # a signal after the loop's last check is not lost: it goes to the restored handler on exit
    with StopOnSignal() as stop:
        assert set(stop.installed) == {signal.SIGINT, signal.SIGTERM}
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and calls == []
    assert calls == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is record
    # an ignored signal stays ignored
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with StopOnSignal() as stop:
        assert stop.installed == (signal.SIGINT,) and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    # outside the main thread nothing is installed (Python delivers signals to the main thread only)
    seen = {}

    def worker():
        with StopOnSignal() as s:
            seen["installed"], seen["handler"] = s.installed, signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"installed": (), "handler": record}


def test_fit_in_a_thread_trains_without_touching_handlers(sentinel_handlers):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("h", fit(model(), Batches(make_batches()), cfg(epochs=1))))
    thread.start()
    thread.join()
    assert len(result["h"]) == 1 and signal.getsignal(signal.SIGTERM) is sentinel_handlers[0]
