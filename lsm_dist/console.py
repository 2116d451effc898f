"""The console: what a user sees while a command runs, and the log file that keeps the rest.

A command (``lsm demo``, ``lsm eval``, ``lsm merge``, ``lsm zoo``, ``lsm experiment``) shows
one progress bar per stage (counts, rate, ETA) and its final tables. Everything else goes,
timestamped, to a log file in the command's ``out_dir`` (e.g. ``demo.log``, appended per run):
the project's own INFO logging, every other library's logging and Python warnings,
third-party progress bars (transformers' weight loading and shard writing, GGUF
de-quantizing, lm-eval's request loops, datasets; one line per bar, its last state), prints,
and what subprocesses or C code write to the terminal (lm-eval's ``git`` calls outside a
checkout). The project's own warnings and errors still reach the console. ``--verbose`` /
``-v`` or ``LSM_VERBOSE=1``: nothing is redirected (the full output).

- :func:`session` -- the redirection, entered by the CLI around one command;
- :func:`stage` -- one bar for everything a stage reports (``[2/5] weight corpus``);
- :func:`progress` -- a bar the user sees; only the outermost open bar shows (inside a stage it
  feeds the stage's bar), nested ones stay silent, so a stage never prints a second bar;
- :func:`echo` -- console output (the final tables) that bypasses the redirection.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

VERBOSE_ENV = "LSM_VERBOSE"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def verbose_env() -> bool:
    """``LSM_VERBOSE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _State:
    out: TextIO | None = None  # the user's stdout / stderr while a session redirects
    err: TextIO | None = None
    session: Session | None = None
    stage: _Stage | None = None
    open_bars: weakref.WeakSet = weakref.WeakSet()  # bars the user sees (nesting depth)


_S = _State()


def out_stream() -> TextIO:
    """Where console output goes: the user's stdout (also inside a session)."""
    return _S.out or sys.stdout


def err_stream() -> TextIO:
    """Where progress bars and the project's warnings go: the user's stderr."""
    return _S.err or sys.stderr


def echo(text: str = "", end: str = "\n") -> None:
    """Print ``text`` on the console (bars redrawn around it), even inside a session."""
    Bar.write(text, file=out_stream(), end=end)
    out_stream().flush()


def quiet() -> bool:
    """A session is redirecting everything but the bars and tables."""
    return _S.session is not None and _S.session.quiet


# --------------------------------------------------------------------------- bars
class Bar(tqdm):
    """The project's console bars: their own instance set, so bars of other libraries (which go
    to the log inside a session) never nest under them, and vice versa."""

    _instances = weakref.WeakSet()
    POSTFIX = 28  # postfixes padded to this width: the bar does not jump as they change

    def __init__(self, *args, **kw):
        stream = kw.get("file") or err_stream()
        tty = self.tty = bool(getattr(stream, "isatty", lambda: False)())
        kw.setdefault("file", stream)
        kw.setdefault("mininterval", 0.1 if tty else 5.0)  # a pipe / CI log: few redraws
        try:  # a terminal of unknown size (a pty without one) reports 0 columns / lines
            cols, lines = os.get_terminal_size(stream.fileno()) if tty else (0, 0)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            cols, lines = 0, 0
        if cols > 0 and lines > 0:
            kw.setdefault("dynamic_ncols", True)
        else:  # tqdm would hide every bar below 0 rows
            kw.setdefault("ncols", cols if cols > 0 else 100)
            kw.setdefault("nrows", 50)
        super().__init__(*args, **kw)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """A padded postfix, drawn at once only on a terminal (a log gets it with the next
        timed redraw)."""
        super().set_postfix_str(s[: self.POSTFIX].ljust(self.POSTFIX), refresh=refresh and self.tty)


class _Silent:
    """What :func:`progress` returns for a nested or disabled bar: same interface, no output."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, initial: int = 0):
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self) -> Iterator:
        for x in self.iterable or ():
            yield x
            self.n += 1

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def set_postfix(self, *a, **kw) -> None:
        pass

    def set_total(self, total: int) -> None:
        self.total = total

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Feed(_Silent):
    """A :func:`progress` bar inside a stage: counts into the stage's one bar."""

    def __init__(self, stage: _Stage, iterable, total, unit: str, initial: int):
        super().__init__(iterable, total, initial)
        self.stage, self.closed = stage, False
        bar = stage.bar
        if stage.feeds == 0:
            bar.unit, bar.bar_format = unit, None
        stage.feeds += 1
        if total:
            bar.total = (bar.total or 0) + total
        bar.n += initial
        bar.initial += initial
        if bar.tty:
            bar.refresh()
        _S.open_bars.add(self)

    def __iter__(self) -> Iterator:
        try:
            for x in self.iterable or ():
                yield x
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.stage.bar.update(n)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.stage.bar.set_postfix_str(s, refresh=refresh)

    def set_postfix(self, *a, **kw) -> None:
        self.stage.bar.set_postfix(*a, **kw)

    def set_total(self, total: int) -> None:
        """The work changed (e.g. training stopped a stage early)."""
        self.stage.bar.total = (self.stage.bar.total or 0) + total - (self.total or 0)
        self.total = total

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _S.open_bars.discard(self)


class _TopBar(Bar):
    """A :func:`progress` bar outside a stage (counts toward the nesting depth while open)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _S.open_bars.add(self)

    def set_total(self, total: int) -> None:
        self.total = total
        self.refresh()

    def close(self) -> None:
        _S.open_bars.discard(self)
        super().close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, disable: bool = False):  # fmt: skip
    """A progress bar the user sees: a ``tqdm``-like object (iterate it, or ``update`` /
    ``set_postfix_str`` / ``close`` it). Inside a :func:`stage` it feeds the stage's bar;
    while another bar is open (a nested loop) it is silent; ``disable`` silences it too."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or len(_S.open_bars):
        return _Silent(iterable, total, initial)
    if _S.stage is not None:
        return _Feed(_S.stage, iterable, total, unit, initial)
    return _TopBar(iterable, total=total, desc=desc, unit=unit, initial=initial)


class _Stage:
    def __init__(self, label: str):
        self.label, self.feeds, self.t0 = label, 0, time.perf_counter()
        self.bar = Bar(total=0, desc=label, leave=True, bar_format="{desc}: {elapsed}")


def begin_stage(label: str) -> _Stage:
    """End the current stage (if any) and start ``label``: a script of stages in a row."""
    end_stage()
    st = _S.stage = _Stage(label)
    _S.open_bars.clear()  # a bar left open by an earlier stage's error does not mute this one
    return st


def end_stage() -> None:
    """Close the current stage's bar; one that reported nothing ends as ``<label>: done in <time>``."""
    st, _S.stage = _S.stage, None
    if st is not None:
        if st.feeds == 0:
            st.bar.bar_format = "{desc}: done in {elapsed}"
        st.bar.close()


@contextmanager
def stage(label: str) -> Iterator[_Stage]:
    """One console bar for everything the stage reports through :func:`progress`."""
    st = begin_stage(label)
    try:
        yield st
    finally:
        end_stage()


# --------------------------------------------------------------------------- the log file
class LogStream(io.TextIOBase):
    """A text stream into the log: each line timestamped and tagged; a progress bar's redraws
    (``\\r``) collapse to the last state before each clear; terminal escapes dropped."""

    def __init__(self, f: TextIO, lock: threading.Lock, tag: str = ""):
        super().__init__()
        self.f, self.lock, self.tag, self.buf = f, lock, tag, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def fileno(self) -> int:  # no fd: children (resource tracker, ...) do not inherit it
        raise io.UnsupportedOperation("fileno")

    def write(self, s: str) -> int:
        with self.lock:
            self.buf += s
            *lines, self.buf = self.buf.split("\n")
            for line in lines:
                self._emit(line)
            if len(self.buf) > 1 << 16:  # a bar redrawn for hours without a newline
                self.buf = self.buf[self.buf.rfind("\r") :]
        return len(s)

    def _emit(self, line: str) -> None:
        if self.f.closed:
            return
        kept, run = [], ""
        for seg in _ANSI.sub("", line).split("\r"):
            if seg.strip():
                run = seg
            elif run:  # a cleared line (tqdm leave=False): keep what it showed last
                kept.append(run)
                run = ""
        if run:
            kept.append(run)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for k in kept:
            self.f.write(f"{stamp} {self.tag}{k.rstrip()}\n")
        self.f.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.f.closed:
                self.f.flush()

    def drain(self) -> None:
        """Write out a last unterminated line."""
        with self.lock:
            if self.buf:
                self._emit(self.buf)
                self.buf = ""


class _Count(logging.Filter):
    """Counts the warnings and errors that went to the log only."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and not record.name.startswith("lsm"):
            self.n += 1
        return True


class _ConsoleHandler(logging.Handler):
    """The project's log records on the console (around the bars); the stream is looked up
    per record, so a session's redirection and pytest's capture are both honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            Bar.write(self.format(record), file=err_stream())
        except Exception:  # noqa: BLE001 -- logging must not raise
            self.handleError(record)


CONSOLE_HANDLER = _ConsoleHandler(logging.INFO)
CONSOLE_HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))


class Session:
    """One command's console: ``quiet`` (redirecting into ``log_file``) or not (verbose)."""

    def __init__(self, log_file: Path | None, quiet: bool):
        self.log_file, self.quiet = log_file, quiet
        self._count = _Count()

    @property
    def warnings(self) -> int:
        """Warnings / errors of other libraries and Python warnings sent to the log only."""
        return self._count.n


def _user_stream(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """A stream that reaches what ``stream`` reaches once fds 1 / 2 are redirected: a fresh
    one on a duplicate of the fd when ``stream`` writes to it, else ``stream`` itself (e.g.
    pytest's capture). Returns (stream, whether it is ours to close)."""
    try:
        own = stream.fileno() == fd
    except (AttributeError, ValueError, io.UnsupportedOperation):
        own = False
    if not own:
        return stream, False
    stream.flush()
    return open(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace"), True  # fmt: skip


def _std_handlers(streams: tuple) -> list[logging.StreamHandler]:
    """Every logging handler (of any logger) that writes to one of ``streams``."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]  # fmt: skip
    out = []
    for lg in loggers:
        out += [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler) and any(h.stream is s for s in streams)]
    return out


@contextmanager
def session(log_file: str | Path | None, verbose: bool | None = None,
            title: str = "") -> Iterator[Session]:  # fmt: skip
    """Send everything but the bars, the project's warnings and :func:`echo` into ``log_file``
    (appended; created with its folder) for the duration. ``verbose`` (default:
    ``LSM_VERBOSE``) or no ``log_file``: nothing is redirected. A session inside a session is
    the outer one. On an error the traceback goes to the log, and the console is told where
    the log is."""
    verbose = verbose_env() if verbose is None else verbose
    if _S.session is not None:
        yield _S.session
        return
    if verbose or log_file is None:
        _S.session = Session(None, False)
        try:
            yield _S.session
        finally:
            _S.session = None
        return
    log_file = Path(log_file)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        f = open(log_file, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 -- closed below, or by the reader
    except OSError as e:  # e.g. out_dir a symlink loop: the command's own checks name the problem
        from lsm_dist.errors import os_error_message

        lsm_logger().warning("console: cannot write the log file (%s); showing everything",
                                         os_error_message(e))
        with session(None, verbose=True) as plain:
            yield plain
        return
    sess = _S.session = Session(log_file, True)
    lock = threading.Lock()
    streams = {t: LogStream(f, lock, t) for t in ("", "stdout: ", "stderr: ", "terminal: ")}
    streams[""].write(f"==== {title or ' '.join(sys.argv)} (pid {os.getpid()}, cwd {os.getcwd()})\n")
    old_out, old_err = sys.stdout, sys.stderr
    _S.out, close_out = _user_stream(old_out, 1)
    _S.err, close_err = _user_stream(old_err, 2)
    for s in (old_out, old_err):
        with suppress(Exception):
            s.flush()
    # fds 1 and 2 (subprocesses, C code, spawned workers) -> a pipe read into the log
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    r, w = os.pipe()
    for fd in (1, 2):
        os.dup2(w, fd)
    os.close(w)

    def pump() -> None:
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                streams["terminal: "].write(chunk.decode("utf-8", "replace"))
        streams["terminal: "].drain()

    reader = threading.Thread(target=pump, name="lsm-console-log", daemon=True)
    reader.start()
    sys.stdout, sys.stderr = streams["stdout: "], streams["stderr: "]
    # logging: the project's records -> log (console: warnings and up); everyone else's -> log
    fh = logging.StreamHandler(streams[""])
    fh.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    fh.addFilter(sess._count)
    root, lsm = logging.getLogger(), logging.getLogger("lsm")
    root_state = (list(root.handlers), root.level)
    root.handlers, root.level = [fh], min(root.level, logging.INFO)
    lsm.addHandler(fh)
    console_level = CONSOLE_HANDLER.level
    CONSOLE_HANDLER.setLevel(logging.WARNING)
    swapped = {h: h.stream for h in _std_handlers((old_out, old_err, sys.__stdout__, sys.__stderr__))}
    for h in swapped:
        h.setStream(streams["stderr: "])
        h.addFilter(sess._count)
    logging.captureWarnings(True)
    failed = False
    try:
        yield sess
    except BaseException:
        failed = True
        streams[""].write("".join(traceback.format_exc()))
        raise
    finally:
        logging.captureWarnings(False)
        for s in streams.values():
            s.drain()
        sys.stdout, sys.stderr = old_out, old_err
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        reader.join(timeout=2.0)  # EOF unless a child process still holds the pipe
        for h in _std_handlers(tuple(streams.values())):  # incl. handlers made during the session
            h.setStream(old_err)
        for h, stream in swapped.items():
            h.removeFilter(sess._count)
            h.setStream(stream)
        root.handlers, root.level = root_state
        lsm.removeHandler(fh)
        CONSOLE_HANDLER.setLevel(console_level)
        with suppress(Exception):
            end_stage()  # an error's unfinished stage: its bar as it stood
        user_out, user_err = _S.out, _S.err
        _S.out = _S.err = _S.session = None
        _S.open_bars.clear()
        if failed:
            with suppress(Exception):
                print(f"(full log: {log_file})", file=user_err, flush=True)
        for stream, ours in ((user_out, close_out), (user_err, close_err)):
            if ours:
                with suppress(Exception):
                    stream.close()
        if not reader.is_alive():  # else the reader still writes into it (a child holds the pipe)
            f.close()


def lsm_logger() -> logging.Logger:
    """The project's root logger ``lsm``: INFO and up on the console (warnings and up inside a
    quiet session, where everything goes to the log file too)."""
    lg = logging.getLogger("lsm")
    if CONSOLE_HANDLER not in lg.handlers:
        lg.addHandler(CONSOLE_HANDLER)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return lg
