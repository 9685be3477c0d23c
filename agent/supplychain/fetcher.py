"""``repo://`` fetchers for ``tuf.ngclient``: how a device reads repository files.

A URL ``repo://<path>`` names a file relative to a repository root, e.g.
``repo://image/metadata/timestamp.json`` or ``repo://director/pi-01/metadata/3.root.json``.
:class:`LocalDirectoryFetcher` reads ``root/<path>`` (a controller's ``repo/`` directory served
as is, a USB stick, a test fixture); an MQTT fetcher maps the same paths to request/response.

Invariants:
    * Paths are relative: empty, absolute, ``..``, backslash or NUL components are refused, and
      the resolved file must stay inside ``root`` (no symlink escapes).
    * A missing file is ``DownloadHTTPError(..., 404)``, so ngclient's "no newer root" logic works.
    * A read that yields nothing for ``stall_timeout`` seconds raises ``SlowRetrievalError``:
      chunks are produced by a reader thread and consumed with a timeout, so a source that
      blocks forever cannot hang the update. ngclient bounds the total length itself.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

__all__ = ["REPO_SCHEME", "LocalDirectoryFetcher", "repo_path"]

logger = logging.getLogger(__name__)

REPO_SCHEME = "repo://"
_MAX_PATH = 1024
_DONE = object()


def repo_path(url: str) -> str:
    """The relative path of a ``repo://`` URL; raises ``DownloadHTTPError`` 400 if unsafe."""
    if not url.startswith(REPO_SCHEME):
        raise tuf_exceptions.DownloadHTTPError(f"{url[:80]!r}: expected a {REPO_SCHEME} URL", 400)
    path = url[len(REPO_SCHEME) :]
    parts = path.split("/")
    if (
        not path
        or len(path) > _MAX_PATH
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise tuf_exceptions.DownloadHTTPError(
            f"{url[:80]!r}: expected a relative path without '', '.' or '..' parts", 400
        )
    return path


class LocalDirectoryFetcher(FetcherInterface):  # type: ignore[misc]
    """Serves ``repo://<path>`` from ``root/<path>``, with stall detection.

    Args:
        root: the directory that holds ``image/`` and ``director/``.
        stall_timeout: seconds a read may produce nothing before ``SlowRetrievalError``.
        chunk_size: bytes per chunk handed to ngclient.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        stall_timeout: float = 30.0,
        chunk_size: int = 65536,
    ) -> None:
        self.root = Path(root).resolve()
        self.stall_timeout = stall_timeout
        self.chunk_size = chunk_size

    def resolve(self, url: str) -> Path:
        """The file a URL names; raises ``DownloadHTTPError`` (400 unsafe, 404 missing)."""
        path = repo_path(url)
        candidate = (self.root / path).resolve()
        if not candidate.is_relative_to(self.root):
            raise tuf_exceptions.DownloadHTTPError(f"{path!r}: expected a path inside root", 400)
        if not candidate.is_file():
            raise tuf_exceptions.DownloadHTTPError(f"{path!r}: not found", 404)
        return candidate

    def read_chunks(self, path: Path) -> Iterator[bytes]:
        """Yield the file's bytes; subclasses may replace the byte source (tests stall here)."""
        with open(path, "rb") as source:
            while chunk := source.read(self.chunk_size):
                yield chunk

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.resolve(url)
        return self._with_stall_timeout(url, self.read_chunks(path))

    def _with_stall_timeout(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        handoff: queue.Queue[object] = queue.Queue(maxsize=4)
        stop = threading.Event()

        def produce() -> None:
            try:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    handoff.put(chunk)
                handoff.put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                handoff.put(exc)

        reader = threading.Thread(target=produce, name="repo-fetch", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    item = handoff.get(timeout=self.stall_timeout)
                except queue.Empty:
                    logger.warning("fetch of %s stalled for %.1fs", url, self.stall_timeout)
                    raise tuf_exceptions.SlowRetrievalError(
                        f"{url}: no data for {self.stall_timeout}s; expected steady progress"
                    ) from None
                if item is _DONE:
                    return
                if isinstance(item, tuf_exceptions.DownloadError):
                    raise item
                if isinstance(item, BaseException):
                    raise tuf_exceptions.DownloadError(f"{url}: read failed ({item})") from item
                assert isinstance(item, bytes)
                yield item
        finally:
            stop.set()
            # Unblock a producer waiting on a full queue so it can see ``stop`` and exit.
            while not handoff.empty():
                handoff.get_nowait()
