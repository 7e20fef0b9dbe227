"""What the user sees while waiting: progress bars, a status line, and a clean exit on Ctrl-C.

The lowest layer (imports nothing of ours), shared by loading, conversion and the CLIs.

- `progress_bar`: tqdm on a terminal; in a pipe or a log file, plain lines every few seconds
  ("loading gpt-oss-20b: 45% 5.8/12.8 GiB"), never tqdm's `\\r` redraws.
- `StatusLine`: "compiling (first run for these shapes)... 12 s" redrawn in place on a terminal until the
  wait is over; one plain line when stderr is not a terminal; nothing when quiet.
- `exit_on_interrupt` / `exit_now`: Ctrl-C prints one line and ends the process with exit code 130 at once,
  skipping the interpreter's shutdown. That shutdown is what fails after an interrupt: JAX's atexit hook
  clears its caches under a half-finished compilation (a segfault), and Orbax's writer threads find their
  executors gone (tracebacks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

_EXITING = threading.Lock()


class PlainProgress:
    """tqdm's `update`/context interface as plain lines: one every `interval` seconds while work goes on. A
    lasting bar (not `transient`) also says where it starts and, at the end, how long it took and how fast."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        initial: int = 0,
        interval: float = 10.0,
        transient: bool = True,
        file=None,
    ):
        self.total, self.desc, self.n = total, desc, initial
        self.interval, self.transient = interval, transient
        self.file = file or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.unit, self.unit_name = (2**30, "GiB") if total >= 2**30 else (2**20, "MiB")
        if not transient:
            self._line()

    def _line(self, extra: str = "") -> None:
        pct = 100 * self.n / self.total if self.total else 100
        print(
            f"{self.desc}: {pct:.0f}% {self.n / self.unit:.1f}/{self.total / self.unit:.1f} {self.unit_name}"
            f"{extra}",
            file=self.file,
            flush=True,
        )

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def close(self) -> None:
        if not self.transient:
            dt = time.monotonic() - self.t0
            self._line(f" in {dt:.1f} s ({self.n / 2**20 / max(dt, 1e-9):.1f} MiB/s)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(total: int, desc: str, *, quiet: bool, initial: int = 0, terminal_only: bool = True):
    """A byte counter on stderr: a tqdm bar on a terminal, plain periodic lines otherwise (`PlainProgress`).

    `terminal_only` marks a transient bar (loading: the caller prints its own summary line): it is erased
    from the terminal when done and prints only the periodic lines in a log. The converter's bar stays.
    """
    if not quiet and not sys.stderr.isatty():
        return PlainProgress(total, desc, initial=initial, transient=terminal_only)
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=not terminal_only,
    )


class StatusLine:
    """One line on stderr while something slow runs, from `delay` seconds in until `done()`.

    On a terminal it is redrawn with the elapsed time and erased when done; elsewhere it is printed once
    ("MESSAGE...") and closed by "MESSAGE: done in 12.3 s". `when`, if given, is an Event that must be set
    before the line appears (the CLI sets it when JAX starts compiling, so a cached run stays silent).
    """

    def __init__(self, message: str, *, quiet: bool = False, delay: float = 0.5, when=None, file=None):
        self.message, self.delay, self.when = message, delay, when
        self.file = file or sys.stderr
        self.tty = self.file.isatty()
        self.stop = threading.Event()
        self.shown = False
        self.t0 = time.monotonic()
        self.thread = None if quiet else threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.stop.wait(self.delay):
            return
        while self.when is not None and not self.when.is_set():
            if self.stop.wait(0.1):
                return
        while not _EXITING.locked():
            elapsed = time.monotonic() - self.t0
            if self.tty:
                self.file.write(f"\r\033[K{self.message}... {elapsed:.0f} s")
                self.file.flush()
            elif not self.shown:
                print(f"{self.message}...", file=self.file, flush=True)
            self.shown = True
            if self.stop.wait(1.0 if self.tty else 3600):
                return

    def done(self, *, failed: bool = False) -> None:
        """Ends the line (idempotent; cheap enough to call on every generated token). `failed`: the wait
        ended by an exception, so no "done" line."""
        if self.stop.is_set():
            return
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.shown and not _EXITING.locked():
            if self.tty:
                self.file.write("\r\033[K")
                self.file.flush()
            elif not failed:
                print(
                    f"{self.message}: done in {time.monotonic() - self.t0:.1f} s", file=self.file, flush=True
                )

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self.done(failed=exc_type is not None)


def exit_now(message: str, code: int = 130):
    """Prints `message` (one line on stderr) and ends the process immediately with `code`, without the
    interpreter's shutdown (see the module docstring). Safe to call from any thread; the first call wins."""
    _EXITING.acquire()  # a second caller waits here until the first one has ended the process
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(Exception):
            sys.stdout.flush()  # another thread could be blocked holding stdout's lock: main thread only
    lead = "\n" if sys.stderr.isatty() else ""  # off the "^C" the terminal echoed
    with contextlib.suppress(OSError):
        os.write(2, f"{lead}{message}\n".encode())
    os._exit(code)


@contextlib.contextmanager
def exit_on_interrupt(message: str, *, grace: float = 1.0):
    """Ctrl-C inside the block ends the process with `message` and exit code 130.

    The main thread still gets its KeyboardInterrupt (so `finally` blocks run); the caller catches it and
    calls `exit_now(message)`. When the main thread is inside native code that does not return to Python
    for a long time (XLA compiling a deep model: tens of seconds), a watcher thread woken by the signal
    itself (`signal.set_wakeup_fd`) calls `exit_now` after `grace` seconds. Only in the main thread of a
    process that has Python's default Ctrl-C handler; elsewhere the block runs unchanged.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    rd, wr = socket.socketpair()
    wr.setblocking(False)
    old = signal.set_wakeup_fd(wr.fileno(), warn_on_full_buffer=False)

    def watch():
        while True:
            try:
                data = rd.recv(64)
            except OSError:
                return
            if not data:  # the block ended
                return
            if signal.SIGINT in data:
                time.sleep(grace)
                exit_now(message)

    threading.Thread(target=watch, daemon=True, name="exit_on_interrupt").start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old)
        with contextlib.suppress(OSError):
            rd.shutdown(socket.SHUT_RDWR)
        wr.close()
        rd.close()
