"""Graceful stop of a training run on SIGINT (Ctrl-C) and SIGTERM (kill, schedulers, containers).

`StopOnSignal` is a context manager: inside it the two signals only set a flag, which the training
loop checks after each step (and after each epoch's checkpoint), so no step is torn in half and no
checkpoint write is cut off; the loop then raises `interrupt(...)`: KeyboardInterrupt for SIGINT,
TrainingInterrupted (a QatkitError) for SIGTERM. A second signal while the first is pending stops at
once (checkpoint files are written atomically, so even then last.ckpt stays intact).

Handlers are installed only in the main thread (Python delivers signals there; elsewhere the context
manager does nothing) and only over handlers it can restore: one set outside Python (getsignal()
returns None) or an ignored signal (SIG_IGN) is left alone. On exit the previous handlers come back,
and a signal that arrived after the loop's last check is re-delivered to them, so it is never lost.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from qatkit.errors import QatkitError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(QatkitError):
    """Training stopped on SIGTERM (or another stop signal but SIGINT, which raises KeyboardInterrupt)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt(signum: int, message: str) -> BaseException:
    """The exception a stop on `signum` raises: KeyboardInterrupt for SIGINT, else TrainingInterrupted."""
    return KeyboardInterrupt(message) if signum == signal.SIGINT else TrainingInterrupted(message, signum)


class StopOnSignal:
    """`with StopOnSignal() as stop:` ... `if stop.requested: raise stop.exception()` after each step.

    `describe(signum)` (optional) builds the message of a stop; the loop sets it to say where the run
    stopped and where to resume from. Re-entrant use of one instance is not supported; nest new ones.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None  # the first stop signal received, if any
        self.describe = lambda signum: f"stopped by {signal_name(signum)}"
        self._previous: dict[int, Any] = {}
        self._raised = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def installed(self) -> tuple[int, ...]:
        """The signals whose handlers this context manager holds now."""
        return tuple(self._previous)

    def exception(self) -> BaseException:
        """The exception to raise for the pending stop (marks the stop as handled)."""
        if self.signum is None:
            raise RuntimeError("StopOnSignal.exception() called with no stop signal received")
        self._raised = True
        return interrupt(self.signum, self.describe(self.signum))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second signal while the first waits for the step to end: stop now
            raise self.exception()
        self.signum = signum

    def __enter__(self) -> StopOnSignal:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is None or previous == signal.SIG_IGN:  # not restorable, or deliberately ignored
                continue
            signal.signal(sig, self._handle)
            self._previous[sig] = previous
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self.signum is not None and not self._raised and exc_type is None:
            self._raised = True
            signal.raise_signal(self.signum)  # arrived after the last check: deliver it to the restored handler
        return False
