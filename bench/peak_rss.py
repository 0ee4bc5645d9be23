"""Peak resident memory of a complete `qatkit run` on CIFAR-10 ResNet-20 (1 float epoch, 1 QAT epoch, W8A8):
the run in a child process, its peak RSS from the kernel's rusage of waited-for children.

    python bench/peak_rss.py [--data ../shared/data] [--out bench/results/peak_rss.json]    # ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recipes import BENCH, DEFAULT_DATA


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "peak_rss.json")
    args = p.parse_args()
    qatkit = shutil.which("qatkit") or sys.exit("error: qatkit is not on PATH. Fix: pip install -e . first")
    with tempfile.TemporaryDirectory() as tmp:
        command = [qatkit, "run", "--dataset", "cifar10", "--data", str(args.data / "cifar10"), "--model", "resnet20",
                   "--float-epochs", "1", "--epochs", "1", "--weight-bits", "8", "--act-bits", "8", "--quiet",
                   "--out", str(Path(tmp) / "run")]
        t0 = time.perf_counter()
        done = subprocess.run(command, check=False)
        seconds = time.perf_counter() - t0
        results = json.loads((Path(tmp) / "run" / "results.json").read_text()) if done.returncode == 0 else None
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    record = {"command": " ".join(["qatkit", *command[1:-2]]), "returncode": done.returncode,
              "peak_rss_bytes": peak_kib * 1024, "peak_rss_gib": round(peak_kib / 2**20, 3), "seconds": round(seconds, 1),
              "rows": results["rows"] if results else None}
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}, indent=1))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
