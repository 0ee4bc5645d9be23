"""QATConfig(exact_adds=True): each residual add and global average pool shares one quantizer with its inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import qatkit
from qatkit.models import build_model
from qatkit.nn import QAdd, QGlobalAvgPool
from qatkit.pipeline import rebuild_qat, save_integer
from qatkit.quantizer import FakeQuantizer
from qatkit.train import save_checkpoint


def _prepared(name="resnet20", bits=8, **options):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    qat = qatkit.prepare(build_model(name, num_classes=10, in_channels=3, image_size=32),
                         qatkit.QATConfig(weight_bits=bits, act_bits=bits, **options), x[:2])
    qatkit.calibrate(qat, [x])
    return qat, x


def _calls(qat, cls):
    """(module, its input quantizers) of every call of a `cls` module in the graph."""
    n_in = 2 if cls is QAdd else 1
    return [(qat.get_submodule(n.target), [qat.get_submodule(q.target) for q in n.args[n_in:]])
            for n in qat.graph.nodes if n.op == "call_module" and isinstance(qat.get_submodule(n.target), cls)]


def test_add_and_pool_inputs_and_outputs_are_one_quantizer():
    qat, _ = _prepared(exact_adds=True)
    adds, pools = _calls(qat, QAdd), _calls(qat, QGlobalAvgPool)
    assert len(adds) == 9 and len(pools) == 1
    for module, inputs in adds + pools:
        assert all(q is module.out_quant for q in inputs)
    # ResNet-20's projection shortcuts (1x1 conv) start a new range: one shared quantizer per stage
    groups = qat.qat_info.shared_quantizers
    assert len(groups) == 3 and len({id(qat.get_submodule(g[0])) for g in groups}) == 3
    for group in groups:
        assert len({id(qat.get_submodule(path)) for path in group}) == 1
    shared = qat.get_submodule(groups[0][0])
    assert not shared.spec.symmetric  # relu'd adds share with the convs before them, which have negative outputs
    assert f"{' = '.join(groups[0])};" in qatkit.describe(qat)
    plain, _ = _prepared()
    assert "exact_adds" not in qatkit.describe(plain)
    count = lambda m: len({id(q) for q in m.modules() if isinstance(q, FakeQuantizer) and q.kind == "act"})  # noqa: E731
    assert count(qat) == count(plain) - sum(len(g) - 1 for g in groups)


def test_shared_range_covers_every_call_site_and_learns_from_all():
    """Calibration observes a shared quantizer at each of its call sites, so its range covers them all; in training
    each call site adds its gradient to the one scale."""
    qat, x = _prepared(exact_adds=True)
    q = _calls(qat, QAdd)[0][0].out_quant
    seen = []
    hook = q.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    qat.train()
    F.cross_entropy(qat(x), torch.arange(8) % 10).backward()
    hook.remove()
    assert len(seen) == 7  # the first stage: the stem conv, and each of its 3 blocks' second conv and add
    scale, zp = q.qparams()
    top = float((q.qrange[1] - zp + 0.5) * scale)
    assert all(float((values <= top).float().mean()) >= 0.99 for values in seen)
    assert q.scale.grad is not None and float(q.scale.grad.abs()) > 0


def test_exact_adds_checkpoint_convert_and_integer_file(tmp_path):
    qat, x = _prepared(bits=4, exact_adds=True, exact_multipliers=True)
    recipe = {"model": "resnet20", "num_classes": 10, "in_channels": 3, "image_size": 32,
              "qat": qatkit.config.to_dict(qatkit.QATConfig(weight_bits=4, act_bits=4, exact_adds=True,
                                                              exact_multipliers=True))}
    save_checkpoint(tmp_path / "q.ckpt", {"model": qat.state_dict(), "recipe": recipe})
    rebuilt, _ = rebuild_qat(tmp_path / "q.ckpt")
    module, inputs = _calls(rebuilt, QAdd)[0]
    assert all(q is module.out_quant for q in inputs)
    qat.eval(), rebuilt.eval()
    with torch.no_grad():
        want = qat(x)
        assert torch.equal(rebuilt(x), want)
    save_integer(rebuilt, recipe, tmp_path / "m.safetensors")  # shared quantizers: one set of tensors in the file
    assert torch.equal(qatkit.load(tmp_path / "m.safetensors")(x), want)
