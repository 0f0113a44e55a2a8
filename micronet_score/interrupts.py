"""Ctrl-C and unwritable output on the command line: one line and a known exit code, whenever they happen.

Imported by the package's ``__init__`` (this module imports nothing heavy), so that the ``micronet-score`` command
(and ``python -m micronet_score``) installs its SIGINT handler before torch and the rest are imported:

- while a command runs (:func:`raising`), Ctrl-C raises ``KeyboardInterrupt``: cleanups run (no half-written cache
  file) and the command reports one line starting "interrupted" (with what it measured so far) and exit code 130;
  an interrupt that library code catches and ignores is still reported when the command returns (:func:`check`);
  one that arrives where Python would only print it and go on (a finalizer, the import machinery's lock
  callbacks) is asked again 50 ms later, until the code has left such a place;
- at any other moment (importing, parsing the command line, after the command) it prints "interrupted" and exits
  with 130 at once: nothing is half-done there.

Output that cannot be written (:func:`flush_stdout`): standard output closed by its reader (a broken pipe, as in
``micronet-score ... | head``) ends quietly with exit code 1 (the reader has what it wanted, nothing to report);
any other write error (``> /dev/full``: no space left) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

INTERRUPTED = 130
_state = {"raising": False, "interrupted": False}


def started_as_command() -> bool:
    """Whether this process is the ``micronet-score`` command (console script or ``python -m micronet_score``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    if name.startswith("micronet-score"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b == "micronet_score" for a, b in zip(argv, argv[1:], strict=False))


def install() -> None:
    """Take over SIGINT for the command line (see the module's docstring)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)


RETRY_SECONDS = 0.05
"""An interrupt that arrives where an exception would be printed and ignored is delivered again this much later."""


def _on_interrupt(signum, frame) -> None:
    _state["interrupted"] = True
    if _state["raising"]:
        if _swallowing(frame):
            # Inside the import machinery's lock callbacks or a finalizer, Python prints an exception it cannot
            # propagate ("Exception ignored in ...") and goes on: ask again once the code has left it.
            threading.Timer(RETRY_SECONDS, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        raise KeyboardInterrupt
    try:
        os.write(2, b"interrupted\n")
    finally:
        os._exit(INTERRUPTED)


def _swallowing(frame) -> bool:
    """Whether an exception raised in this frame would be printed and ignored rather than propagated: the frame or
    a caller is in importlib's bootstrap (its module-lock weakref callbacks) or in a ``__del__`` finalizer."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib") or code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextmanager
def raising() -> Iterator[None]:
    """While the block runs, Ctrl-C raises KeyboardInterrupt (the command reports it)."""
    _state["raising"], _state["interrupted"] = True, False
    try:
        yield
    finally:
        _state["raising"] = False


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed during :func:`raising` and swallowed on the way."""
    if _state["interrupted"]:
        _state["interrupted"] = False
        raise KeyboardInterrupt


def flush_stdout() -> int | None:
    """Flush standard output; the exit code for an output that cannot be written (None when it was written)."""
    try:
        sys.stdout.flush()
        return None
    except OSError as exc:
        return output_failed(exc)


def output_failed(exc: OSError) -> int:
    """The exit code for a write error of standard output, after one line on stderr (none for a broken pipe: its
    reader left); standard output is pointed at /dev/null so that nothing tries again at exit."""
    _silence_stdout()
    if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
        return 1
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    try:
        sys.stderr.write(f"error: cannot write the output ({reason})\n")
        sys.stderr.flush()
    except OSError:
        pass
    return 2


def leave(code: int) -> NoReturn:
    """End the command with ``code`` once its output is flushed, skipping the interpreter's teardown: Python
    restores the default SIGINT action while it tears down, so a Ctrl-C then would kill the process by signal
    (exit -2) instead of ending it with one line."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's own flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
