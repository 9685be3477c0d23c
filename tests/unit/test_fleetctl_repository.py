"""Image and director repositories: signatures, thresholds, rotation chain, namespaces."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets  # type: ignore[attr-defined]

from agent.protocol.topics import RESERVED_DEVICE_IDS
from tools.fleetctl.keys import KeyStore
from tools.fleetctl.pki import CONTROLLER_USER
from tools.fleetctl.repository import (
    ROLES,
    DirectorRepository,
    ImageRepository,
    RepositoryError,
    TargetEntry,
    TufRepository,
    check_device_id,
    check_target_path,
)

PATH = "models/digits/1/model.tflite.enc"


def _verify_all(repo: ImageRepository) -> None:
    root = repo.root()
    for role in ROLES:
        md = repo.open(role)
        root.verify_delegate(role, md.signed_bytes, md.signatures)


def test_new_image_repository_is_signed_to_threshold(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    repo = ImageRepository.create(tmp_path / "image", keys, thresholds={"root": (2, 3)})
    root = repo.root()
    assert root.consistent_snapshot
    assert root.roles["root"].threshold == 2
    assert len(root.roles["root"].keyids) == 3
    assert len(repo.open("root").signatures) == 3
    _verify_all(repo)
    assert repo.snapshot().meta["targets.json"].version == repo.targets().version
    assert repo.timestamp().snapshot_meta.version == repo.snapshot().version
    with pytest.raises(RepositoryError, match="exists already"):
        repo.initialize({})


def test_add_target_stores_ciphertext_under_its_hash(tmp_path: Path) -> None:
    repo = ImageRepository.create(tmp_path / "image", KeyStore(tmp_path / "keys"))
    info = repo.add_target(PATH, b"ciphertext", {"note": "x"})
    assert repo.targets().version == 2
    assert repo.snapshot().meta["targets.json"].version == 2
    stored = repo.target_file(info)
    assert stored.name == f"{info.hashes['sha256']}.model.tflite.enc"
    assert stored.read_bytes() == b"ciphertext"
    assert repo.get_target(PATH) is not None
    assert repo.get_target(PATH).custom == {"note": "x"}  # type: ignore[union-attr]
    _verify_all(repo)
    with pytest.raises(RepositoryError, match="exists already"):
        repo.add_target(PATH, b"other", {})
    with pytest.raises(RepositoryError, match="no floats"):
        repo.add_target("models/x/1/model.onnx.enc", b"x", {"scale": 0.5})
    repo.remove_target(PATH)
    assert repo.get_target(PATH) is None
    with pytest.raises(RepositoryError, match="not found"):
        repo.remove_target(PATH)


def test_signing_below_threshold_is_refused(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    repo = ImageRepository.create(tmp_path / "image", keys, thresholds={"root": (2, 3)})
    root = repo.root()
    for keyid in root.roles["root"].keyids[:2]:
        keys.remove("image", "root", keyid)  # two root keys taken offline
    with pytest.raises(RepositoryError, match="signed by 1/2"):
        repo.rotate_keys("timestamp")
    assert repo.root().version == 1  # nothing written


def test_root_rotation_chain_verifies_with_old_and_new_keys(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    repo = ImageRepository.create(tmp_path / "image", keys, thresholds={"root": (2, 3)})
    old_ids = list(repo.root().roles["root"].keyids)
    repo.rotate_keys("root", key_count=2, threshold=2)
    old: Root = repo.open("root", 1).signed
    new_md = repo.open("root", 2)
    old.verify_delegate("root", new_md.signed_bytes, new_md.signatures)
    new_md.signed.verify_delegate("root", new_md.signed_bytes, new_md.signatures)
    assert not set(old_ids) & set(new_md.signed.roles["root"].keyids)
    assert all(not keys.has("image", "root", keyid) for keyid in old_ids)
    _verify_all(repo)


def test_targets_rotation_resigns_targets_with_new_key(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    repo = ImageRepository.create(tmp_path / "image", keys)
    repo.add_target(PATH, b"ct", {})
    old_targets = repo.open("targets")
    repo.rotate_keys("targets")
    new_root = repo.root()
    assert new_root.version == 2
    with pytest.raises(UnsignedMetadataError):
        new_root.verify_delegate("targets", old_targets.signed_bytes, old_targets.signatures)
    _verify_all(repo)
    assert PATH in repo.targets().targets


def test_building_blocks_sign_with_any_key_and_set_expiry(tmp_path: Path) -> None:
    fixed = datetime(2030, 1, 1, tzinfo=timezone.utc)
    repo = ImageRepository.create(
        tmp_path / "image", KeyStore(tmp_path / "keys"), clock=lambda: fixed
    )
    md: Metadata[Any] = repo.open("timestamp")
    md.signed.version += 1
    repo.set_expiry(md, timedelta(days=-1))
    repo.sign(md, [CryptoSigner.generate_ed25519()])
    repo.write(md)
    assert repo.timestamp().expires == fixed - timedelta(days=1)
    with pytest.raises(RepositoryError, match="signed by 0/1"):
        repo.verify("timestamp")
    renewed = repo.refresh_timestamp()
    assert renewed.expires == fixed + timedelta(days=1)
    repo.verify("timestamp")


def test_refresh_expiring_resigns_snapshot_when_close_to_expiry(tmp_path: Path) -> None:
    now = [datetime(2030, 1, 1, tzinfo=timezone.utc)]
    repo = ImageRepository.create(
        tmp_path / "image", KeyStore(tmp_path / "keys"), clock=lambda: now[0]
    )
    assert repo.refresh_expiring(timedelta(hours=1)) == ["timestamp"]
    now[0] += timedelta(days=6, hours=12)  # snapshot (7 days) expires within 1 day
    assert repo.refresh_expiring(timedelta(days=1)) == ["snapshot", "timestamp"]
    assert repo.timestamp().snapshot_meta.version == repo.snapshot().version
    _verify_all(repo)


def test_director_namespaces_share_root_and_follow_rotation(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    director = DirectorRepository.create(tmp_path / "director", tmp_path / "droot", keys)
    ns = director.add_device("pi-01")
    director.add_device("pi-02")
    assert director.devices() == ["pi-01", "pi-02"]
    assert ns.root() == director.root_chain.root()
    with pytest.raises(RepositoryError, match="already"):
        director.add_device("pi-01")
    director.assign("pi-01", {PATH: TargetEntry(5, {"sha256": "ab" * 32}, {"device_id": "pi-01"})})
    assert ns.targets().targets[PATH].custom == {"device_id": "pi-01"}
    director.rotate_keys("timestamp")
    for device_id in ("pi-01", "pi-02"):
        space = director.namespace(device_id)
        assert space.root().version == 2
        space.verify("timestamp")
        root_v2 = space.open("root", 2)
        director.root_chain.open("root", 1).signed.verify_delegate(
            "root", root_v2.signed_bytes, root_v2.signatures
        )
    director.assign("pi-01", {})
    assert ns.targets().targets == {}
    assert director.refresh_timestamps() == ["pi-01", "pi-02"]
    with pytest.raises(RepositoryError, match="no director namespace"):
        director.assign("pi-09", {})


BOUND_ROLES = ("targets", "snapshot", "timestamp")


def _signed_device_ids(ns: TufRepository) -> dict[str, Any]:
    """The signed ``device_id`` of each non-root role, as written on disk."""
    return {
        role: json.loads(ns.metadata_path(role).read_bytes())["signed"].get("device_id")
        for role in BOUND_ROLES
    }


def _assert_bound_and_signed(director: DirectorRepository, device_id: str) -> None:
    ns = director.namespace(device_id)
    assert _signed_device_ids(ns) == dict.fromkeys(BOUND_ROLES, device_id)
    assert "device_id" not in json.loads(ns.metadata_path("root").read_bytes())["signed"]
    assert ns.is_bound()
    for role in ROLES:
        ns.verify(role)
    assert ns.timestamp().snapshot_meta.version == ns.snapshot().version
    assert ns.snapshot().meta["targets.json"].version == ns.targets().version


def test_every_director_role_but_root_is_signed_for_its_device(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    director = DirectorRepository.create(tmp_path / "director", tmp_path / "droot", keys)
    director.add_device("pi-01")
    director.add_device("pi-02")
    steps: list[Callable[[], object]] = [
        lambda: None,
        lambda: director.assign("pi-01", {PATH: TargetEntry(5, {"sha256": "ab" * 32}, {})}),
        director.refresh_timestamps,
        lambda: director.refresh_expiring(timedelta(days=30)),
        lambda: director.rotate_keys("snapshot"),
        lambda: director.rotate_keys("targets"),
        lambda: director.assign("pi-01", {}),
    ]
    for step in steps:
        step()
        _assert_bound_and_signed(director, "pi-01")
        _assert_bound_and_signed(director, "pi-02")
    assert director.bind_namespaces() == []
    # The device id is covered by the signatures.
    path = director.namespace("pi-01").metadata_path("timestamp")
    document = json.loads(path.read_bytes())
    document["signed"]["device_id"] = "pi-02"
    path.write_text(json.dumps(document))
    with pytest.raises(RepositoryError, match="timestamp"):
        director.namespace("pi-01").verify("timestamp")


def _write_unbound_namespace(director: DirectorRepository, device_id: str) -> TufRepository:
    """A namespace as it was written before the signed device id existed."""
    legacy = TufRepository(
        director.base_dir / device_id / "metadata",
        director.keys,
        key_namespace="director",
        expiry=director.expiry,
    )
    for version in range(1, director.root_chain.latest_version("root") + 1):
        legacy.write(director.root_chain.open("root", version))
    legacy.publish_targets(Targets(), initial=True)
    legacy.set_targets({PATH: TargetFile(5, {"sha256": "ab" * 32}, PATH)})
    return legacy


@pytest.mark.parametrize(
    "operation",
    ["assign", "refresh_timestamps", "refresh_expiring", "rotate_timestamp", "bind_namespaces"],
)
def test_a_namespace_written_before_the_binding_is_bound_by_the_next_change(
    tmp_path: Path, operation: str
) -> None:
    keys = KeyStore(tmp_path / "keys")
    director = DirectorRepository.create(tmp_path / "director", tmp_path / "droot", keys)
    legacy = _write_unbound_namespace(director, "pi-01")
    assert _signed_device_ids(legacy) == dict.fromkeys(BOUND_ROLES)
    assert not director.namespace("pi-01").is_bound()
    before = {role: legacy.open(role).signed.version for role in BOUND_ROLES}
    if operation == "assign":
        director.assign("pi-01", {PATH: TargetEntry(5, {"sha256": "cd" * 32}, {})})
    elif operation == "refresh_timestamps":
        assert director.refresh_timestamps() == ["pi-01"]
    elif operation == "refresh_expiring":
        director.refresh_expiring(timedelta(hours=1))  # nothing is close to expiry
    elif operation == "rotate_timestamp":
        director.rotate_keys("timestamp")
    else:
        assert director.bind_namespaces() == ["pi-01"]
    _assert_bound_and_signed(director, "pi-01")
    for role in BOUND_ROLES:
        assert legacy.open(role).signed.version > before[role], role
    assert PATH in legacy.targets().targets


@pytest.mark.parametrize("bad", ["", "Pi-01", "-pi", "a" * 64, "pi/01", "pi 01", "../x", "pi.01"])
def test_bad_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(RepositoryError, match="device id"):
        check_device_id(bad)


def test_the_controller_broker_user_is_not_a_device_id() -> None:
    # Enrolling a device as the controller's broker user would give it the controller's ACL.
    assert CONTROLLER_USER in RESERVED_DEVICE_IDS
    with pytest.raises(RepositoryError, match="reserved"):
        check_device_id(CONTROLLER_USER)


@pytest.mark.parametrize("good", ["a", "pi-01", "0_x", "a" * 63])
def test_good_device_ids(good: str) -> None:
    assert check_device_id(good) == good


@pytest.mark.parametrize("bad", ["/abs", "a/../b", "a//b", "..", "a/.hidden", "a\\b", ""])
def test_unsafe_target_paths_are_refused(bad: str) -> None:
    with pytest.raises(RepositoryError, match="target path"):
        check_target_path(bad)
