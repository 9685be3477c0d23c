"""``RepositoryServer``: answers devices' repository requests over MQTT from the home's ``repo/``.

A device publishes :class:`~agent.protocol.messages.RepoRequest` on ``{p}/dev/{d}/repo/req``;
the server reads ``offset .. offset + length`` of the named file and answers with one binary
frame (:mod:`agent.protocol.framing`) on that device's ``{p}/dev/{d}/repo/resp`` (QoS 1).

Invariants:
    * The device id comes from the topic, which the broker's ACL binds to the client's identity.
      A device may read ``image/**`` and ``director/{its own id}/**``, nothing else: another
      device's director namespace is answered exactly like a missing file (``not-found``, no
      existence oracle) and counted as ``forbidden``.
    * Paths are resolved inside ``repo/``: every component is checked with ``lstat`` (symlinks
      are refused, so nothing can point outside), the file is opened with ``O_NOFOLLOW``, and the
      resolved path must stay within the repository root.
    * Reads are bounded by ``max_length`` (a longer request gets ``too-large``).
    * A malformed request is counted and dropped with one log line; it gets no answer (its
      request id cannot be trusted).

The handler runs on the transport's network thread; it does one bounded ``pread`` and one
publish per request, so it stays short. Opened files are kept (a few, least recently used
dropped) with the device and inode they were validated with: a later request for the same path
costs one ``lstat`` that must still name that very file (a replaced or removed file is opened and
validated again), instead of a walk of every component per 256 KiB segment.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from agent.protocol.errors import MessageError, TopicError
from agent.protocol.framing import MAX_FRAME_PAYLOAD, FrameStatus, RepoFrame, encode_frame
from agent.protocol.messages import RepoRequest, decode
from agent.protocol.topics import CONTROLLER_GROUP, Topics
from agent.transport.base import MessageProperties, Transport, TransportError
from tools.fleetctl import FleetctlError
from tools.fleetctl.home import FleetHome

__all__ = ["RepositoryServer", "RepositoryServerError", "ServerStats"]

logger = logging.getLogger(__name__)

_NOT_FOUND_REASON = "not found"
_OPEN_FILES = 16  # validated descriptors kept for repeated requests


class RepositoryServerError(FleetctlError):
    """The repository server was configured with values it cannot work with."""


@dataclass(frozen=True)
class ServerStats:
    """Counters since the server was created (exported as metrics)."""

    requests: int = 0
    bytes_served: int = 0
    ok: int = 0
    not_found: int = 0
    forbidden: int = 0
    too_large: int = 0
    errors: int = 0
    bad_requests: int = 0
    publish_failures: int = 0


class _Refusal(Exception):
    """Why a request gets a status frame instead of bytes."""

    def __init__(self, status: FrameStatus, reason: str, counter: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.counter = counter


class RepositoryServer:
    """Serves ``repo/`` of a controller home to devices over MQTT.

    Args:
        home: the controller home (its ``repo/`` directory is served).
        transport: the controller's transport.
        topics: the deployment's topic names.
        shared: subscribe with ``$share/{group}/...`` so replicas split the load; set False for
            a broker without shared subscriptions.
        group: the shared-subscription group.
        max_length: the most bytes one request may ask for.
    """

    def __init__(
        self,
        home: FleetHome,
        transport: Transport,
        topics: Topics,
        *,
        shared: bool = True,
        group: str = CONTROLLER_GROUP,
        max_length: int = MAX_FRAME_PAYLOAD,
    ) -> None:
        if not 1 <= max_length <= MAX_FRAME_PAYLOAD:
            raise RepositoryServerError(f"max_length {max_length}: expected 1..{MAX_FRAME_PAYLOAD}")
        self.root = Path(home.repo_dir).resolve()
        self.transport = transport
        self.topics = topics
        self.max_length = max_length
        self.filter = (
            topics.controller_filters(group=group)["repo/req"]
            if shared
            else topics.fleet_filter("repo/req")
        )
        self._lock = threading.Lock()
        self._stats = ServerStats()
        self._started = False
        self._files_lock = threading.Lock()
        self._files: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # fd, dev, ino

    def start(self) -> None:
        """Subscribe to requests (kept across reconnects by the transport)."""
        self.transport.subscribe(self.filter, self.handle, qos=1)
        self._started = True
        logger.info("repository server on %s serving %s", self.filter, self.root)

    def stop(self) -> None:
        """Stop answering requests."""
        if self._started:
            self.transport.unsubscribe(self.filter)
            self._started = False
        with self._files_lock:
            for fd, _dev, _ino in self._files.values():
                os.close(fd)
            self._files.clear()

    def stats(self) -> ServerStats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats

    def _count(self, **increments: int) -> None:
        with self._lock:
            self._stats = replace(
                self._stats, **{k: getattr(self._stats, k) + v for k, v in increments.items()}
            )

    # ---- requests ------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, _props: MessageProperties) -> None:
        """Answer one request (the transport calls this on its network thread)."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind != "repo/req":
                raise TopicError(f"topic {topic[:80]!r}: expected a repo/req topic")
            request = decode(RepoRequest, payload)
        except (MessageError, TopicError) as exc:
            self._count(bad_requests=1)
            logger.warning("dropped a bad repository request on %s: %s", topic[:120], exc)
            return
        device_id = parsed.device_id
        self._count(requests=1)
        try:
            total, data = self.read(device_id, request)
        except _Refusal as refusal:
            self._count(**{refusal.counter: 1})
            logger.debug("refused %s for %s: %s", request.path, device_id, refusal.reason)
            frame = RepoFrame(
                request_id=request.request_id_bytes,
                status=refusal.status,
                offset=request.offset,
                total_length=0,
                payload=refusal.reason.encode()[:256],
            )
        else:
            self._count(ok=1, bytes_served=len(data))
            frame = RepoFrame(
                request_id=request.request_id_bytes,
                status=FrameStatus.OK,
                offset=request.offset,
                total_length=total,
                payload=data,
            )
        try:
            self.transport.publish(self.topics.repo_response(device_id), encode_frame(frame), qos=1)
        except TransportError as exc:
            # The device re-requests what it does not get.
            self._count(publish_failures=1)
            logger.warning("could not answer %s for %s: %s", request.path, device_id, exc)

    def read(self, device_id: str, request: RepoRequest) -> tuple[int, bytes]:
        """``(total_length, bytes)`` of the requested range; raises ``_Refusal`` otherwise."""
        parts = request.path.split("/")
        allowed = parts[0] == "image" or (
            parts[0] == "director" and len(parts) > 2 and parts[1] == device_id
        )
        if not allowed:
            raise _Refusal(FrameStatus.NOT_FOUND, _NOT_FOUND_REASON, "forbidden")
        if request.length > self.max_length:
            raise _Refusal(
                FrameStatus.TOO_LARGE,
                f"length {request.length}: expected at most {self.max_length}",
                "too_large",
            )
        # One lock across lookup and read: a kept descriptor is never closed (and its number
        # reused for another file) while a concurrent handler reads through it.
        with self._files_lock:
            fd = self._open_validated(request.path, parts)
            try:
                total = os.fstat(fd).st_size
                if request.offset > total:
                    raise _Refusal(
                        FrameStatus.ERROR,
                        f"offset {request.offset}: expected at most the file's {total} bytes",
                        "errors",
                    )
                want = min(request.length, total - request.offset)
                data = os.pread(fd, want, request.offset) if want else b""
                if len(data) != want:
                    raise _Refusal(FrameStatus.ERROR, "file changed while reading", "errors")
                return total, data
            except OSError as exc:
                logger.error("cannot read %s: %s", request.path, exc.strerror)
                raise _Refusal(FrameStatus.ERROR, "read failed", "errors") from exc

    def _open_validated(self, path: str, parts: list[str]) -> int:
        """A kept descriptor of ``root/path`` validated by ``_open``; hold ``_files_lock``."""
        cached = self._files.get(path)
        if cached is not None:
            fd, dev, ino = cached
            try:
                now = os.lstat(self.root / path)
                same = stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == (dev, ino)
            except OSError:
                same = False
            if same:
                self._files.move_to_end(path)
                return fd
            del self._files[path]
            os.close(fd)
        fd = self._open(parts)
        info = os.fstat(fd)
        self._files[path] = (fd, info.st_dev, info.st_ino)
        if len(self._files) > _OPEN_FILES:
            _path, (evicted, _dev, _ino) = self._files.popitem(last=False)
            os.close(evicted)
        return fd

    def _open(self, parts: list[str]) -> int:
        """Open ``root/parts`` read-only, refusing symlinks anywhere below the root."""
        current = self.root
        try:
            for i, part in enumerate(parts):
                current = current / part
                mode = os.lstat(current).st_mode
                last = i == len(parts) - 1
                if (
                    stat.S_ISLNK(mode)
                    or (stat.S_ISREG(mode) != last)
                    or (not last and not stat.S_ISDIR(mode))
                ):
                    raise _Refusal(FrameStatus.NOT_FOUND, _NOT_FOUND_REASON, "forbidden")
            if not current.resolve().is_relative_to(self.root):
                raise _Refusal(FrameStatus.NOT_FOUND, _NOT_FOUND_REASON, "forbidden")
            return os.open(current, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise _Refusal(FrameStatus.NOT_FOUND, _NOT_FOUND_REASON, "not_found") from exc
            if exc.errno == errno.ELOOP:
                raise _Refusal(FrameStatus.NOT_FOUND, _NOT_FOUND_REASON, "forbidden") from exc
            logger.error("cannot open %s: %s", current, exc.strerror)
            raise _Refusal(FrameStatus.ERROR, "read failed", "errors") from exc
