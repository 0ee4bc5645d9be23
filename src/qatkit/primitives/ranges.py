"""Integer ranges of the quantized types."""
from __future__ import annotations

from qatkit.errors import bad_value

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: object, what: str = "bits") -> int:
    """Return `bits` if it is an int in 2..8, else raise a ConfigError naming it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise bad_value(what, bits, f"an integer from {MIN_BITS} to {MAX_BITS}", f"set {what} to e.g. 8 or 4")
    return bits


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-wide integer.

    signed: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1]. `narrow` drops the most negative
    signed value so the range is symmetric ([-127, 127] for int8), which keeps -qmin == qmax.
    """
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)
