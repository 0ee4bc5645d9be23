"""bench/experiment.py's recipe overrides: a field of QATConfig or TrainConfig set from JSON, bad ones refused."""
from __future__ import annotations

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
