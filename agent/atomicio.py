"""The one way the project writes files: atomically, durably, with chosen permissions.

Write to a temporary file in the same directory, fsync it, rename it over the target, then fsync
the directory, so that power can be cut at any instant and the target holds either the old or
the new content, never a mix.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["atomic_write", "commit_file", "ensure_private_dir"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically; the file is created with ``mode``."""
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    directory = target.parent
    tmp = directory / f".{target.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked for
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(directory)


def commit_file(
    written: str | os.PathLike[str], target: str | os.PathLike[str], *, mode: int
) -> None:
    """Durably move a file someone else wrote in ``target``'s directory into place.

    The last steps of :func:`atomic_write` (set ``mode``, fsync, rename, fsync the directory) for a
    large file that already exists, so it is not written a second time.
    """
    fd = os.open(written, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(written, target)
    _fsync_dir(Path(target).parent)


def ensure_private_dir(path: str | os.PathLike[str], *, mode: int = 0o700) -> Path:
    """Create ``path`` (and parents) if needed and make sure it has ``mode``."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True, mode=mode)
    os.chmod(directory, mode)
    return directory


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
