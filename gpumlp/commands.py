"""What every command shares: one-line errors for bad flags and for failures the user can fix, and
a transcript of what the command prints."""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import sys

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; the commands print the error alone."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def run_command(action) -> int:
    """Runs action() -> exit code; a failure the user can fix becomes one `error:` line and its
    exit code (2 unless the error says otherwise); a stop signal before anything was saved exits
    with 128 + its number."""
    from gpumlp.errors import exit_code, is_user_error
    from gpumlp.stop_signals import StopRequested
    try:
        return action()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except StopRequested as stop:
        print(f"stopped by {stop.name}", file=sys.stderr)
        return stop.exit_code
    except Exception as error:
        if not is_user_error(error):
            raise
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return exit_code(error)


class _Tee:
    """A text stream that writes to `stream` and to the transcript."""

    def __init__(self, stream, transcript: "Transcript"):
        self.stream, self.transcript = stream, transcript

    def write(self, text: str) -> int:
        self.transcript.record(text)
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding...: the real stream's
        return getattr(self.stream, name)


class Transcript:
    """While active, everything printed to stdout and stderr is also kept: in memory until
    `attach(file)`, then appended to that file (a run's train.log), so the file holds the lines
    printed before the run directory existed too. Progress bars go to `terminal_stderr` and are
    not kept."""

    def __init__(self):
        self.pending = io.StringIO()
        self.file = None

    def __enter__(self) -> "Transcript":
        self.stdout, self.terminal_stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self.stdout, self.terminal_stderr
        if self.file is not None:
            self.file.close()

    def print(self, message: str) -> None:
        print(message, flush=True)

    def record(self, text: str) -> None:
        if self.file is None:
            self.pending.write(text)
        else:
            self.file.write(text)
            self.file.flush()

    def attach(self, path, title: str) -> None:
        """From now on lines go to `path` (appended), after a title line and what came before."""
        self.file = open(path, "a", encoding="utf-8")
        self.file.write(f"=== {_dt.datetime.now().isoformat(timespec='seconds')} {title}\n")
        self.file.write(self.pending.getvalue())
        self.file.flush()
        self.pending = io.StringIO()
