"""``MqttRepositoryFetcher``: ``tuf.ngclient`` reads ``repo://`` files over MQTT request/response.

A URL ``repo://<path>`` becomes :class:`~agent.protocol.messages.RepoRequest` messages on the
device's ``{p}/dev/{d}/repo/req`` for consecutive segments of ``segment_bytes``; the controller
answers each with one binary frame on ``{p}/dev/{d}/repo/resp``. The fetcher subscribes to its
response topic once and routes frames to the running fetch by request id (handlers run on the
transport's network thread, so routing only puts frames on a queue).

Invariants:
    * At most ``window`` segments are outstanding (requested, or received but not yet handed to
      ngclient): brokers drop QoS 1 messages silently past their per-client queues.
    * Bytes are yielded in file order; the first response tells the file's total length, and
      every later frame must agree with it and carry exactly the bytes asked for.
    * A segment without a response for ``request_timeout_s`` is requested again (same request
      id, so a late original and the retry are the same answer; duplicates are ignored), at
      most ``max_retries`` times. No progress at all for ``timeout_s`` ends the fetch with
      ``SlowRetrievalError``. A frame for an unknown request id is ignored and counted.
    * Status ``not-found`` is ``DownloadHTTPError(404)`` (ngclient's "no newer root" relies on
      it); ``too-large`` and ``error`` are ``DownloadError``.
    * Target files (``image/targets/...``) are appended to ``partial_dir/<sha256(path)>.part``
      as they arrive and a later fetch of the same URL resumes from the partial file's length.
      The partial file is an append log, not an atomic write: ngclient checks the length and
      hashes of the whole file, so a torn or corrupt partial costs a re-download (the caller
      calls :meth:`MqttRepositoryFetcher.discard_partial` and retries), never safety.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from agent.atomicio import ensure_private_dir
from agent.protocol.framing import FrameStatus, RepoFrame, decode_frame
from agent.protocol.messages import MAX_REQUEST_LENGTH, RepoRequest, encode
from agent.protocol.topics import Topics, validate_device_id
from agent.supplychain.fetcher import repo_path
from agent.transport.base import MessageProperties, Transport, TransportError

__all__ = ["FetchStats", "MqttRepositoryFetcher", "RepoFetcherError"]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 256 * 1024
DEFAULT_WINDOW = 8
RESUMABLE_PREFIX = "image/targets/"
_PUBLISH_RETRY_S = 0.2  # after NotConnected / queue full: try the send again this soon
_YIELD_BYTES = 256 * 1024  # chunk size when replaying a partial file


class RepoFetcherError(Exception):
    """The MQTT fetcher was configured with values it cannot work with."""


@dataclass(frozen=True)
class FetchStats:
    """Counters since the fetcher was created."""

    fetches: int = 0
    requests: int = 0
    retries: int = 0
    responses: int = 0
    duplicate_responses: int = 0
    unknown_responses: int = 0
    malformed_responses: int = 0
    bytes_received: int = 0
    bytes_resumed: int = 0


@dataclass
class _Segment:
    request_id: bytes
    offset: int
    length: int
    attempts: int = 0
    deadline: float = 0.0  # when to (re)send; 0 = send now
    data: bytes | None = None


class MqttRepositoryFetcher(FetcherInterface):  # type: ignore[misc]
    """A ``tuf.ngclient`` fetcher for ``repo://`` URLs over MQTT.

    Args:
        transport: the device's connected (or connecting) transport.
        topics: the deployment's topic names.
        device_id: this device (its ``repo/req`` and ``repo/resp`` topics).
        window: segments outstanding at most.
        segment_bytes: bytes per request (at most ``MAX_REQUEST_LENGTH``).
        timeout_s: no progress for this long raises ``SlowRetrievalError``.
        request_timeout_s: re-request a segment unanswered this long (default
            ``timeout_s / (max_retries + 1)``).
        max_retries: re-requests of one segment before giving up.
        partial_dir: where partial target downloads are kept for resuming (None: no resume).
        fsync_every: fsync the partial file every this many segments (None: only when a
            download stops before its end; a partial torn by a power loss costs a re-download,
            never safety, and syncing 20 MiB as it arrives halves the transfer rate).
    """

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        device_id: str,
        *,
        window: int = DEFAULT_WINDOW,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        timeout_s: float = 30.0,
        request_timeout_s: float | None = None,
        max_retries: int = 2,
        partial_dir: str | os.PathLike[str] | None = None,
        fsync_every: int | None = None,
    ) -> None:
        validate_device_id(device_id)
        if not 1 <= window <= 64:
            raise RepoFetcherError(f"window {window}: expected 1..64 requests in flight")
        if not 1 <= segment_bytes <= MAX_REQUEST_LENGTH:
            raise RepoFetcherError(
                f"segment_bytes {segment_bytes}: expected 1..{MAX_REQUEST_LENGTH}"
            )
        if timeout_s <= 0 or max_retries < 0 or (fsync_every is not None and fsync_every < 1):
            raise RepoFetcherError(
                f"timeout_s={timeout_s}, max_retries={max_retries}, fsync_every={fsync_every}:"
                " expected timeout_s > 0, max_retries >= 0, fsync_every >= 1"
            )
        self.transport = transport
        self.topics = topics
        self.device_id = device_id
        self.window = window
        self.segment_bytes = segment_bytes
        self.timeout_s = timeout_s
        self.request_timeout_s = (
            request_timeout_s if request_timeout_s is not None else timeout_s / (max_retries + 1)
        )
        if self.request_timeout_s <= 0:
            raise RepoFetcherError(
                f"request_timeout_s {self.request_timeout_s}: expected a positive number"
            )
        self.max_retries = max_retries
        self.partial_dir = Path(partial_dir) if partial_dir is not None else None
        self.fsync_every = fsync_every
        self._request_topic = topics.repo_request(device_id)
        self._lock = threading.Lock()
        self._routes: dict[bytes, queue.SimpleQueue[RepoFrame]] = {}
        self._stats = FetchStats()
        transport.subscribe(topics.repo_response(device_id), self._on_frame, qos=1)

    # ---- public --------------------------------------------------------------------------------

    def stats(self) -> FetchStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats

    def partial_path(self, url: str) -> Path | None:
        """Where a partial download of ``url`` is kept (None: not resumable)."""
        path = repo_path(url)
        if self.partial_dir is None or not path.startswith(RESUMABLE_PREFIX):
            return None
        return self.partial_dir / f"{hashlib.sha256(path.encode()).hexdigest()}.part"

    def discard_partial(self, url: str) -> None:
        """Forget a partial download of ``url`` (call it after a hash mismatch, then retry)."""
        partial = self.partial_path(url)
        if partial is not None:
            partial.unlink(missing_ok=True)

    def discard_partials(self) -> int:
        """Forget every partial download (after a hash mismatch); returns how many."""
        if self.partial_dir is None or not self.partial_dir.is_dir():
            return 0
        removed = 0
        for partial in self.partial_dir.glob("*.part"):
            partial.unlink(missing_ok=True)
            removed += 1
        return removed

    # ---- network thread ------------------------------------------------------------------------

    def _on_frame(self, _topic: str, payload: bytes, _props: MessageProperties) -> None:
        try:
            frame = decode_frame(payload)
        except Exception:
            self._count(malformed_responses=1)
            raise  # FrameError: the transport logs it and counts it as dropped_malformed
        with self._lock:
            route = self._routes.get(frame.request_id)
            if route is None:
                self._stats = replace(
                    self._stats, unknown_responses=self._stats.unknown_responses + 1
                )
        if route is None:
            logger.debug("ignored a response for unknown request %s", frame.request_id.hex())
            return
        route.put(frame)

    # ---- fetch ---------------------------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            self._stats = replace(
                self._stats, **{k: getattr(self._stats, k) + v for k, v in increments.items()}
            )

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = repo_path(url)
        self._count(fetches=1)
        return _Download(self, url, path).run()


class _Download:
    """One fetch: the window, the reorder buffer, retries and the partial file."""

    def __init__(self, fetcher: MqttRepositoryFetcher, url: str, path: str) -> None:
        self.fetcher = fetcher
        self.url = url
        self.path = path
        self.inbox: queue.SimpleQueue[RepoFrame] = queue.SimpleQueue()
        self.segments: dict[int, _Segment] = {}  # by offset: requested or buffered
        self.by_id: dict[bytes, _Segment] = {}
        self.total: int | None = None
        self.next_request = 0  # first offset not yet requested
        self.delivered = 0  # bytes handed to ngclient
        self.last_progress = time.monotonic()
        self.partial = fetcher.partial_path(url)
        self.partial_fd: int | None = None
        self.unsynced = 0
        # request ids: 8 random bytes per download and a counter (one getrandom per download,
        # not per segment); unique among the fetcher's routes, unguessable by other clients
        self.id_prefix = secrets.token_bytes(8)
        self.id_counter = itertools.count()

    # ---- driver --------------------------------------------------------------------------------

    def run(self) -> Iterator[bytes]:
        try:
            start = self._resume_offset()
            self.next_request = self.delivered = start
            first = self._first_frame(start)
            if first is None:  # the resume point was refused: start over without the partial
                self._drop_partial()
                self.next_request = self.delivered = 0
                first = self._first_frame(0)
                assert first is not None
            if start and self.delivered == start:
                yield from self._replay_partial(start)
            self._accept(first)
            while True:
                chunk = self._take_ready()
                if chunk:
                    yield chunk
                    continue
                assert self.total is not None
                if self.delivered >= self.total:
                    break
                self._fill_window()
                self._send_due()
                self._wait_one()
            self._finish()
        finally:
            self._close()

    def _resume_offset(self) -> int:
        if self.partial is None:
            return 0
        ensure_private_dir(self.partial.parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
        self.partial_fd = os.open(self.partial, flags, 0o600)
        size = os.fstat(self.partial_fd).st_size
        if size:
            logger.info("resuming %s from byte %d", self.path, size)
        return size

    def _first_frame(self, offset: int) -> RepoFrame | None:
        """Ask for the first segment and wait for it: it tells the total length."""
        length = self.fetcher.segment_bytes
        segment = self._new_segment(offset, length)
        while segment.data is None:
            self._send_due()
            frame = self._next_frame(segment)
            if frame is None:
                continue
            if frame.status is not FrameStatus.OK and offset > 0 and not self._is_not_found(frame):
                logger.warning(
                    "resume of %s at byte %d refused (%s): downloading from the start",
                    self.path,
                    offset,
                    frame.reason,
                )
                self._forget(segment)
                return None
            self._check_status(frame)
            if frame.total_length < offset:
                logger.warning(
                    "partial %s is longer than the file (%d > %d): downloading from the start",
                    self.path,
                    offset,
                    frame.total_length,
                )
                self._forget(segment)
                return None
            return frame
        raise AssertionError("unreachable")

    def _replay_partial(self, size: int) -> Iterator[bytes]:
        assert self.partial is not None
        with open(self.partial, "rb") as stored:
            remaining = size
            while remaining > 0:
                chunk = stored.read(min(_YIELD_BYTES, remaining))
                if not chunk:
                    raise tuf_exceptions.DownloadError(
                        f"{self.url}: partial file shrank while resuming; expected {size} bytes"
                    )
                remaining -= len(chunk)
                yield chunk
        self.fetcher._count(bytes_resumed=size)

    # ---- window --------------------------------------------------------------------------------

    def _new_segment(self, offset: int, length: int) -> _Segment:
        request_id = self.id_prefix + next(self.id_counter).to_bytes(8, "big")
        segment = _Segment(request_id=request_id, offset=offset, length=length)
        self.segments[offset] = segment
        self.by_id[segment.request_id] = segment
        with self.fetcher._lock:
            self.fetcher._routes[segment.request_id] = self.inbox
        self.next_request = offset + length
        return segment

    def _forget(self, segment: _Segment) -> None:
        self.segments.pop(segment.offset, None)
        self.by_id.pop(segment.request_id, None)
        with self.fetcher._lock:
            self.fetcher._routes.pop(segment.request_id, None)

    def _fill_window(self) -> None:
        assert self.total is not None
        while len(self.segments) < self.fetcher.window and self.next_request < self.total:
            length = min(self.fetcher.segment_bytes, self.total - self.next_request)
            self._new_segment(self.next_request, length)

    def _send_due(self) -> None:
        """Send every segment whose deadline passed: first sends and re-requests."""
        now = time.monotonic()
        for segment in sorted(self.segments.values(), key=lambda s: s.offset):
            if segment.data is not None or segment.deadline > now:
                continue
            if segment.attempts > self.fetcher.max_retries:
                raise tuf_exceptions.SlowRetrievalError(
                    f"{self.url}: no response for bytes {segment.offset}.."
                    f"{segment.offset + segment.length} after {segment.attempts} requests;"
                    " expected the controller to answer"
                )
            request = RepoRequest(
                request_id=segment.request_id.hex(),
                path=self.path,
                offset=segment.offset,
                length=segment.length,
            )
            try:
                self.fetcher.transport.publish(self.fetcher._request_topic, encode(request), qos=1)
            except TransportError as exc:
                logger.debug("request for %s not sent (%s); trying again", self.path, exc)
                segment.deadline = now + _PUBLISH_RETRY_S
                continue
            if segment.attempts:
                self.fetcher._count(retries=1)
                logger.warning(
                    "re-requesting %s bytes %d.. (attempt %d)",
                    self.path,
                    segment.offset,
                    segment.attempts + 1,
                )
            segment.attempts += 1
            segment.deadline = now + self.fetcher.request_timeout_s
            self.fetcher._count(requests=1)

    def _next_deadline(self) -> float:
        pending = [s.deadline for s in self.segments.values() if s.data is None]
        stall = self.last_progress + self.fetcher.timeout_s
        return min([stall, *pending])

    def _next_frame(self, waiting_for: _Segment | None = None) -> RepoFrame | None:
        """One routed frame, or None when a deadline passed first (raises on a stall)."""
        now = time.monotonic()
        if now - self.last_progress >= self.fetcher.timeout_s:
            raise tuf_exceptions.SlowRetrievalError(
                f"{self.url}: no data for {self.fetcher.timeout_s}s; expected steady progress"
            )
        try:
            frame = self.inbox.get(timeout=max(0.0, self._next_deadline() - now))
        except queue.Empty:
            return None
        segment = self.by_id.get(frame.request_id)
        if segment is None or segment.data is not None:
            self.fetcher._count(duplicate_responses=1)
            return None
        self.fetcher._count(responses=1)
        if waiting_for is not None and segment is not waiting_for:
            return None
        return frame

    def _wait_one(self) -> None:
        frame = self._next_frame()
        if frame is not None:
            self._accept(frame)

    @staticmethod
    def _is_not_found(frame: RepoFrame) -> bool:
        return frame.status is FrameStatus.NOT_FOUND

    def _check_status(self, frame: RepoFrame) -> None:
        if frame.status is FrameStatus.OK:
            return
        reason = frame.reason[:200]
        if frame.status is FrameStatus.NOT_FOUND:
            raise tuf_exceptions.DownloadHTTPError(f"{self.url}: not found ({reason})", 404)
        raise tuf_exceptions.DownloadError(
            f"{self.url}: the controller answered {frame.status.name.lower()} ({reason});"
            " expected the file"
        )

    def _accept(self, frame: RepoFrame) -> None:
        segment = self.by_id[frame.request_id]
        self._check_status(frame)
        if self.total is None:
            self.total = frame.total_length
            segment.length = min(segment.length, max(0, self.total - segment.offset))
            self.next_request = segment.offset + segment.length
        elif frame.total_length != self.total:
            raise tuf_exceptions.DownloadError(
                f"{self.url}: total length changed from {self.total} to {frame.total_length}"
                " during the download; expected one file"
            )
        expected = min(segment.length, self.total - segment.offset)
        if frame.offset != segment.offset or len(frame.payload) != expected:
            raise tuf_exceptions.DownloadError(
                f"{self.url}: response covers {len(frame.payload)} bytes at {frame.offset};"
                f" expected {expected} bytes at {segment.offset}"
            )
        segment.data = frame.payload
        self.last_progress = time.monotonic()
        self.fetcher._count(bytes_received=len(frame.payload))

    def _take_ready(self) -> bytes:
        """Remove and return the in-order segment at the delivery point, if it arrived."""
        segment = self.segments.get(self.delivered)
        if segment is None or segment.data is None:
            return b""
        self._forget(segment)  # an empty segment: an empty file, or a resume at its very end
        data = segment.data
        self.delivered += len(data)
        self._append_partial(data)
        return data

    # ---- partial file --------------------------------------------------------------------------

    def _append_partial(self, data: bytes) -> None:
        if self.partial_fd is None or not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.partial_fd, view) :]
        self.unsynced += 1
        every = self.fetcher.fsync_every
        if every is not None and self.unsynced >= every:
            os.fsync(self.partial_fd)
            self.unsynced = 0

    def _drop_partial(self) -> None:
        if self.partial_fd is not None:
            os.ftruncate(self.partial_fd, 0)

    def _finish(self) -> None:
        if self.partial is not None:
            self._close(sync=False)  # complete: nothing left to resume
            self.partial.unlink(missing_ok=True)

    def _close(self, *, sync: bool = True) -> None:
        for segment in list(self.segments.values()):
            self._forget(segment)
        if self.partial_fd is not None:
            fd, self.partial_fd = self.partial_fd, None
            if sync and self.unsynced:
                os.fsync(fd)
            os.close(fd)
