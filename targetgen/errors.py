"""Errors a user can act on.

Every error raised for bad input derives from `TargetgenError`; the CLI prints
its message on one line and exits with status 2, without a traceback.
"""


class TargetgenError(Exception):
    """Bad input or a state the user must fix; the message says what and how."""


class ConfigError(TargetgenError):
    """A configuration key or value is invalid."""


class DataError(TargetgenError):
    """A data source cannot be read."""


class PluginError(TargetgenError):
    """A plugin is missing, broken, or registered twice."""


class DivergenceError(TargetgenError):
    """A loss became NaN or infinite; training stopped."""


class RunDirectoryError(TargetgenError):
    """A run directory is missing, or exists and may not be reused."""
