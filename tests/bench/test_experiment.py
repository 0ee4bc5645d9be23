"""bench/experiment.py's recipe overrides: a field of QATConfig or TrainConfig set from JSON, bad ones refused."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import experiment  # noqa: E402
from recipes import TASKS  # noqa: E402

TASK = TASKS["mnist-small-cnn"]


def test_override_sets_one_field_and_keeps_the_rest():
    task = experiment.override(TASK, 'qat.error_penalty={"*.weight": 100}')
    assert task.qat.error_penalty == (("*.weight", 100.0),)
    assert task.qat_train == TASK.qat_train and task.qat.weight_init == TASK.qat.weight_init
    task = experiment.override(task, "qat_train.epochs=30")
    assert task.qat_train.epochs == 30 and task.qat.error_penalty == (("*.weight", 100.0),)
    assert TASK.qat_train.epochs != 30  # the recipe itself is untouched


def test_set_changes_the_fine_tune_the_suite_runs_at_those_bits():
    task = dataclasses.replace(TASK, qat_train_at={"w2a2": {"epochs": 40, "lr": 1e-3}})
    at = experiment.override(experiment.at_bits(task, "qat", 2, 2), "qat_train.epochs=50")
    assert (at.qat_train.epochs, at.qat_train.lr) == (50, 1e-3)  # --set wins over the per-bits change, keeps the rest
    assert at.qat_recipe(2, 2) == at.qat_train
    assert experiment.at_bits(task, "qat", 4, 4).qat_train == TASK.qat_train
    assert experiment.at_bits(task, "ptq-mse", 2, 2).qat_train == TASK.qat_train  # calibration batches only


@pytest.mark.parametrize("assignment, message", [
    ("float_train.epochs=3", "RECIPE one of qat, qat_train"),
    ("qat_train.epochs", "RECIPE one of qat, qat_train"),
    ("qat.nope=1", "QATConfig has no field 'nope'"),
    ("qat_train.penalty_schedule=cosine", "the value is not JSON"),
])
def test_bad_override_is_refused_with_the_fix(assignment, message):
    with pytest.raises(SystemExit, match=message):
        experiment.override(TASK, assignment)


def test_bad_value_is_refused_by_the_config():
    with pytest.raises(ValueError, match="epochs"):
        experiment.override(TASK, "qat_train.epochs=-1")
