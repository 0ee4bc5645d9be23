"""qrange / check_bits: integer ranges of the quantized types and bit-width validation."""
from __future__ import annotations

import re

import pytest

from qatkit.errors import ConfigError
from qatkit.primitives import qrange
from qatkit.primitives.ranges import check_bits

# written out, not computed: (bits, signed, narrow) -> (qmin, qmax)
TABLE = {
    (2, True, False): (-2, 1), (2, True, True): (-1, 1), (2, False, False): (0, 3), (2, False, True): (0, 2),
    (3, True, False): (-4, 3), (3, True, True): (-3, 3), (3, False, False): (0, 7), (3, False, True): (0, 6),
    (4, True, False): (-8, 7), (4, True, True): (-7, 7), (4, False, False): (0, 15), (4, False, True): (0, 14),
    (5, True, False): (-16, 15), (5, True, True): (-15, 15), (5, False, False): (0, 31), (5, False, True): (0, 30),
    (6, True, False): (-32, 31), (6, True, True): (-31, 31), (6, False, False): (0, 63), (6, False, True): (0, 62),
    (7, True, False): (-64, 63), (7, True, True): (-63, 63), (7, False, False): (0, 127), (7, False, True): (0, 126),
    (8, True, False): (-128, 127), (8, True, True): (-127, 127), (8, False, False): (0, 255), (8, False, True): (0, 254),
}


@pytest.mark.parametrize("key", sorted(TABLE), ids=lambda k: f"b{k[0]}-{'int' if k[1] else 'uint'}{'-narrow' if k[2] else ''}")
def test_qrange_values(key):
    bits, signed, narrow = key
    got = qrange(bits, signed, narrow)
    assert got == TABLE[key]
    assert all(type(v) is int for v in got)
    qmin, qmax = got
    assert qmax - qmin + 1 == 2**bits - int(narrow)  # narrow drops exactly one code
    if signed and narrow:
        assert -qmin == qmax


def test_qrange_default_is_not_narrow():
    assert qrange(8, True) == (-128, 127)
    assert qrange(4, False) == (0, 15)


@pytest.mark.parametrize("bits", range(2, 9))
def test_check_bits_accepts_2_to_8(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bad", [1, 9, 0, -8, 16, 4.0, True, False, "8", None, 8.5])
def test_check_bits_rejects_naming_the_value(bad):
    with pytest.raises(ConfigError, match=re.escape(f"bits = {bad!r} is not allowed")):
        check_bits(bad)
    with pytest.raises(ConfigError, match=re.escape(f"bits = {bad!r}")):
        qrange(bad, True)


def test_check_bits_names_the_option_and_is_a_value_error():
    with pytest.raises(ConfigError, match=re.escape("act_bits = 9 is not allowed; allowed: an integer from 2 to 8")) as info:
        check_bits(9, "act_bits")
    assert isinstance(info.value, ValueError)
    assert "Fix:" in str(info.value)
