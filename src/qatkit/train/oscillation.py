"""Weight oscillations in QAT (Nagel et al. 2022): a latent weight next to a rounding boundary flips its integer code
back and forth, step after step. A weight oscillates at a step where its code moves opposite to its previous move.
The tracker follows every quantized weight trained to below 8 bits (first/last layers at 8 bits are left out; a
progressive schedule's 8-bit stage is followed too) after each optimizer step and reports per epoch the share of
weights that oscillated at least once and the mean count."""
from __future__ import annotations

import torch
from collections.abc import Mapping

from torch import nn

from qatkit.nn import QLayer
from qatkit.quantizer import FakeQuantizer


class OscillationTracker:
    def __init__(self, model: nn.Module, target_bits: Mapping[FakeQuantizer, int] | None = None):
        """target_bits: each quantizer's bit-width at the end of training (fit's targets; None: the one it holds)."""
        def bits(q: FakeQuantizer) -> int:
            return int(q.bits) if target_bits is None else target_bits[q]
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, QLayer) and bool(m.weight_quant.enabled) and bits(m.weight_quant) < 8}
        self.codes: dict[str, torch.Tensor] = {}
        self.last_move: dict[str, torch.Tensor] = {}  # -1, 0 (none yet), +1
        self.count: dict[str, torch.Tensor] = {}  # oscillations this epoch
        self.bits: dict[str, int] = {}  # the bit-width of the codes held

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: compare every tracked weight's integer code with the one before (at the same
        bit-width: a progressive stage's new width starts the comparison again, its codes on another grid)."""
        for name, layer in self.layers.items():
            w, b = layer.folded()
            codes = layer.weight_quant.codes(w, layer.weight_qscale(layer.last_input_quant, b))
            bits = int(layer.weight_quant.bits)
            if name in self.codes and self.bits[name] == bits:
                move = torch.sign(codes - self.codes[name])
                self.count[name] += (move * self.last_move[name] < 0).to(self.count[name].dtype)
                self.last_move[name] = torch.where(move != 0, move, self.last_move[name])
            else:
                self.last_move[name] = torch.zeros_like(codes)
                self.count.setdefault(name, torch.zeros_like(codes, dtype=torch.int32))
            self.codes[name], self.bits[name] = codes, bits

    def state_dict(self) -> dict[str, dict]:
        """The codes and moves of the last step (a resumed run compares its first step with them); the counts are
        the epoch's and start at zero at the epoch boundary where checkpoints are written."""
        return {"codes": dict(self.codes), "last_move": dict(self.last_move), "bits": dict(self.bits)}

    def load_state_dict(self, state: Mapping[str, dict]) -> None:
        self.codes, self.last_move, self.bits = dict(state["codes"]), dict(state["last_move"]), dict(state["bits"])
        self.count = {name: torch.zeros_like(codes, dtype=torch.int32) for name, codes in self.codes.items()}

    def epoch_stats(self) -> dict[str, float]:
        """{"oscillating": share of tracked weights with an oscillation this epoch, "oscillations_per_weight": mean
        count}, and the counts start again; {} when no weight is tracked (every layer at 8 bits)."""
        if not self.count:
            return {}
        counts = torch.cat([c.flatten() for c in self.count.values()])
        for c in self.count.values():
            c.zero_()
        return {"oscillating": float((counts > 0).double().mean()), "oscillations_per_weight": float(counts.double().mean())}
