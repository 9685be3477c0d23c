"""RepositoryServer keeps validated descriptors: a replaced, removed or symlinked file is seen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.protocol.messages import RepoRequest
from agent.protocol.topics import Topics
from agent.transport.memory import MemoryBroker, MemoryTransport
from tools.fleetctl.home import FleetHome
from tools.fleetctl.reposerver import RepositoryServer, _Refusal

TIMESTAMP = "image/metadata/timestamp.json"


def request(path: str, offset: int = 0, length: int = 1024) -> RepoRequest:
    return RepoRequest(request_id="00" * 16, path=path, offset=offset, length=length)


@pytest.fixture
def server(tmp_path: Path) -> RepositoryServer:
    home = FleetHome(tmp_path / "home")
    (home.repo_dir / "image" / "metadata").mkdir(parents=True)
    (home.repo_dir / TIMESTAMP).write_bytes(b"version 1")
    transport = MemoryTransport(broker=MemoryBroker(), client_id="ctl")
    return RepositoryServer(home, transport, Topics())


def test_a_replaced_file_is_served_fresh(server: RepositoryServer) -> None:
    assert server.read("cam-01", request(TIMESTAMP)) == (9, b"version 1")
    new = server.root / "image" / "metadata" / "new.json"
    new.write_bytes(b"version 22")
    os.replace(new, server.root / TIMESTAMP)  # how metadata is published: a new inode
    assert server.read("cam-01", request(TIMESTAMP)) == (10, b"version 22")
    assert server.read("cam-01", request(TIMESTAMP, offset=8, length=8)) == (10, b"22")


def test_a_removed_or_symlinked_file_is_refused_after_being_served(
    server: RepositoryServer, tmp_path: Path
) -> None:
    assert server.read("cam-01", request(TIMESTAMP))[1] == b"version 1"
    (server.root / TIMESTAMP).unlink()
    with pytest.raises(_Refusal) as refused:
        server.read("cam-01", request(TIMESTAMP))
    assert refused.value.counter == "not_found"
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    (server.root / TIMESTAMP).symlink_to(outside)
    with pytest.raises(_Refusal) as refused:
        server.read("cam-01", request(TIMESTAMP))
    assert refused.value.counter == "forbidden"


def test_descriptors_are_bounded_and_closed_on_stop(server: RepositoryServer) -> None:
    for i in range(40):
        name = f"image/metadata/{i}.root.json"
        (server.root / name).write_bytes(str(i).encode())
        assert server.read("cam-01", request(name))[1] == str(i).encode()
    kept = [fd for fd, _dev, _ino in server._files.values()]
    assert 0 < len(kept) <= 16
    server.stop()
    assert not server._files
    for fd in kept:
        with pytest.raises(OSError):
            os.fstat(fd)
