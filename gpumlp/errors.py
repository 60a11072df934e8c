"""Failures a user can cause and fix: the command reports them as one `error:` line, no traceback."""


class UserError(Exception):
    """Base of the project's expected failures (bad flags, bad run directory, no device...)."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work."""


def is_user_error(error: BaseException) -> bool:
    from gpumlp.data import DataError
    return isinstance(error, (UserError, DataError, OSError))
