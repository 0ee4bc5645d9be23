"""Data-parallel training (torchrun, DistributedDataParallel over gloo on the CPU): each rank's share of every batch
is exactly its part of the single-process batch; two ranks train a QAT model without BatchNorm to the weights and
scales one process reaches on the whole batches (float32 summation order only); every rank ends with the same model
(BN statistics averaged); rank 0 alone writes; bad setups fail on every rank with a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qatkit
from qatkit.data import BatchLoader, load_dataset
from qatkit.errors import ConfigError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(TORCHRUN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("augment", ["none", "crop-flip"])
def test_shards_are_the_parts_of_each_single_process_batch(augment):
    ds = load_dataset("digits", None, limit=67)  # 67 = 2 batches of 32 + 3: the last batch splits 2 / 1
    common = dict(batch_size=32, mean=ds.mean, std=ds.std, shuffle=True, seed=3, augment=augment)
    whole, shards = BatchLoader(ds.train, **common), [BatchLoader(ds.train, shard=(r, 2), **common) for r in range(2)]
    for loader in (whole, *shards):
        loader.set_epoch(1)
    assert len(shards[0]) == len(shards[1]) == len(whole) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert len(y0) - len(y1) in (0, 1)
    # a last batch smaller than the number of ranks is dropped on every rank (one would get no sample)
    ds = load_dataset("digits", None, limit=65)  # 2 batches of 32 + 1
    assert [len(BatchLoader(ds.train, shard=(r, 2), **common)) for r in range(2)] == [2, 2]
    assert len(BatchLoader(ds.train, **common)) == 3


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), (0,), "0/2"])
def test_bad_shard_is_refused(shard):
    ds = load_dataset("digits", None, limit=10)
    with pytest.raises(ConfigError, match=r"shard.*0 <= rank < world_size"):
        BatchLoader(ds.train, batch_size=4, mean=ds.mean, std=ds.std, shuffle=False, shard=shard)


def test_two_ranks_train_what_one_process_trains(tmp_path):
    _torchrun([str(HERE / "ddp_worker.py"), str(tmp_path)], cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    for name in ("mlp", "cnn"):  # every rank ends with the same weights, scales and BN statistics
        assert ranks[0][name].keys() == ranks[1][name].keys()
        assert all(torch.equal(ranks[0][name][k], ranks[1][name][k]) for k in ranks[0][name]), name
        drop_time = [[{k: v for k, v in row.items() if k != "seconds"} for row in r[f"{name}_history"]] for r in ranks]
        assert drop_time[0] == drop_time[1]
        # rank 0 wrote the checkpoint, and it holds the model the ranks ended with
        saved = qatkit.train.load_checkpoint(tmp_path / f"ckpt_{name}" / "last.ckpt")
        assert all(torch.equal(saved["model"][k], ranks[0][name][k]) for k in saved["model"])

    # one step on the whole first batch = one step of the two ranks on its halves; and on a batch of 33 split 17 / 16,
    # each rank's mean weighted by its share (DDP's plain average of the two means weighed the 16 more)
    for batch, key in ((ddp_worker.BATCH, "mlp_step"), (ddp_worker.BATCH + 1, "mlp_odd_step")):
        one = ddp_worker.build("mlp")
        history = ddp_worker.step(one, (0, 1), batch)
        for name, value in one.state_dict().items():
            other = ranks[0][key][name]
            if value.is_floating_point():
                assert torch.allclose(value, other, rtol=1e-5, atol=1e-6), (key, name, (value - other).abs().max())
            else:
                assert torch.equal(value, other), (key, name)
        (a,), (b,) = history, ranks[0][f"{key}_history"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["train_acc"] == b["train_acc"]
    start = ddp_worker.build("mlp").state_dict()  # and the step moved the weights well beyond that tolerance
    assert max(float((start[k] - v).abs().max()) for k, v in one.state_dict().items() if k.endswith("weight")) > 0.005

    for r, result in enumerate(ranks):  # refused on every rank, before the first step
        assert "activation quantizer" in result["uncalibrated"] and "qatkit.calibrate" in result["uncalibrated"]
        assert f"on rank {r}" in result["unequal"] and "the same number on every rank" in result["unequal"]


def test_qatkit_run_under_torchrun(tmp_path):
    """`torchrun -m qatkit run`: both ranks train, rank 0 alone evaluates, exports, verifies and writes."""
    done = _torchrun(["-m", "qatkit", "run", "--out", str(tmp_path / "run"), "--limit", "200", "--epochs", "1",
                      "--float-epochs", "2", "--weight-bits", "4", "--quiet"], cwd=tmp_path)
    assert done.stdout.count("[qatkit] wrote") == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2
    qat = next(r for r in results["rows"] if r["method"] == "qat")
    assert qat["integer_model_accuracy"] == qat["accuracy"]
    assert qat["verify"]["top1_agreement"] == 1.0 and qat["verify"]["max_step_diff"] == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["float", "qat_w4a4"]
    assert not (tmp_path / "run.partial").exists()
