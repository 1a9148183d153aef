"""Errors a user can act on. The CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(UserError, ValueError):
    """A config key, value or type is wrong; the message names the key."""


class DataError(UserError):
    """Input data is missing or malformed; the message names the file (and line)."""


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message names the file and the offending keys."""


class NumericalError(UserError):
    """Training produced a non-finite loss; the message says where and what to change."""
