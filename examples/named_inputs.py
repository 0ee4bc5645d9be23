"""A text classifier written as Hugging Face writes its models, trained on batches as its collators make them.

forward(input_ids, attention_mask=None, token_type_ids=None) returns a dict {"logits": ...}; a torch DataLoader
collates tokenized samples into {"input_ids", "attention_mask", "labels"} dicts. qatkit takes both as they are:
the example names the inputs the graph takes (token_type_ids keeps its default), fit and evaluate read the labels
from "labels" and the logits from "logits", and the integer model and its ONNX file take the inputs by name. Run:
    python examples/named_inputs.py
The task (is token 1 among the words, not the padding?) needs the attention mask: the padding is token 1 too.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import qatkit
from qatkit.export import export_onnx, verify

VOCAB, LENGTH, DIM = 40, 12, 32


class TextClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.words, self.types, self.positions = nn.Embedding(VOCAB, DIM), nn.Embedding(2, DIM), nn.Embedding(LENGTH, DIM)
        self.encoder = nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.1, batch_first=True)
        self.classifier = nn.Linear(DIM, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        h = self.words(input_ids) + self.types(token_type_ids) + self.positions(positions)
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"logits": self.classifier((h * m).sum(1) / m.sum(1))}


def samples(n: int, seed: int) -> list[dict]:
    """Tokenized sentences of 3..LENGTH ids from 2..VOCAB-1; label 1 where one of them is 1."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (int(torch.randint(3, LENGTH + 1, (1,), generator=gen)),), generator=gen)
        label = int(torch.rand(1, generator=gen) < 0.5)
        if label:
            ids[int(torch.randint(0, len(ids), (1,), generator=gen))] = 1
        out.append({"input_ids": ids.tolist(), "label": label})
    return out


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """As a padding collator: padded to LENGTH (with token 1), the mask, the labels under "labels"."""
    ids = torch.ones(len(batch), LENGTH, dtype=torch.long)
    mask = torch.zeros(len(batch), LENGTH, dtype=torch.long)
    for i, sample in enumerate(batch):
        ids[i, :len(sample["input_ids"])] = torch.tensor(sample["input_ids"])
        mask[i, :len(sample["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s["label"] for s in batch])}


def main() -> None:
    torch.manual_seed(0)
    train = DataLoader(samples(1024, 0), batch_size=32, shuffle=True, collate_fn=collate)
    test = DataLoader(samples(256, 1), batch_size=64, collate_fn=collate)
    model = TextClassifier()
    qatkit.fit(model, train, qatkit.TrainConfig(epochs=6, lr=3e-3, progress=False))  # the float model first
    model.eval()
    print(f"float      {qatkit.evaluate(model, test)['accuracy']:.4f}")

    example = {k: v[:1] for k, v in next(iter(test)).items() if k != "labels"}  # the inputs the graph takes
    qat = qatkit.prepare(model, qatkit.QATConfig(weight_bits=8, act_bits=8), example)
    qatkit.calibrate(qat, train, num_batches=4)
    qatkit.fit(qat, train, qatkit.TrainConfig(epochs=2, lr=1e-3, distill=0.5, progress=False), teacher=model)
    print(f"QAT W8A8   {qatkit.evaluate(qat, test)['accuracy']:.4f}")

    integer = qatkit.convert(qat.eval())
    print(f"integer    {qatkit.evaluate(integer, test)['accuracy']:.4f}")
    print("integer model inputs:", integer.input_names)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classifier.onnx"
        export_onnx(integer, path, example)
        result = verify(path, integer, test)
    print(f"ONNX Runtime vs integer model: top-1 agreement {result['top1_agreement']:.4f}, "
          f"within one step {result['within_one_step']:.4f}")


if __name__ == "__main__":
    main()
