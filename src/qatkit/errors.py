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
    return cls(f"{what} = {value!r} is not allowed; allowed: {allowed}. Fix: {fix}")
