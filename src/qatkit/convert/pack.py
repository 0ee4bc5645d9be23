"""Bit packing of integer weight codes: 8-bit one per byte, 3/4-bit two per byte, 2-bit four per byte.

Codes are stored as their two's-complement low bits, first element in the lowest bits of a byte.
"""
from __future__ import annotations

import torch


def container_bits(bits: int) -> int:
    """Storage width for `bits`-wide codes: 2, 4 or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack(codes: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Integer codes (any shape) → flat uint8 tensor (int8 for signed 8-bit codes)."""
    width = container_bits(bits)
    flat = codes.reshape(-1).to(torch.int16)
    if width == 8:
        return flat.to(torch.int8 if signed else torch.uint8)
    per_byte = 8 // width
    pad = (-flat.numel()) % per_byte
    fields = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per_byte) & ((1 << width) - 1)  # (bytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int16) * width
    return (fields << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...], signed: bool = True) -> torch.Tensor:
    """Inverse of `pack`: the codes as an int16 tensor of `shape`."""
    width = container_bits(bits)
    numel = 1
    for d in shape:
        numel *= d
    if width == 8:
        return packed.to(torch.int16)[:numel].view(shape)
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.int16) * width
    fields = (packed.to(torch.int16)[:, None] >> shifts) & ((1 << width) - 1)  # (bytes, per_byte)
    fields = fields.reshape(-1)[:numel]
    if signed:
        fields = torch.where(fields >= 1 << (width - 1), fields - (1 << width), fields)
    return fields.view(shape)
