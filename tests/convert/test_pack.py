"""Bit packing of weight codes: round trips, byte counts, and the pinned bit order."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qatkit.convert.pack import container_bits, pack, unpack


def signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits, width", [(2, 2), (3, 4), (4, 4), (5, 8), (6, 8), (7, 8), (8, 8)])
def test_container_bits(bits, width):
    assert container_bits(bits) == width


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 17, 1001])
@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_round_trip_covers_the_whole_range(bits, n):
    lo, hi = signed_range(bits)
    codes = torch.arange(n) % (hi - lo + 1) + lo  # every code, both extremes included once n is large enough
    packed = pack(codes, bits)
    out = unpack(packed, bits, (n,))
    assert out.dtype == torch.int16
    assert torch.equal(out, codes.to(torch.int16))


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("bits, per_byte", [(2, 4), (3, 2), (4, 2), (5, 1), (8, 1)])
def test_packed_byte_counts(bits, per_byte, n):
    packed = pack(torch.zeros(n), bits)
    assert packed.numel() == math.ceil(n / per_byte)
    assert packed.dtype == (torch.int8 if per_byte == 1 else torch.uint8)


def test_multidimensional_codes_round_trip_in_row_major_order():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (6, 3, 3, 3))
    packed = pack(codes, 4)
    assert packed.shape == (math.ceil(codes.numel() / 2),)
    assert torch.equal(unpack(packed, 4, tuple(codes.shape)), codes.to(torch.int16))
    assert torch.equal(unpack(packed, 4, (codes.numel(),)), codes.reshape(-1).to(torch.int16))


def test_float_codes_as_produced_by_quantizers_are_accepted():
    codes = torch.tensor([-8.0, 7.0, 0.0, -1.0, 3.0])
    assert torch.equal(unpack(pack(codes, 4), 4, (5,)), codes.to(torch.int16))


def test_nibble_order_is_pinned():
    # int4 [1, -2, 3]: byte 0 = low nibble 0x1 (first element), high nibble 0xE (-2); byte 1 = 0x3, padded with 0
    assert pack(torch.tensor([1, -2, 3]), 4).tolist() == [0xE1, 0x03]
    # int2 [1, -1, 0, 1, -2]: byte 0 = 01 | 11<<2 | 00<<4 | 01<<6 = 0x4D; byte 1 = 10 (=-2)
    assert pack(torch.tensor([1, -1, 0, 1, -2]), 2).tolist() == [0x4D, 0x02]
    # int3 is stored in nibbles: -4 → 0b1100
    assert pack(torch.tensor([-4, 3]), 3).tolist() == [0x3C]
    # int8: plain two's complement, one per byte
    assert pack(torch.tensor([-128, 127, -1]), 8).tolist() == [-128, 127, -1]
    # and unpacking a hand-made byte reads the low nibble first
    assert unpack(torch.tensor([0x7F, 0x08], dtype=torch.uint8), 4, (3,)).tolist() == [-1, 7, -8]
    assert unpack(torch.tensor([0b11100100], dtype=torch.uint8), 2, (4,)).tolist() == [0, 1, -2, -1]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unsigned_round_trip_for_sub_byte_widths(bits):
    codes = torch.arange(2**bits).repeat(3)[:-1]
    assert torch.equal(unpack(pack(codes, bits), bits, (codes.numel(),), signed=False), codes.to(torch.int16))


def test_unsigned_round_trip_for_8_bits():
    codes = torch.tensor([0, 255, 7, 128])
    assert torch.equal(unpack(pack(codes, 8, signed=False), 8, (4,), signed=False), codes.to(torch.int16))


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_unsigned_round_trip_for_5_to_7_bits(bits):
    codes = torch.arange(2**bits)
    assert torch.equal(unpack(pack(codes, bits), bits, (codes.numel(),), signed=False), codes.to(torch.int16))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), bits=st.integers(2, 8), n=st.integers(1, 70))
def test_round_trip_property(data, bits, n):
    lo, hi = signed_range(bits)
    values = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    codes = torch.tensor(values)
    packed = pack(codes, bits)
    per_byte = 8 // container_bits(bits)
    assert packed.numel() == math.ceil(n / per_byte)
    assert unpack(packed, bits, (n,)).tolist() == values
