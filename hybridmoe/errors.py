"""Errors a user can act on. Each message is one line that names the file, tensor or flag and the fix."""


class HybridMoEError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, without a traceback."""


class ModelFileError(HybridMoEError):
    """A model file is missing, truncated, corrupt or holds unexpected tensors."""


class ConfigError(HybridMoEError, ValueError):
    """A config.json, profile or option is invalid or names something unsupported (a ValueError too, as invalid
    settings are in Python)."""


class ContextOverflowError(HybridMoEError):
    """A prompt or generation does not fit in the context window."""


class EngineBusyError(HybridMoEError):
    """A second generation was started in the thread whose earlier one is still open on the same engine."""
