"""The one exception type for user mistakes.

Anything the user can fix (a missing file, a bad config key, a corpus too small) raises
`LmkilnError` with a message that names the file/line/key and says what to do. The CLI prints
it as one line and exits with code 2; tracebacks are reserved for bugs (and `--debug`).
"""

from __future__ import annotations


class LmkilnError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; exits with 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: object = None) -> None:
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
