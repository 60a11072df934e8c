"""What every command shares: one-line errors for bad flags and for failures the user can fix."""
from __future__ import annotations

import argparse
import sys

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; the commands print the error alone."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def run_command(action) -> int:
    """Runs action() -> exit code; a failure the user can fix becomes one `error:` line and its
    exit code (2 unless the error says otherwise)."""
    from gpumlp.errors import exit_code, is_user_error
    try:
        return action()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:
        if not is_user_error(error):
            raise
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return exit_code(error)
