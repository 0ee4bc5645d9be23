"""SIGTERM outside training unwinds like Ctrl-C: exit 130, the run's .partial folder removed, handler restored."""
from __future__ import annotations

import os
import signal

import qatkit.pipeline
from qatkit.cli import main


def test_sigterm_while_loading_data_leaves_nothing(tmp_path, monkeypatch, capsys):
    real = qatkit.pipeline.load_dataset

    def load_then_get_killed(*args, **kwargs):
        ds = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, before any training starts
        return ds

    monkeypatch.setattr(qatkit.pipeline, "load_dataset", load_then_get_killed)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["run", "--quiet", "--out", str(tmp_path / "out")])
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    assert code == 130
    assert "qatkit run: interrupted: SIGTERM received" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
