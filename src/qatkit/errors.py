"""qatkit's own exception types.

Every user-facing error names the bad value, what is allowed, and how to fix it, in one line.
The CLI turns these into a one-line message and exit code 2 (usage) or 1 (other failures).
"""
from __future__ import annotations


class QatkitError(Exception):
    """Base class of every error qatkit raises on purpose."""


class ConfigError(QatkitError, ValueError):
    """A configuration value is out of range or of the wrong type (a usage error)."""


class DataError(QatkitError, ValueError):
    """A dataset path is missing, of the wrong format, or its content does not fit the model."""


class ModelFileError(QatkitError, ValueError):
    """A model or checkpoint file is missing, corrupted, truncated or does not match."""


def bad_value(what: str, value: object, allowed: str, fix: str, cls: type[QatkitError] = ConfigError) -> QatkitError:
    """Build the one-line message every error in qatkit follows: value, allowed values, fix."""
    return cls(f"{what} = {_shown(value)} is not allowed; allowed: {allowed}. Fix: {fix}")


def _shown(value: object, most: int = 200) -> str:
    """repr(value), cut to `most` characters (an int of 5000 digits has no repr under Python's digit limit)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of about {value.bit_length() * 30103 // 100000 + 1} digits"
    return text if len(text) <= most else text[:most] + "…"


def listed(items, most: int) -> str:
    """The first `most` items, comma-separated, then how many more there are (for one-line messages)."""
    items = [str(i) for i in items]
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def error_detail(e: BaseException, line_limit: int = 120, lines_kept: int = 3) -> str:
    """An exception's message on one line: its first lines, each cut to `line_limit` characters; for
    load_state_dict's, its missing / unexpected keys and shape lines (its first line, "Error(s) in loading state_dict
    for X:", says nothing)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    cut = [line if len(line) <= line_limit else line[:line_limit - 3] + "..." for line in lines[:lines_kept]]
    return "; ".join(cut + ([f"{len(lines) - lines_kept} more"] if len(lines) > lines_kept else []))
