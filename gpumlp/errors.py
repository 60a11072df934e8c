"""Failures a user can cause and fix: the command reports them as one `error:` line, no traceback."""


class UserError(Exception):
    """Base of the project's expected failures (bad flags, bad run directory, no device...)."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A setting that cannot work."""


def exit_code(error: BaseException) -> int:
    return getattr(error, "exit_code", 2)


def is_user_error(error: BaseException) -> bool:
    from gpumlp.data import DataError
    return isinstance(error, (UserError, DataError, OSError))
