"""MqttRepositoryFetcher on the in-memory broker: window, reordering, loss, retries, stalls,
status codes and resuming from a partial file; RepositoryServer's access rules on the same broker.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exceptions

from agent.daemon.repofetch import MqttRepositoryFetcher, RepoFetcherError
from agent.protocol.framing import FrameStatus, RepoFrame, encode_frame
from agent.protocol.messages import RepoRequest, decode, encode
from agent.protocol.topics import Topics
from agent.transport import MemoryBroker, MemoryTransport, MessageProperties
from tools.fleetctl.home import FleetHome
from tools.fleetctl.reposerver import RepositoryServer

TOPICS = Topics()
DEVICE = "pi-01"
SEG = 1024
TARGET = "image/targets/models/abc.digits-1.tflite.enc"
TARGET_URL = f"repo://{TARGET}"


@dataclass
class Responder:
    """A controller stand-in that serves ``files`` and can drop, hold, duplicate or go silent."""

    transport: MemoryTransport
    files: dict[str, bytes]
    requests: list[RepoRequest] = field(default_factory=list)
    drop_offsets: dict[int, int] = field(default_factory=dict)  # offset -> responses to drop
    silent_from: int | None = None  # no answers for offsets >= this
    hold: int = 0  # hold answers until this many wait, then send them in reverse order
    duplicate: bool = False
    stray: bool = False  # also send a frame for a request id nobody asked for
    status: FrameStatus | None = None  # answer everything with this status
    held: list[tuple[RepoRequest, bytes]] = field(default_factory=list)
    max_outstanding: int = 0

    def __post_init__(self) -> None:
        self.transport.subscribe(TOPICS.fleet_filter("repo/req"), self.on_request, qos=1)

    def on_request(self, topic: str, payload: bytes, _props: MessageProperties) -> None:
        request = decode(RepoRequest, payload)
        self.requests.append(request)
        device = TOPICS.parse(topic).device_id
        if self.silent_from is not None and request.offset >= self.silent_from:
            return
        if self.drop_offsets.get(request.offset, 0) > 0:
            self.drop_offsets[request.offset] -= 1
            return
        frame = encode_frame(self.frame(request))
        if self.hold and request.offset > 0:
            self.held.append((request, frame))
            self.max_outstanding = max(self.max_outstanding, len(self.held))
            total = len(self.files.get(request.path, b""))
            if len(self.held) < self.hold and request.offset + request.length < total:
                return
            batch, self.held = self.held, []
            for _req, held_frame in reversed(batch):
                self.send(device, held_frame)
            return
        self.send(device, frame)

    def send(self, device: str, frame: bytes) -> None:
        self.transport.publish(TOPICS.repo_response(device), frame, qos=1)
        if self.duplicate:
            self.transport.publish(TOPICS.repo_response(device), frame, qos=1)
        if self.stray:
            stray = RepoFrame(secrets.token_bytes(16), FrameStatus.OK, 0, 1, b"x")
            self.transport.publish(TOPICS.repo_response(device), encode_frame(stray), qos=1)

    def frame(self, request: RepoRequest) -> RepoFrame:
        data = self.files.get(request.path)
        if self.status is not None or data is None:
            status = self.status or FrameStatus.NOT_FOUND
            return RepoFrame(request.request_id_bytes, status, request.offset, 0, b"nope")
        if request.offset > len(data):
            return RepoFrame(request.request_id_bytes, FrameStatus.ERROR, request.offset, 0, b"")
        chunk = data[request.offset : request.offset + request.length]
        return RepoFrame(request.request_id_bytes, FrameStatus.OK, request.offset, len(data), chunk)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


def connected(broker: MemoryBroker, client_id: str) -> MemoryTransport:
    transport = MemoryTransport(broker=broker, client_id=client_id)
    transport.connect()
    return transport


@pytest.fixture
def files() -> dict[str, bytes]:
    return {TARGET: os.urandom(SEG * 25 - 5), "image/metadata/timestamp.json": b'{"t": 1}'}


@pytest.fixture
def responder(broker: MemoryBroker, files: dict[str, bytes]) -> Responder:
    return Responder(connected(broker, "ctl"), files)


def make_fetcher(broker: MemoryBroker, tmp_path: Path, **kw: object) -> MqttRepositoryFetcher:
    options: dict[str, object] = {
        "segment_bytes": SEG,
        "timeout_s": 5.0,
        "request_timeout_s": 0.05,
        "partial_dir": tmp_path / "partial",
    }
    options.update(kw)
    return MqttRepositoryFetcher(
        connected(broker, DEVICE),
        TOPICS,
        DEVICE,
        **options,  # type: ignore[arg-type]
    )


def test_small_file_is_one_request(
    broker: MemoryBroker, responder: Responder, tmp_path: Path
) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    data = fetcher.download_bytes("repo://image/metadata/timestamp.json", 1000)
    assert data == b'{"t": 1}'
    assert len(responder.requests) == 1 and fetcher.stats().requests == 1
    assert not (tmp_path / "partial").exists() or not any((tmp_path / "partial").iterdir())


def test_window_bounds_requests_and_reordered_answers_come_out_in_order(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    responder.hold = 8
    fetcher = make_fetcher(broker, tmp_path, window=8, timeout_s=5.0, request_timeout_s=5.0)
    assert fetcher.download_bytes(TARGET_URL, 10**6) == files[TARGET]
    assert responder.max_outstanding == 8  # the window was used, and never exceeded
    assert fetcher.stats().retries == 0
    assert len(responder.requests) == 25
    assert fetcher.partial_path(TARGET_URL) is not None
    assert not fetcher.partial_path(TARGET_URL).exists()  # type: ignore[union-attr]


def test_lost_answer_is_requested_again(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    responder.drop_offsets = {2 * SEG: 2, 7 * SEG: 1}
    fetcher = make_fetcher(broker, tmp_path)
    assert fetcher.download_bytes(TARGET_URL, 10**6) == files[TARGET]
    assert fetcher.stats().retries == 3
    assert [r.offset for r in responder.requests].count(2 * SEG) == 3


def test_segment_lost_every_time_gives_up_after_retries(
    broker: MemoryBroker, responder: Responder, tmp_path: Path
) -> None:
    responder.drop_offsets = {3 * SEG: 100}
    fetcher = make_fetcher(broker, tmp_path, max_retries=2)
    with pytest.raises(tuf_exceptions.SlowRetrievalError, match="after 3 requests"):
        fetcher.download_bytes(TARGET_URL, 10**6)
    assert [r.offset for r in responder.requests].count(3 * SEG) == 3


def test_duplicate_and_stray_answers_are_ignored(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    responder.duplicate = responder.stray = True
    fetcher = make_fetcher(broker, tmp_path)
    assert fetcher.download_bytes(TARGET_URL, 10**6) == files[TARGET]
    stats = fetcher.stats()
    assert stats.responses == 25 and stats.retries == 0
    assert stats.duplicate_responses >= 24  # the last one may still be queued when it ends
    assert stats.unknown_responses == 25  # every stray frame
    assert stats.bytes_received == len(files[TARGET])


def test_silent_controller_is_slow_retrieval(
    broker: MemoryBroker, responder: Responder, tmp_path: Path
) -> None:
    responder.silent_from = 0
    fetcher = make_fetcher(broker, tmp_path, timeout_s=0.3, request_timeout_s=10.0)
    with pytest.raises(tuf_exceptions.SlowRetrievalError, match=r"no data for 0\.3s"):
        fetcher.download_bytes("repo://image/metadata/timestamp.json", 1000)


def test_no_broker_connection_is_slow_retrieval(broker: MemoryBroker, tmp_path: Path) -> None:
    transport = MemoryTransport(broker=broker, client_id=DEVICE)  # never connected
    fetcher = MqttRepositoryFetcher(transport, TOPICS, DEVICE, timeout_s=0.3)
    with pytest.raises(tuf_exceptions.SlowRetrievalError):
        fetcher.download_bytes("repo://image/metadata/timestamp.json", 1000)
    assert fetcher.stats().requests == 0


def test_not_found_is_http_404(broker: MemoryBroker, responder: Responder, tmp_path: Path) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    with pytest.raises(tuf_exceptions.DownloadHTTPError) as raised:
        fetcher.download_bytes("repo://image/metadata/2.root.json", 1000)
    assert raised.value.status_code == 404


@pytest.mark.parametrize("status", [FrameStatus.TOO_LARGE, FrameStatus.ERROR])
def test_other_statuses_are_download_errors(
    broker: MemoryBroker, responder: Responder, tmp_path: Path, status: FrameStatus
) -> None:
    responder.status = status
    fetcher = make_fetcher(broker, tmp_path)
    with pytest.raises(tuf_exceptions.DownloadError, match=status.name.lower()) as raised:
        fetcher.download_bytes("repo://image/metadata/timestamp.json", 1000)
    assert not isinstance(raised.value, tuf_exceptions.DownloadHTTPError)


def test_malformed_frame_is_counted_and_dropped(
    broker: MemoryBroker, responder: Responder, tmp_path: Path
) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    responder.transport.publish(TOPICS.repo_response(DEVICE), b"ER\x01garbage", qos=1)
    assert fetcher.stats().malformed_responses == 1
    assert fetcher.transport.stats().dropped_malformed == 1
    assert fetcher.download_bytes("repo://image/metadata/timestamp.json", 1000) == b'{"t": 1}'


def test_resume_after_a_stall_fetches_only_the_rest(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    responder.silent_from = 10 * SEG
    fetcher = make_fetcher(broker, tmp_path, timeout_s=0.3, request_timeout_s=10.0)
    with pytest.raises(tuf_exceptions.SlowRetrievalError):
        fetcher.download_bytes(TARGET_URL, 10**6)
    partial = fetcher.partial_path(TARGET_URL)
    assert partial is not None and partial.read_bytes() == files[TARGET][: 10 * SEG]

    responder.silent_from = None
    responder.requests.clear()
    assert fetcher.download_bytes(TARGET_URL, 10**6) == files[TARGET]
    assert min(r.offset for r in responder.requests) == 10 * SEG
    assert fetcher.stats().bytes_resumed == 10 * SEG
    assert not partial.exists()


def test_partial_longer_than_the_file_starts_over(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    partial = fetcher.partial_path(TARGET_URL)
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(os.urandom(len(files[TARGET]) + 10))
    assert fetcher.download_bytes(TARGET_URL, 10**6) == files[TARGET]
    assert fetcher.stats().bytes_resumed == 0


def test_complete_partial_needs_one_empty_answer(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    partial = fetcher.partial_path(TARGET_URL)
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(files[TARGET])
    assert fetcher.download_bytes(TARGET_URL, 10**6) == files[TARGET]
    assert [r.offset for r in responder.requests] == [len(files[TARGET])]


def test_corrupt_partial_costs_a_download_after_discard(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    partial = fetcher.partial_path(TARGET_URL)
    assert partial is not None
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * (4 * SEG))
    corrupt = fetcher.download_bytes(TARGET_URL, 10**6)
    assert corrupt != files[TARGET] and len(corrupt) == len(files[TARGET])  # the hash check's job
    partial.write_bytes(b"\0" * (4 * SEG))  # as if an earlier attempt left it again
    fetcher.discard_partial(TARGET_URL)
    assert fetcher.download_bytes(TARGET_URL, 10**6) == files[TARGET]


def test_metadata_is_never_kept_as_partial(
    broker: MemoryBroker, responder: Responder, tmp_path: Path
) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    assert fetcher.partial_path("repo://image/metadata/timestamp.json") is None
    responder.silent_from = 0
    fetcher.timeout_s = 0.2
    with pytest.raises(tuf_exceptions.SlowRetrievalError):
        fetcher.download_bytes("repo://image/metadata/timestamp.json", 1000)
    assert not (tmp_path / "partial").exists()


def test_abandoned_download_keeps_its_partial_and_routes_nothing(
    broker: MemoryBroker, responder: Responder, files: dict[str, bytes], tmp_path: Path
) -> None:
    fetcher = make_fetcher(broker, tmp_path)
    with pytest.raises(tuf_exceptions.DownloadLengthMismatchError):
        fetcher.download_bytes(TARGET_URL, 5 * SEG)  # ngclient's max length stops it early
    partial = fetcher.partial_path(TARGET_URL)
    assert partial is not None and files[TARGET].startswith(partial.read_bytes())
    before = fetcher.stats().unknown_responses
    for request in responder.requests[-3:]:  # late answers after the fetch ended
        responder.send(DEVICE, encode_frame(responder.frame(request)))
    assert fetcher.stats().unknown_responses == before + 3


def test_bad_configuration_is_refused(broker: MemoryBroker) -> None:
    transport = connected(broker, DEVICE)
    for kw in ({"window": 0}, {"segment_bytes": 2 * 1024 * 1024}, {"timeout_s": 0}):
        with pytest.raises(RepoFetcherError):
            MqttRepositoryFetcher(transport, TOPICS, DEVICE, **kw)  # type: ignore[arg-type]


# ---- RepositoryServer on the in-memory broker ----------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, broker: MemoryBroker) -> Iterator[tuple[FleetHome, RepositoryServer]]:
    home = FleetHome(tmp_path / "home")
    (home.repo_dir / "image" / "metadata").mkdir(parents=True)
    (home.repo_dir / "image" / "metadata" / "timestamp.json").write_bytes(b"ts")
    for device in (DEVICE, "pi-02"):
        metadata = home.repo_dir / "director" / device / "metadata"
        metadata.mkdir(parents=True)
        (metadata / "timestamp.json").write_bytes(device.encode())
    (tmp_path / "secret.txt").write_bytes(b"secret")
    server = RepositoryServer(home, connected(broker, "ctl"), TOPICS, shared=False)
    server.start()
    yield home, server
    server.stop()


def test_server_serves_image_and_own_director_only(
    served: tuple[FleetHome, RepositoryServer], broker: MemoryBroker, tmp_path: Path
) -> None:
    _home, server = served
    fetcher = make_fetcher(broker, tmp_path)
    assert fetcher.download_bytes("repo://image/metadata/timestamp.json", 100) == b"ts"
    own = fetcher.download_bytes(f"repo://director/{DEVICE}/metadata/timestamp.json", 100)
    assert own == DEVICE.encode()
    with pytest.raises(tuf_exceptions.DownloadHTTPError):
        fetcher.download_bytes("repo://director/pi-02/metadata/timestamp.json", 100)
    with pytest.raises(tuf_exceptions.DownloadHTTPError):
        fetcher.download_bytes("repo://image/metadata/9.root.json", 100)
    stats = server.stats()
    assert (stats.ok, stats.forbidden, stats.not_found) == (2, 1, 1)
    assert stats.bytes_served == 2 + len(DEVICE)


def test_server_refuses_symlinks_out_of_the_repository(
    served: tuple[FleetHome, RepositoryServer], broker: MemoryBroker, tmp_path: Path
) -> None:
    home, server = served
    (home.repo_dir / "image" / "metadata" / "leak.json").symlink_to(tmp_path / "secret.txt")
    (home.repo_dir / "image" / "outside").symlink_to(tmp_path)
    fetcher = make_fetcher(broker, tmp_path)
    for url in ("repo://image/metadata/leak.json", "repo://image/outside/secret.txt"):
        with pytest.raises(tuf_exceptions.DownloadHTTPError):
            fetcher.download_bytes(url, 100)
    assert server.stats().forbidden == 2 and server.stats().bytes_served == 0


def test_server_drops_bad_requests_without_answering(
    served: tuple[FleetHome, RepositoryServer], broker: MemoryBroker
) -> None:
    _home, server = served
    device = connected(broker, DEVICE)
    answers: list[bytes] = []
    device.subscribe(TOPICS.repo_response(DEVICE), lambda _t, p, _pr: answers.append(p), qos=1)
    good = RepoRequest(request_id="ab" * 16, path="image/metadata/timestamp.json")
    bad_payloads = [
        b"not json",
        encode(good).replace(b"image/metadata", b"image/../../etc"),
        encode(good).replace(b'"offset":0', b'"offset":-1'),
    ]
    for payload in bad_payloads:
        device.publish(TOPICS.repo_request(DEVICE), payload, qos=1)
    assert answers == [] and server.stats().bad_requests == 3
    device.publish(TOPICS.repo_request(DEVICE), encode(good), qos=1)
    assert len(answers) == 1 and server.stats().requests == 1


def test_server_answers_too_large_and_beyond_the_end(
    served: tuple[FleetHome, RepositoryServer], broker: MemoryBroker, tmp_path: Path
) -> None:
    home, _server = served
    small = RepositoryServer(home, connected(broker, "ctl2"), TOPICS, shared=False, max_length=1)
    small.start()
    _server.stop()
    fetcher = make_fetcher(broker, tmp_path, segment_bytes=2)
    with pytest.raises(tuf_exceptions.DownloadError, match="too_large"):
        fetcher.download_bytes("repo://image/metadata/timestamp.json", 100)
    assert small.stats().too_large == 1
