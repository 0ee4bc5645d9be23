"""Message passing as graph networks write it (a GCN: messages gathered along the edges, summed into their target
nodes with index_add_ / scatter_add, divided by the in-degree): inputs without a batch axis (a graph's node features
(N, F) and its edges (2, E)) of any N and E. QAT learns, the integer model computes QAT eval bit for bit, and ONNX
Runtime computes it (0 steps; the integer-only reference equals it) on graphs of other sizes than the example's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatkit
from qatkit.export import export_onnx, ort, verify
from qatkit.export.integer_reference import IntegerReference


class GCN(nn.Module):
    def __init__(self, scatter: bool):
        super().__init__()
        self.scatter = scatter
        self.embed, self.mix, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def aggregate(self, h, src, dst):
        msg = h.index_select(0, src)
        if self.scatter:
            return torch.zeros_like(h).scatter_add_(0, dst[:, None].expand_as(msg), msg)
        return torch.zeros_like(h).index_add_(0, dst, msg)

    def forward(self, x, edge_index):
        src, dst = edge_index[0], edge_index[1]
        h = F.relu(self.embed(x))
        degree = torch.zeros_like(h[:, :1]).index_add_(0, dst, torch.ones_like(src[:, None], dtype=h.dtype))
        for _ in range(2):
            h = F.relu(self.mix(self.aggregate(h, src, dst) / degree.clamp(min=1) + h))
        return self.head(h)


def graph(nodes: int, edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(nodes, 6), torch.randint(0, nodes, (2, edges))


@pytest.mark.parametrize("scatter", [False, True], ids=["index_add", "scatter_add"])
def test_a_gcn_trains_converts_and_runs_in_onnx_runtime_on_any_graph(scatter, tmp_path):
    torch.manual_seed(0)
    model, example = GCN(scatter).eval(), graph(40, 120)
    labels = (example[0][:, 0] > 0).long() + (example[0][:, 1] > 0).long()  # (a rule of each node's own features)
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=8, act_bits=8), example)
    assert not qat.qat_info.untraced and qat.qat_info.input_sizes == {"x": [None, 6], "edge_index": [None, None]}
    qatkit.calibrate(qat, [(example, labels)])
    qat.train()
    opt = torch.optim.AdamW(qat.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = F.cross_entropy(qat(*example), labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    qat.eval()
    integer = qatkit.convert(qat)
    other = graph(25, 77)
    with torch.no_grad():
        for g in (example, other):
            assert torch.equal(integer(*g), qat(*g))
    path = tmp_path / "gcn.onnx"
    export_onnx(integer, path, example)
    for g in (example, other):
        result = verify(path, integer, [(g,)])
        assert result["max_step_diff"] == 0 and result["n"] == g[0].shape[0], result
    reference = IntegerReference(path, requant="float32").run(tuple(t.numpy() for t in other))
    assert np.array_equal(reference, ort.run(ort.session(path, threads=1), other))
