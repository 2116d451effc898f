"""One-line messages for OS-level failures (a leaf module: no lsm_dist imports, so the console
and the utilities can both use it)."""

from __future__ import annotations

import errno


def os_error_message(e: BaseException) -> str | None:
    """One line for a user about an OS-level failure (None when ``e`` is not one)."""
    if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop"):  # Path.resolve < 3.13
        return f"{e}: a symbolic link points back at itself"
    if not isinstance(e, OSError):
        return None
    if e.errno is None and e.filename is None:
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else "(no file named)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"cannot write {where}: {e.strerror} (disk full, quota or file-size limit): free space and rerun"
    if e.errno == errno.ELOOP:
        return f"{where}: too many levels of symbolic links (a symlink loop)"
    return f"{where}: {e.strerror or e}"
