"""The attack suite: each attack is rejected with a specific error and the device keeps its model.

Every test starts from a device that installed ``detector`` v1 from a good repository (built with
the controller's real ``tools.fleetctl.repository`` code), mounts one attack on the repository
files, the keys or the fetcher, and checks that the update fails with the expected error, that
``installed.json`` is byte-for-byte unchanged and that the installed model still decrypts.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from agent.supplychain import errors
from agent.supplychain.envelope import HEADER_LENGTH, encrypt_bytes
from agent.supplychain.fetcher import LocalDirectoryFetcher
from agent.supplychain.verify import UpdateLimits
from tests.integration.test_device_update import SEGMENT, Published, SupplyChainWorld

DEVICE = "pi-01"
STRIDE = SEGMENT + 16


class Installed:
    """A world where ``pi-01`` runs v1, and a check that it still does after an attack."""

    def __init__(self, world: SupplyChainWorld) -> None:
        self.world = world
        self.state = world.add_device(DEVICE)
        self.v1 = world.publish("detector", "1")
        world.assign(DEVICE, self.v1)
        world.update(DEVICE)
        self.record_bytes = self.state.installed_path.read_bytes()

    def attempt(self, expected: type[Exception], **client_args: object) -> Exception:
        """Run an update that must fail with ``expected``; the device must keep v1."""
        with pytest.raises(expected) as caught:
            self.world.update(DEVICE, **client_args)  # type: ignore[arg-type]
        assert "\n" not in str(caught.value)
        self.assert_kept()
        return caught.value

    def assert_kept(self) -> None:
        assert self.state.installed_path.read_bytes() == self.record_bytes
        record = self.world.installed(DEVICE)
        assert record.current is not None and record.current.target_path == self.v1.path
        assert self.world.decrypt_current(DEVICE) == self.v1.plaintext


@pytest.fixture
def installed(tmp_path: Path) -> Installed:
    return Installed(SupplyChainWorld(tmp_path))


@pytest.fixture
def installed_2of3_root(tmp_path: Path) -> Installed:
    return Installed(SupplyChainWorld(tmp_path, image_thresholds={"root": (2, 3)}))


def _stored_file(world: SupplyChainWorld, published: Published) -> Path:
    info = world.image.get_target(published.path)
    assert info is not None
    return world.image.target_file(info)


def _publish_v2(installed: Installed) -> Published:
    v2 = installed.world.publish("detector", "2")
    installed.world.assign(DEVICE, v2)
    return v2


# -- arbitrary software ------------------------------------------------------------------------


def test_arbitrary_software_tampered_ciphertext(installed: Installed) -> None:
    v2 = _publish_v2(installed)
    stored = _stored_file(installed.world, v2)
    data = bytearray(stored.read_bytes())
    data[HEADER_LENGTH + 10] ^= 0x80
    stored.write_bytes(bytes(data))
    installed.attempt(errors.TargetHashError)


def test_arbitrary_software_tampered_model_card_in_metadata(installed: Installed) -> None:
    v2 = _publish_v2(installed)
    image = installed.world.image
    path = image.metadata_path("targets")
    doc = json.loads(path.read_bytes())
    card = json.loads(doc["signed"]["targets"][v2.path]["custom"]["card"])
    card["description"] = "now with a backdoor"
    doc["signed"]["targets"][v2.path]["custom"]["card"] = json.dumps(card)
    path.write_text(json.dumps(doc))
    installed.attempt(errors.SignatureError)


def test_arbitrary_software_card_for_another_model(installed: Installed) -> None:
    # Even correctly signed, a card must name the model, version and format of its path.
    world = installed.world
    v2 = world.publish("detector", "2", card=installed.v1.card)
    world.assign(DEVICE, v2)
    installed.attempt(errors.TargetMetadataError)


# -- rollback and freeze -----------------------------------------------------------------------


@pytest.mark.parametrize("repository", ["image", "director"])
def test_rollback_replayed_older_metadata(installed: Installed, repository: str) -> None:
    world = installed.world
    metadata_dir = (
        world.image.metadata_dir
        if repository == "image"
        else world.director.namespace(DEVICE).metadata_dir
    )
    old_timestamp = (metadata_dir / "timestamp.json").read_bytes()  # names v1's snapshot
    v2 = _publish_v2(installed)
    world.update(DEVICE)  # the device now trusts the newer metadata and runs v2
    installed.v1, installed.record_bytes = v2, installed.state.installed_path.read_bytes()
    (metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    installed.attempt(errors.RollbackError)


@pytest.mark.parametrize("repository", ["image", "director"])
def test_freeze_expired_timestamp(installed: Installed, repository: str) -> None:
    world = installed.world
    _publish_v2(installed)
    repo = world.image if repository == "image" else world.director.namespace(DEVICE)
    repo.refresh_timestamp(expires=repo.now() - timedelta(hours=1))
    installed.attempt(errors.ExpiredMetadataError)


# -- mix-and-match and a compromised director --------------------------------------------------


def test_mix_and_match_director_hash_differs_from_image(installed: Installed) -> None:
    world = installed.world
    v2 = world.publish("detector", "2")
    world.assign(DEVICE, v2, length=installed.v1.length, hashes=installed.v1.hashes)
    error = installed.attempt(errors.TargetMismatchError)
    assert "expected the director's length" in str(error)


def test_compromised_director_key_alone_cannot_install_unsigned_model(
    installed: Installed,
) -> None:
    world = installed.world
    # The attacker holds every director key: it can sign any director metadata and seal grants
    # to the device, but the image repository never signed this model.
    malicious = os.urandom(3000)
    key = os.urandom(32)
    ciphertext = encrypt_bytes(malicious, key, segment_size=SEGMENT)
    forged = Published(
        "models/detector/9/model.onnx.enc",
        malicious,
        ciphertext,
        key,
        len(ciphertext),
        {"sha256": hashlib.sha256(ciphertext).hexdigest()},
        installed.v1.card,
    )
    world.assign(DEVICE, forged)
    error = installed.attempt(errors.TargetMismatchError)
    assert "the image repository does not" in str(error)


def test_compromised_director_key_cannot_swap_bytes_of_a_signed_path(
    installed: Installed,
) -> None:
    world = installed.world
    v2 = world.publish("detector", "2")
    fake_hashes = {"sha256": "00" * 32}
    world.assign(DEVICE, v2, hashes=fake_hashes)
    installed.attempt(errors.TargetMismatchError)


# -- another device's director namespace ----------------------------------------------------


class NamespaceSwappingFetcher(LocalDirectoryFetcher):
    """A hostile broker: answers ``director/{victim}/...`` with ``director/{other}/...`` files."""

    def __init__(self, root: Path, *, victim: str, other: str) -> None:
        super().__init__(root, stall_timeout=5.0)
        self.victim_prefix = f"repo://director/{victim}/"
        self.other_prefix = f"repo://director/{other}/"

    def resolve(self, url: str) -> Path:
        return super().resolve(url.replace(self.victim_prefix, self.other_prefix, 1))


def test_another_devices_director_metadata_is_refused_before_it_is_trusted(
    installed: Installed,
) -> None:
    world = installed.world
    world.add_device("pi-02")
    v2 = _publish_v2(installed)
    for _ in range(3):  # pi-02's namespace now has higher versions than pi-01's
        world.assign("pi-02", v2)
    trusted = installed.state.tuf_dir("director") / "timestamp.json"
    trusted_before = trusted.read_bytes()
    swapping = NamespaceSwappingFetcher(world.repo_dir, victim=DEVICE, other="pi-02")
    error = installed.attempt(errors.NamespaceMismatchError, fetcher=swapping)
    assert "expected signed device_id 'pi-01', got 'pi-02'" in str(error)
    # Nothing of pi-02's was trusted, so pi-01's own (lower) versions still update it.
    assert trusted.read_bytes() == trusted_before
    verified = world.update(DEVICE)
    assert bytes(verified.plaintext) == v2.plaintext


def _publish_without_device_id(installed: Installed, unbound_role: str) -> None:
    """New targets, snapshot and timestamp versions, correctly signed; one lacks device_id."""
    ns = installed.world.director.namespace(DEVICE)
    targets, snapshot, timestamp = ns.open("targets"), ns.open("snapshot"), ns.open("timestamp")
    targets.signed.version += 1
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"].version = targets.signed.version
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta.version = snapshot.signed.version
    for md in (targets, snapshot, timestamp):
        if md.signed.type == unbound_role:
            del md.signed.unrecognized_fields["device_id"]
        ns.sign(md, ns.signers(md.signed.type))
        ns.write(md)


@pytest.mark.parametrize("unbound_role", ["timestamp", "snapshot", "targets"])
def test_director_metadata_without_a_device_id_is_refused(
    installed: Installed, unbound_role: str
) -> None:
    _publish_v2(installed)
    _publish_without_device_id(installed, unbound_role)
    error = installed.attempt(errors.NamespaceMismatchError)
    assert "expected signed device_id 'pi-01', got None" in str(error)


# -- endless data and slow retrieval -----------------------------------------------------------


def test_endless_data_oversized_metadata(installed: Installed) -> None:
    _publish_v2(installed)
    timestamp = installed.world.director.namespace(DEVICE).metadata_dir / "timestamp.json"
    timestamp.write_bytes(b"{" + b" " * (64 * 1024) + b"}")
    installed.attempt(errors.EndlessDataError)


def test_endless_data_oversized_target(installed: Installed) -> None:
    v2 = _publish_v2(installed)
    stored = _stored_file(installed.world, v2)
    with open(stored, "ab") as handle:
        handle.write(os.urandom(256 * 1024))
    installed.attempt(errors.EndlessDataError)


def test_endless_data_target_larger_than_device_limit(installed: Installed) -> None:
    _publish_v2(installed)
    installed.attempt(errors.EndlessDataError, limits=UpdateLimits(max_model_bytes=4096))


class StallingFetcher(LocalDirectoryFetcher):
    """Sends the first chunk of matching files, then nothing until ``release`` is set."""

    def __init__(self, root: Path, *, stall_on: str, release: threading.Event) -> None:
        super().__init__(root, stall_timeout=0.3, chunk_size=1024)
        self.stall_on = stall_on
        self.release = release

    def read_chunks(self, path: Path) -> Iterator[bytes]:
        chunks = super().read_chunks(path)
        if self.stall_on not in str(path):
            yield from chunks
            return
        yield next(chunks)
        self.release.wait()


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # lets the stalled reader threads finish


@pytest.mark.parametrize(
    "stall_on", ["targets/models/detector/2", "director/pi-01/metadata/timestamp.json"]
)
def test_slow_retrieval(installed: Installed, release: threading.Event, stall_on: str) -> None:
    _publish_v2(installed)
    fetcher = StallingFetcher(installed.world.repo_dir, stall_on=stall_on, release=release)
    installed.attempt(errors.SlowRetrievalError, fetcher=fetcher)


# -- key compromise and rotation ---------------------------------------------------------------


def test_one_compromised_root_key_under_2_of_3_threshold(installed_2of3_root: Installed) -> None:
    installed = installed_2of3_root
    image = installed.world.image
    attacker = CryptoSigner.generate_ed25519()
    root_md = image.open("root")
    root = root_md.signed
    for keyid in list(root.roles["targets"].keyids):
        root.revoke_key(keyid, "targets")
    root.add_key(attacker.public_key, "targets")
    root.version += 1
    image.sign(root_md, [image.signers("root")[0]])  # one stolen root key of three
    image.write(root_md)
    installed.attempt(errors.SignatureError)
    assert not (installed.state.tuf_dir("image") / "root_history" / "2.root.json").exists()


def test_key_rotation_good_path(installed_2of3_root: Installed) -> None:
    installed = installed_2of3_root
    world = installed.world
    world.image.rotate_keys("root", key_count=3, threshold=2)
    world.image.rotate_keys("targets", key_count=2, threshold=2)
    world.director.rotate_keys("timestamp")
    v2 = _publish_v2(installed)
    verified = world.update(DEVICE)
    assert bytes(verified.plaintext) == v2.plaintext
    history = installed.state.tuf_dir("image") / "root_history"
    assert {p.name for p in history.iterdir()} >= {"2.root.json", "3.root.json"}


def test_key_rotation_without_the_old_threshold(installed_2of3_root: Installed) -> None:
    installed = installed_2of3_root
    image = installed.world.image
    new_keys = [CryptoSigner.generate_ed25519() for _ in range(3)]
    root_md = image.open("root")
    root = root_md.signed
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    for signer in new_keys:
        root.add_key(signer.public_key, "root")
    root.roles["root"].threshold = 2
    root.version += 1
    # Fully signed by the new keys, but by only one of the keys the device trusts (needs 2).
    image.sign(root_md, [*new_keys, image.signers("root")[0]])
    image.write(root_md)
    installed.attempt(errors.SignatureError)


# -- grants ------------------------------------------------------------------------------------


def test_grant_for_another_device(installed: Installed) -> None:
    world = installed.world
    world.add_device("pi-02")
    v2 = world.publish("detector", "2")
    world.assign(DEVICE, v2, grant=world.grant(DEVICE, v2, sealed_for="pi-02"))
    installed.attempt(errors.GrantError)


def test_grant_for_another_model_version(installed: Installed) -> None:
    world = installed.world
    v2 = world.publish("detector", "2", content_key=installed.v1.content_key)
    # Same content key even, but the grant is bound to v1's path and ciphertext.
    world.assign(DEVICE, v2, grant=world.grant(DEVICE, installed.v1))
    installed.attempt(errors.GrantError)


def test_device_removed_gets_no_new_grant(installed: Installed) -> None:
    world = installed.world
    world.director.assign(DEVICE, {})  # what `fleetctl device remove` publishes
    world.publish("detector", "2")
    installed.attempt(errors.NoUpdateError)
    world.director.remove_device_namespace(DEVICE)
    installed.attempt(errors.FetchError)


# -- malformed ciphertexts signed by a compromised packer --------------------------------------


def _segments(ciphertext: bytes) -> tuple[bytes, list[bytes]]:
    body = ciphertext[HEADER_LENGTH:]
    return ciphertext[:HEADER_LENGTH], [body[i : i + STRIDE] for i in range(0, len(body), STRIDE)]


def _truncated(ciphertext: bytes, _other: bytes) -> bytes:
    header, segments = _segments(ciphertext)
    return header + b"".join(segments[:-1])


def _reordered(ciphertext: bytes, _other: bytes) -> bytes:
    header, segments = _segments(ciphertext)
    return header + segments[1] + segments[0] + b"".join(segments[2:])


def _spliced(ciphertext: bytes, other: bytes) -> bytes:
    header, segments = _segments(ciphertext)
    _, foreign = _segments(other)
    return header + segments[0] + foreign[1] + b"".join(segments[2:])


@pytest.mark.parametrize(
    ("mangle", "segment"),
    [(_truncated, "segment 4:"), (_reordered, "segment 0:"), (_spliced, "segment 1:")],
    ids=["truncated", "reordered", "spliced"],
)
def test_segments_truncated_reordered_spliced(
    installed: Installed, mangle: Callable[[bytes, bytes], bytes], segment: str
) -> None:
    world = installed.world
    plaintext = os.urandom(5 * SEGMENT + 123)
    key = os.urandom(32)
    good = encrypt_bytes(plaintext, key, segment_size=SEGMENT)
    other = encrypt_bytes(os.urandom(len(plaintext)), key, segment_size=SEGMENT)
    # The image repository signs the mangled bytes, so only the envelope can catch it.
    v2 = world.publish("detector", "2", plaintext, ciphertext=mangle(good, other), content_key=key)
    world.assign(DEVICE, v2)
    error = installed.attempt(errors.DecryptionError)
    assert str(error).startswith(segment)


# -- at rest -----------------------------------------------------------------------------------


def test_no_plaintext_at_rest_and_private_files(installed: Installed) -> None:
    world = installed.world
    v2 = _publish_v2(installed)
    world.update(DEVICE)
    windows = {
        plaintext[i : i + 64]
        for plaintext in (installed.v1.plaintext, v2.plaintext)
        for i in range(len(plaintext) - 63)
    }
    scanned = 0
    for path in installed.state.root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        assert not any(data[i : i + 64] in windows for i in range(len(data) - 63)), path
        scanned += 1
    assert scanned >= 10
    for path in [
        *(installed.state.identity_dir.iterdir()),
        *(installed.state.models_dir.iterdir()),
        installed.state.installed_path,
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(installed.state.identity_dir.stat().st_mode) == 0o700


def test_ciphertext_swapped_at_rest_is_detected(installed: Installed) -> None:
    entry = installed.world.installed(DEVICE).current
    assert entry is not None
    stored = installed.state.models_dir / entry.ciphertext_file
    backup = stored.read_bytes()
    stored.write_bytes(backup[:-1] + bytes([backup[-1] ^ 1]))
    with pytest.raises(errors.TargetHashError):
        installed.world.decrypt_current(DEVICE)
    stored.write_bytes(backup)
    installed.assert_kept()
