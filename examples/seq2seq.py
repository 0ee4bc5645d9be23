"""A sequence-to-sequence model as PyTorch's translation tutorial builds it (token embeddings, learned positions,
nn.Transformer, a projection to the vocabulary), trained to reverse sequences of 3 to 10 symbols, quantized to W8A8,
converted, exported to ONNX and decoded greedily, one symbol at a time, by the integer model and by ONNX Runtime.

qatkit rewrites nn.Transformer as quantized projections and tensor ops; prepare finds that the traced graph follows any
source and target length (the causal mask is made from the target's length on every call), so training batches of
any length, the integer model and the ONNX file (inputs ["batch", "src_1"] and ["batch", "tgt_1"]) all take them. Run:
    python examples/seq2seq.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import qatkit
from qatkit.export import export_onnx

SYMBOLS, BOS, MAX_LEN, DIM = 10, 10, 12, 64  # symbols 0..9, then the start token


class Reverser(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.position = nn.Embedding(SYMBOLS + 1, DIM), nn.Embedding(MAX_LEN, DIM)
        self.transformer = nn.Transformer(DIM, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=2 * DIM,
                                          dropout=0.0, batch_first=True)
        self.generator = nn.Linear(DIM, SYMBOLS)

    def _tokens(self, ids):
        return self.embed(ids) + self.position(torch.arange(ids.size(1), device=ids.device))

    def forward(self, src, tgt):  # (B, S) symbols, (B, T) BOS then the output so far → (B, T, SYMBOLS) logits
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device)
        return self.generator(self.transformer(self._tokens(src), self._tokens(tgt), tgt_mask=causal))


def batches(n: int, batch: int, seed: int, lengths=range(3, 11)) -> list:
    """((src, tgt), target) batches, one length each: target = src reversed, tgt = BOS then the target but its last."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
        src = torch.randint(0, SYMBOLS, (batch, length), generator=gen)
        target = src.flip(1)
        tgt = torch.cat([torch.full((batch, 1), BOS), target[:, :-1]], 1)
        out.append(((src, tgt), target))
    return out


def greedy(step, src: torch.Tensor) -> torch.Tensor:
    """Decode as many symbols as src has: each step feeds the symbols so far and takes the last position's argmax."""
    tgt = torch.full((src.shape[0], 1), BOS)
    for _ in range(src.shape[1]):
        tgt = torch.cat([tgt, torch.as_tensor(step(src, tgt))[:, -1].argmax(-1, keepdim=True)], 1)
    return tgt[:, 1:]


def main() -> None:
    torch.manual_seed(0)
    model = Reverser()
    train = batches(1000, 64, seed=0)
    qatkit.fit(model, train, qatkit.TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0.1, progress=False))
    model.eval()

    example = batches(1, 2, seed=1, lengths=[6])[0][0]  # prepared at length 6; trained and decoded at 3 to 10
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=8, act_bits=8), example)
    print("QAT model inputs:", ", ".join(f"{k} {v}" for k, v in qat.qat_info.input_sizes.items()))
    qatkit.calibrate(qat, train, num_batches=8)
    qatkit.fit(qat, train[:250], qatkit.TrainConfig(epochs=1, lr=2e-4, distill=0.5, progress=False), teacher=model)
    qat.eval()
    integer = qatkit.convert(qat)

    test = torch.randint(0, SYMBOLS, (256, 9), generator=torch.Generator().manual_seed(2))  # a length not prepared at
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reverser.onnx"
        export_onnx(integer, path, example)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        print("ONNX inputs:", [(i.name, i.shape) for i in sess.get_inputs()])
        runs = {"float": model, "QAT W8A8": qat, "integer": integer,
                "ONNX Runtime": lambda s, t: sess.run(None, {"src": s.numpy(), "tgt": t.numpy()})[0]}
        decoded = {name: greedy(step, test) for name, step in runs.items()}
    for name, out in decoded.items():
        print(f"{name:<13} sequences reversed {(out == test.flip(1)).all(1).float().mean():.4f}")
    print(f"integer = QAT model: {torch.equal(decoded['integer'], decoded['QAT W8A8'])}; "
          f"ONNX Runtime = integer model: {np.array_equal(decoded['ONNX Runtime'], decoded['integer'])}")


if __name__ == "__main__":
    main()
