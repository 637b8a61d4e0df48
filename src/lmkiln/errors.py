"""The one exception type for user mistakes.

Anything the user can fix (a missing file, a bad config key, a corpus too small) raises
`LmkilnError` with a message that names the file/line/key and says what to do. The CLI prints
it as one line and exits with code 2; tracebacks are reserved for bugs (and `--debug`).
"""

from __future__ import annotations

import errno


class LmkilnError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; exits with 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: object = None) -> None:
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
    errno.EROFS: "write somewhere else",
    errno.EACCES: "you lack permission; choose a path you can write (or read)",
    errno.EPERM: "you lack permission; choose a path you can write (or read)",
    errno.ENOENT: "check the path",
    errno.EEXIST: "remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "it is a directory; give a file path",
    errno.ENOTEMPTY: "the directory is not empty; empty it or choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error the user can fix: what failed, on which path, what to do."""
    paths = " → ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err)
    advice = _OS_ERROR_ADVICE.get(err.errno, "")
    line = f"{paths}: {reason}" if paths else reason
    return f"{line}; {advice}" if advice else line
