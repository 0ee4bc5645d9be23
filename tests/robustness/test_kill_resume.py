"""`qatkit train` SIGKILLed at random moments and resumed with --resume ends bit for bit where an
uninterrupted run ends: the final QAT checkpoint and the float weights, tensor by tensor.

Real subprocesses of the CLI, one thread each (OMP_NUM_THREADS=1) and a fixed hash seed. The kill
moments are drawn from a seeded RNG (QATKIT_KILL_SEED overrides the seed) in (0.1, 0.9) of the
uninterrupted run's duration, so they land anywhere: before the output folder exists, during float
training or QAT, during a checkpoint write. A failure message lists where each kill landed (pytest -s
prints it on success too). Where they land depends on the machine's speed and load; with the default
seed 1 on an ordinary machine the first kill lands before the output folder exists, the second in QAT
(after its 2nd epoch), the third after the last checkpoint. About half the run is Python and torch
starting up, and a resumed run has less left to do, so some seeds kill runs that already finished.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qatkit.train import load_checkpoint

ARGS = ["train", "--model", "small-cnn", "--weight-bits", "4", "--act-bits", "4", "--float-epochs", "3",
        "--epochs", "3", "--limit", "400", "--quiet", "--seed", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
KILLS = 3
FINAL = "qat_w4a4.ckpt"
TIMEOUT = 300  # a stuck run fails the test instead of hanging it


def cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qatkit.cli", *ARGS, "--out", str(out), *extra]


def run_to_end(out: Path, *extra: str) -> None:
    done = subprocess.run(cli(out, *extra), env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    assert done.returncode == 0, f"{' '.join(extra) or 'run'} into {out} failed ({done.returncode}): {done.stderr[-2000:]}"


def landed(out: Path) -> str:
    """What a killed run left behind: the epoch each stage's last.ckpt holds, and the final files."""
    if not out.exists():
        return "no output folder"
    parts = []
    for stage in ("float", "qat_w4a4"):
        ckpt = out / "checkpoints" / stage / "last.ckpt"
        parts.append(f"{stage} epoch {load_checkpoint(ckpt)['epoch']}" if ckpt.exists() else f"{stage} -")
    parts += [name for name in ("float.safetensors", FINAL) if (out / name).exists()]
    temps = sorted(p.name for p in out.rglob("*.tmp"))
    return ", ".join(parts + ([f"stale {temps}"] if temps else []))


def assert_same_results(expected: Path, got: Path, context: str) -> None:
    ref, new = load_checkpoint(expected / FINAL), load_checkpoint(got / FINAL)
    assert ref.keys() == new.keys() and ref["recipe"] == new["recipe"], context
    assert ref["model"].keys() == new["model"].keys(), context
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, new["model"][name]), f"QAT tensor {name} differs; {context}"
    ref_float, new_float = load_file(str(expected / "float.safetensors")), load_file(str(got / "float.safetensors"))
    assert ref_float.keys() == new_float.keys(), context
    for name, tensor in ref_float.items():
        assert torch.equal(tensor, new_float[name]), f"float tensor {name} differs; {context}"
    for stage in ("float", "qat_w4a4"):  # the per-epoch histories too (all but the wall-clock seconds)
        strip = lambda state: [{k: v for k, v in row.items() if k != "seconds"} for row in state["history"]]
        ckpt = Path("checkpoints") / stage / "last.ckpt"
        assert strip(load_checkpoint(expected / ckpt)) == strip(load_checkpoint(got / ckpt)), f"{stage} history; {context}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float]:
    """One uninterrupted run: its folder and how long it took (the kill moments scale with it)."""
    out = tmp_path_factory.mktemp("kill-resume") / "reference"
    t0 = time.monotonic()
    run_to_end(out)
    return out, time.monotonic() - t0


def test_sigkill_at_random_moments_then_resume_is_bit_exact(reference, tmp_path):
    ref, duration = reference
    seed = int(os.environ.get("QATKIT_KILL_SEED", "1"))
    rng = random.Random(seed)
    out = tmp_path / "killed"
    log = []
    for i in range(KILLS):
        delay = rng.uniform(0.1, 0.9) * duration
        with open(tmp_path / f"stderr-{i}.txt", "w+") as err:
            proc = subprocess.Popen(cli(out, *(["--resume"] if i else [])), env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=err)
            try:
                code = proc.wait(timeout=delay)  # a resumed run has less to do: it may end before its kill
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL: no handler, no cleanup
                code = proc.wait(timeout=TIMEOUT)
            err.seek(0)
            message = err.read()[-1000:]
        log.append(f"run {i + 1} ({'--resume' if i else 'fresh'}) killed after {delay:.2f}s of {duration:.2f}s, "
                   f"exit {code}: {landed(out)}")
        assert code in (0, -9), f"run {i + 1} failed by itself ({code}): {message}; " + "; ".join(log)
    context = f"seed {seed}: " + "; ".join(log)
    print(context)  # shown with pytest -s or -rP
    run_to_end(out, "--resume")
    assert_same_results(ref, out, context)


def test_resume_into_an_empty_folder_and_a_damaged_one(reference, tmp_path):
    """--resume with nothing to resume starts each stage fresh; a half-written float.safetensors (it is not
    written atomically), a stale temporary checkpoint and a missing QAT stage do not disturb it either."""
    ref, _ = reference
    empty = tmp_path / "empty"
    empty.mkdir()
    run_to_end(empty, "--resume")
    assert_same_results(ref, empty, "resume into an empty folder")

    damaged = tmp_path / "damaged"
    (damaged / "checkpoints" / "float").mkdir(parents=True)
    float_ckpt = (ref / "checkpoints" / "float" / "last.ckpt").read_bytes()
    (damaged / "checkpoints" / "float" / "last.ckpt").write_bytes(float_ckpt)
    (damaged / "checkpoints" / "float" / ".last.ckpt.x1y2.tmp").write_bytes(float_ckpt[:1000])
    (damaged / "float.safetensors").write_bytes((ref / "float.safetensors").read_bytes()[:500])
    run_to_end(damaged, "--resume")
    assert_same_results(ref, damaged, "resume with a finished float stage, a cut float.safetensors, no QAT stage")
