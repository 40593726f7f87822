"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the package writes goes through here: a temporary file in the same directory is
written, flushed and fsynced, then renamed over the target (os.replace is atomic on POSIX and
Windows); on any failure the temporary file is removed and the old file is left untouched.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path


@functools.cache
def _new_file_mode() -> int:
    """Permissions a plain open() would give a new file (0o666 minus the umask), found on first need.

    The umask is read from /proc/self/status where there is one (Linux), so it is never changed;
    elsewhere it is set and at once restored, the only portable way to read it.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; some systems cannot open directories, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file beside it, fsync, os.replace); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; keep the permissions a normal write would give
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write text atomically (see atomic_write_bytes); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))
