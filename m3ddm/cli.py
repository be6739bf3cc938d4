"""How every m3ddm command line ends (sample.py, train.py, evaluate.py, weights_convert.py, m3ddm.bench,
m3ddm.demo): written once here.

    def main(argv=None):
        return cli.run(lambda: _main(argv), interrupted="no partial output was kept")

- `m3ddm.UserError` -> one line `error: <message>` on stderr, exit code 2.
- SIGINT (Ctrl-C), SIGTERM (a scheduler's time limit, `timeout`, `docker stop`) and SIGHUP (the terminal
  went away) are raised in the main thread as `Interrupted` (a KeyboardInterrupt), so every `finally` and
  `except BaseException` on the way out runs its cleanup (writers aborted, temporary files deleted); then
  one line `error: interrupted by SIGTERM; <note>.` and exit code 128 + the signal number (130, 143, 129).
  Whatever a cut-short body could not clean up itself (a signal landing between a writer's creation and the
  code that would abort it) is cleaned up here: open video writers are aborted and this process's temporary
  files deleted (`m3ddm.files.remove_own_temps`). Further signals during that cleanup are ignored, so it cannot be cut short (SIGKILL still can; its
  debris is removed by the next run over the folder, see m3ddm/files.py).
- `signals_deferred()` holds a signal back over the few steps that must not be cut in two (starting a child
  process and keeping its handle, so that the cleanup can stop it) and raises it right after them.
- `M3DDM_DEBUG=1` prints the traceback as well. Any other exception is a bug and raises with its traceback.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Callable

from . import files
from .errors import UserError

DEBUG_ENV = "M3DDM_DEBUG"
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class Interrupted(KeyboardInterrupt):
    """A handled signal, raised where the main thread was."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _install_handlers() -> dict:
    """Raise Interrupted on the first handled signal, ignore the ones after it; returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            if _DEFERRED["depth"]:
                _DEFERRED["pending"] = signum
                return
            raise Interrupted(signum)

    return {s: signal.signal(s, handler) for s in SIGNALS}


_DEFERRED = {"depth": 0, "pending": None}


@contextmanager
def signals_deferred():
    """A handled signal that arrives inside the block is raised (as Interrupted) when the block ends, not in
    the middle of it: e.g. between a child process's start and the assignment of its Popen, where the cleanup
    could not stop the child (an ffmpeg started that way would write its file after the cleanup ran)."""
    _DEFERRED["depth"] += 1
    try:
        yield
    finally:
        _DEFERRED["depth"] -= 1
        if not _DEFERRED["depth"] and _DEFERRED["pending"] is not None:
            signum, _DEFERRED["pending"] = _DEFERRED["pending"], None
            raise Interrupted(signum)


_line_open = False       # a terminal line was written without its newline (progress rewritten in place)


def progress_line(text: str, final: bool = True):
    """One progress line on stderr, the one way every command line writes them: on a terminal a non-final line
    is rewritten in place, and the next line replaces it; in a log every line is whole. Always ONE write, so a
    signal can never land between a line and its newline (the error line after it would be glued on)."""
    global _line_open
    tty = sys.stderr.isatty()
    start = "\r" if _line_open else ""
    end = "\033[K\n" if _line_open and final else "\n" if final or not tty else "\033[K"
    try:
        sys.stderr.write(start + text + end)
        sys.stderr.flush()
    except (OSError, ValueError):                           # the terminal is gone (SIGHUP)
        pass
    _line_open = tty and not final


def _debug():
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exc(file=sys.stderr)


def _cleanup():
    """What a cut-short body left behind: its open video writers (if it used any), then its temporary files."""
    video = sys.modules.get(f"{__package__}.video")
    if video is not None:
        video.abort_open_writers()
    files.remove_own_temps()


def run(body: Callable[[], int], interrupted: str = "") -> int:
    """Run a command line's body; returns its exit code (the body's return value, 0 for None)."""
    previous = _install_handlers()
    try:
        return int(body() or 0)
    except UserError as e:
        _cleanup()
        _debug()
        progress_line(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        _cleanup()
        signum = getattr(e, "signum", signal.SIGINT)
        _debug()
        progress_line(f"error: interrupted by {signal.Signals(signum).name}" + (f"; {interrupted}" if interrupted else "")
             + ".")
        return 128 + int(signum)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
