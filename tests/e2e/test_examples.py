"""The examples run as documented, and their integer models agree with the QAT models."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_own_training_loop(tmp_path):
    out = _run("own_training_loop.py", tmp_path)
    acc = {m: float(v) for m, v in re.findall(r"^(float|PTQ W4A4|QAT W4A4|integer)\s+([0-9.]+)", out, re.M)}
    assert acc["float"] > 0.95 and acc["QAT W4A4"] > 0.95
    assert acc["integer"] == acc["QAT W4A4"]
    assert (tmp_path / "small_cnn_w4a4.safetensors").is_file()


def test_seed_mlp_example(tmp_path):
    out = _run("seed_mlp.py", tmp_path)
    assert "integer model equals the QAT model: True" in out
    first, last = map(float, re.search(r"loss ([0-9.]+) → ([0-9.]+)", out).groups())
    assert last < first


def test_named_inputs_example(tmp_path):
    out = _run("named_inputs.py", tmp_path)
    acc = {m: float(v) for m, v in re.findall(r"^(float|QAT W8A8|integer)\s+([0-9.]+)", out, re.M)}
    assert acc["float"] > 0.95 and acc["QAT W8A8"] > 0.95 and acc["integer"] == acc["QAT W8A8"]
    assert "integer model inputs: ['input_ids', 'attention_mask']" in out
    assert "top-1 agreement 1.0000, within one step 1.0000" in out


def test_seq2seq_example(tmp_path):
    """nn.Transformer prepared at length 6, decoded at 9 by every form of the model: the same symbols."""
    out = _run("seq2seq.py", tmp_path)
    assert "QAT model inputs: src [None, None], tgt [None, None]" in out
    assert "ONNX inputs: [('src', ['batch', 'src_1']), ('tgt', ['batch', 'tgt_1'])]" in out
    acc = {m: float(v) for m, v in re.findall(r"^(float|QAT W8A8|integer|ONNX Runtime)\s+sequences reversed ([0-9.]+)",
                                              out, re.M)}
    assert len(acc) == 4 and min(acc.values()) > 0.95
    assert "integer = QAT model: True; ONNX Runtime = integer model: True" in out


def test_qatkit_export_is_reached_from_import_qatkit_alone():
    """The README writes qatkit.export.export_onnx after `import qatkit`: the subpackage loads on first use (a fresh
    interpreter: in this one a test may have imported it already)."""
    code = ("import sys, qatkit; assert 'onnxruntime' not in sys.modules; "
            "print(qatkit.export.export_onnx.__name__, qatkit.export.verify.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["export_onnx", "verify"], proc.stderr
