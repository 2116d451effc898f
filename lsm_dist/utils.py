"""Small shared helpers: atomic file writes, hashing, logging that only one rank emits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def named_os_error(e: OSError, path: str | Path) -> OSError:
    """``e`` naming ``path`` when it names no file: a failed ``write()`` (disk full, quota)
    reports only its errno. Other errors are returned unchanged."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


def pid_alive(pid: int) -> bool:
    """A process with this id runs on this host (and is not this process)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_temps(paths: Iterator[Path] | list[Path]) -> list[Path]:
    """Remove the project's temp files / dirs named ``...-<pid>`` whose process is gone (a
    killed run's leftovers; this process's own too). Callers pass only names of their own
    pattern in their own directory. Returns what was removed."""
    import shutil

    gone = []
    for p in paths:
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or pid_alive(int(pid)):  # not our name pattern, or still running
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(FileNotFoundError):
                p.unlink()
        gone.append(p)
    return gone


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temp file beside ``path``, fsync, then rename over it.

    On any exception the temp file is removed and ``path`` is left as it was, so a reader
    never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise named_os_error(e, path) from None
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def cache_root() -> Path:
    """The project's cache of derived files shared across runs (GGUF files assembled from
    chunk packages, GGUF imports, calibration activations): ``$LSM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/lsm_dist``, else ``~/.cache/lsm_dist``."""
    env = os.environ.get("LSM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lsm_dist"


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def get_logger(name: str = "lsm", rank: int = 0) -> logging.Logger:
    """A logger that prints on rank 0 and does nothing on other ranks. Rank 0's records go
    through the project's root logger ``lsm`` (``console.lsm_logger``: the console, and a
    command's log file inside a ``console.session``)."""
    from lsm_dist.console import lsm_logger

    root = lsm_logger()
    if rank == 0:
        if name != "lsm" and not name.startswith("lsm."):
            raise ValueError(f"logger {name!r}: the project's loggers are named lsm or lsm.<part>")
        return root if name == "lsm" else logging.getLogger(name)  # propagates to ``lsm``
    logger = logging.getLogger(f"{name}.rank{rank}")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    return logger


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off and its log at error level, restored on exit (a no-op
    with ``LSM_VERBOSE=1``: the full output)."""
    from lsm_dist.console import verbose_env

    if verbose_env():
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)
