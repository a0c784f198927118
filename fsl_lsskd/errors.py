"""Exception hierarchy. Every :class:`UserError` is a problem with the user's input: the CLI prints its
message (which names the fix) and exits with code 2."""


class FslError(Exception):
    """Base class of all fsl-bench errors."""


class UserError(FslError):
    """Bad input from the user (data, config, names, paths). CLI exit code 2."""


class UnknownNameError(UserError, KeyError):
    """A registry lookup with a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(UserError):
    """Missing, corrupt or insufficient data."""


class ChecksumError(DataError):
    """A file's checksum does not match the expected one."""


class ConfigError(UserError):
    """A benchmark/method config is invalid."""


class ProtocolError(UserError):
    """An evaluation protocol the data cannot supply (n_way, shot+query)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not match the backbone."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle asks for code (a global outside tensors and plain containers): refused unopened."""


class OutputError(UserError):
    """An output or cache location that cannot be written (read-only, permission denied, disk full)."""


class TrainingDiverged(FslError):
    """Loss became NaN or inf."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (``kill``, a job scheduler's stop): raised in the main thread by the CLI's
    handler so it shuts down as on Ctrl-C (runs marked KILLED, nothing half-written), with exit code 143."""
