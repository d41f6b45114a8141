"""Errors a user can act on.

Every error raised for bad input derives from `TargetgenError`; the CLI prints
its message on one line and exits with its ``exit_code`` (2), without a traceback.
"""


class TargetgenError(Exception):
    """Bad input or a state the user must fix; the message says what and how."""

    exit_code = 2


class ConfigError(TargetgenError):
    """A configuration key or value is invalid."""


class DataError(TargetgenError):
    """A data source cannot be read."""


class PluginError(TargetgenError):
    """A plugin is missing, broken, or registered twice."""


class DivergenceError(TargetgenError):
    """A loss, a network output or a weight became NaN or infinite; training stopped."""


class RunDirectoryError(TargetgenError):
    """A run directory is missing, is in use, or exists and may not be reused."""


class WriteError(TargetgenError):
    """A file cannot be written (a full disk, a read-only folder); the previous file is kept."""


class CheckpointError(TargetgenError):
    """A checkpoint cannot be written, read, or does not fit the run."""


class Interrupted(TargetgenError):
    """The user stopped a command (Ctrl-C: exit status 130, SIGTERM: 143); the message says how to continue."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM: a stop like Ctrl-C (the last checkpoint kept, a resume command printed), exit status 143."""
